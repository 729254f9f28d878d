"""/v1/models against a real MLflow store (SQLite, local artifacts) holding a model that a real
(tiny) training run registered through the trainer's MLflow hook."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from reid_core.data import build_dataset
from reid_core.engine.exit_codes import ExitCode
from reid_core.train import run
from service.app import create_app
from service.core.settings import Settings, TrackingSettings
from tests.integration.conftest import preserved_process_state, tiny_config
from tests.service.conftest import Headers, copied_settings, make_settings
from worker.mlflow_hook import MLflowHook
from worker.tracking import TrackingSpec, TrackingState


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, TrackingState]:
    """A store where job ``job-1`` of alice registered ``reid-alice`` version 1."""
    tmp = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    data = tmp / "data"
    build_dataset("synthetic", data, num_identities=8, images_per_identity=4)
    spec = TrackingSpec(
        tracking_uri=store,
        experiment="reid-training",
        model_name="reid-alice",
        job_id="job-1",
        run_name="job-1",
        artifact_location=(tmp / "artifacts").as_uri(),
        tags={"reid.owner": "alice"},
        final_sync_s=0.0,
    )
    out = tmp / "run"
    with preserved_process_state():
        assert run(tiny_config(out, data), [MLflowHook(spec, out)]) == ExitCode.OK
    state = TrackingState.load(out)
    assert state.model_version == "1"
    return store, state


@pytest.fixture
def settings(
    tmp_path: Path, migrated_sqlite: Path, registry: tuple[str, TrackingState]
) -> Settings:
    """The service's settings (the conftest's app, client and keys use them) on that store."""
    return copied_settings(
        tmp_path,
        migrated_sqlite,
        mlflow=TrackingSettings(tracking_uri=registry[0], ui_url="http://mlflow.example:5000"),
    )


def test_list_and_read_your_models(
    client: TestClient, alice: Headers, registry: tuple[str, TrackingState]
) -> None:
    _, state = registry
    models = client.get("/v1/models", headers=alice).json()["items"]
    assert [m["name"] for m in models] == ["reid-alice"]
    assert models[0]["latest_version"] == "1"
    assert models[0]["aliases"] == {"best": "1"}
    assert models[0]["mlflow_url"] == "http://mlflow.example:5000/#/models/reid-alice"

    versions = client.get("/v1/models/reid-alice/versions", headers=alice).json()["items"]
    assert [v["version"] for v in versions] == ["1"]
    version = client.get("/v1/models/reid-alice/versions/1", headers=alice).json()
    assert version["job_id"] == "job-1"
    assert version["run_id"] == state.run_id
    assert version["aliases"] == ["best"]
    assert version["metrics"]["mAP"] > 0 and "r1" in version["metrics"]
    # the rule that gave it best: evaluated on labels, so its mAP
    assert (version["best_rule"], version["best_value"]) == ("mAP", version["metrics"]["mAP"])
    assert version["load_uri"] == "models:/reid-alice/1"
    # an alias names a version too
    assert client.get("/v1/models/reid-alice/versions/best", headers=alice).json() == version


def test_other_owners_see_nothing(client: TestClient, bob: Headers) -> None:
    assert client.get("/v1/models", headers=bob).json()["items"] == []
    for url in (
        "/v1/models/reid-alice",
        "/v1/models/reid-alice/versions",
        "/v1/models/reid-alice/versions/1",
        "/v1/models/reid-alice/versions/1/weights",
    ):
        response = client.get(url, headers=bob)
        assert response.status_code == 404, url
        assert response.json()["error"]["message"] == "model reid-alice not found"
    put = client.put("/v1/models/reid-alice/aliases/prod", json={"version": "1"}, headers=bob)
    assert put.status_code == 404


def test_unknown_model_and_version(client: TestClient, alice: Headers) -> None:
    assert client.get("/v1/models/nope/versions", headers=alice).status_code == 404
    missing = client.get("/v1/models/reid-alice/versions/99", headers=alice)
    assert missing.status_code == 404
    assert "reid-alice/99" in missing.json()["error"]["message"]
    alias = client.get("/v1/models/reid-alice/versions/nightly", headers=alice)
    assert alias.status_code == 404
    assert alias.json()["error"]["message"] == "model version reid-alice@nightly not found"
    assert client.get("/v1/models/bad..name%2F/versions", headers=alice).status_code in (404, 422)


def test_set_an_alias(client: TestClient, alice: Headers) -> None:
    url = "/v1/models/reid-alice/aliases/production"
    response = client.put(url, json={"version": "1"}, headers=alice)
    assert response.status_code == 200, response.text
    assert response.json()["aliases"] == ["best", "production"]
    assert client.put(url, json={"version": "7"}, headers=alice).status_code == 404
    bad = client.put(url, json={"version": "one"}, headers=alice)
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["field"] == "body.version"


def test_download_the_weights(client: TestClient, alice: Headers) -> None:
    response = client.get("/v1/models/reid-alice/versions/best/weights", headers=alice)
    assert response.status_code == 200
    assert 'filename="reid-alice-v1.pt"' in response.headers["content-disposition"]
    payload = torch.load(io.BytesIO(response.content), weights_only=True)
    assert payload["format"] == "reid_core.model/1"
    assert payload["config"]["model"]["backbone"] == "mobilenet_v3_small"


@pytest.mark.parametrize(
    "tracking_uri", ["http://127.0.0.1:9", "http://reid:s3cret@127.0.0.1:9/"], ids=["", "creds"]
)
def test_registry_down_is_503_naming_it(
    tmp_path: Path, migrated_sqlite: Path, alice: Headers, tracking_uri: str
) -> None:
    db = tmp_path / "down.db"
    shutil.copyfile(migrated_sqlite, db)
    settings = make_settings(
        tmp_path,
        f"sqlite:///{db}",
        mlflow=TrackingSettings(tracking_uri=tracking_uri, request_timeout_s=1),
    )
    app = create_app(settings)
    from service.core.api_keys import create_api_key
    from service.core.db import session_scope

    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "alice")
    response = TestClient(app).get("/v1/models", headers={"X-API-Key": token})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_registry_unavailable"
    assert "MLflow at http://127.0.0.1:9" in error["message"]
    assert "s3cret" not in error["message"]  # a URL's credentials are not repeated


def test_a_registry_writes_the_mlflow_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request makes a ModelRegistry; the MLflow HTTP bounds go into the environment the
    first time only (writing it while other threads read it is not safe)."""
    from service.core import registry

    writes: list[str] = []

    class Recording(dict[str, str]):
        def __setitem__(self, key: str, value: str) -> None:
            writes.append(key)
            super().__setitem__(key, value)

    environ = Recording()
    monkeypatch.setattr(registry, "os", SimpleNamespace(environ=environ))
    for _ in range(3):
        registry.ModelRegistry(Settings(mlflow={"request_timeout_s": 7}))
    assert writes.count("MLFLOW_HTTP_REQUEST_TIMEOUT") == 1
    assert environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    registry.ModelRegistry(Settings(mlflow={"request_timeout_s": 9}))
    assert environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "9"
    registry.ModelRegistry(Settings(mlflow={"request_timeout_s": 7}))
    assert environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert writes.count("MLFLOW_HTTP_REQUEST_TIMEOUT") == 3
