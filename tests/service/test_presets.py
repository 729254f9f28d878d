"""Presets: listed with their purpose and measured result, a job started from one (the keys the
service sets ignored, the user's overrides on top), an unknown name, and the preview."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from reid_core.presets import load_preset, preset_names
from service.core.job_config import service_owned_keys
from service.core.settings import JobBounds, Settings
from tests.service.conftest import Headers

#: Its file sets data.dataset, data.root and runtime.output_dir, which the service sets itself.
PRESET = "cuhk03_cpu"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The service's default bounds: the GPU presets' batches (256) are within them."""
    return settings.model_copy(update={"job_bounds": JobBounds(max_gpus=2)})


def _job(client: TestClient, headers: Headers, path: str = "/v1/jobs", **body: Any) -> Any:
    return client.post(path, json=body, headers=headers)


def test_presets_are_listed_with_purpose_measured_and_config(
    client: TestClient, alice: Headers
) -> None:
    assert client.get("/v1/presets").status_code == 401
    response = client.get("/v1/presets", headers=alice)
    assert response.status_code == 200, response.text
    listed = response.json()
    assert [p["name"] for p in listed] == preset_names()
    owned = service_owned_keys()
    for preset in listed:
        about = load_preset(preset["name"]).about
        assert (preset["purpose"], preset["measured"]) == (about.purpose, about.measured)
        assert not owned & set(preset["overrides"]), preset["name"]
    cuhk03 = next(p for p in listed if p["name"] == PRESET)
    assert cuhk03["overrides"]["model.backbone"] == "resnet18"
    assert cuhk03["config"]["model"]["backbone"] == "resnet18"
    assert cuhk03["config"]["loss"]["gsl"]["threshold"] == 0.6  # a default it leaves alone
    assert client.get(f"/v1/presets/{PRESET}", headers=alice).json() == cuhk03


def test_an_unknown_preset_is_a_404_naming_it_and_the_presets(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    for response in (
        client.get("/v1/presets/cuhk03", headers=alice),
        _job(client, alice, dataset_id=dataset["id"], preset="cuhk03"),
        _job(client, alice, "/v1/jobs/preview", dataset_id=dataset["id"], preset="cuhk03"),
    ):
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "preset_not_found"
        assert "'cuhk03'" in error["message"]
        assert ", ".join(preset_names()) in error["message"]
    assert client.get("/v1/jobs", headers=alice).json()["total"] == 0


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_starts_a_job_without_a_422(
    client: TestClient, alice: Headers, dataset: dict[str, Any], settings: Settings, name: str
) -> None:
    """Each preset's server-set keys (data.dataset, data.root, runtime.output_dir) give way to the
    service's."""
    response = _job(client, alice, dataset_id=dataset["id"], preset=name)
    assert response.status_code == 201, response.text
    job = response.json()
    cfg = job["resolved_config"]
    assert cfg["name"] == load_preset(name).settings["name"]
    assert (cfg["data"]["dataset"], cfg["data"]["root"]) == ("image_folder", dataset["path"])
    assert cfg["runtime"]["output_dir"] == str(settings.jobs_path.absolute() / job["id"])
    assert job["config_overrides"] == {}


def test_overrides_apply_on_top_of_the_preset(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    response = _job(
        client,
        alice,
        dataset_id=dataset["id"],
        preset=PRESET,
        config={"schedule.epochs": 2, "model": {"patch_dim": 64}},
        gpus=0,
    )
    assert response.status_code == 201, response.text
    cfg = response.json()["resolved_config"]
    assert (cfg["schedule"]["epochs"], cfg["model"]["patch_dim"]) == (2, 64)
    assert (cfg["model"]["backbone"], cfg["optim"]["lr"]) == ("resnet18", 0.0006)  # the preset's
    assert cfg["runtime"]["device"] == "cpu"


def test_the_user_still_cannot_set_a_server_key(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    response = _job(
        client, alice, dataset_id=dataset["id"], preset=PRESET, config={"data.root": "/etc"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "body.config.data.root"


def test_preview_resolves_as_a_submission_would_and_creates_nothing(
    client: TestClient, alice: Headers, dataset: dict[str, Any], settings: Settings
) -> None:
    body = {"dataset_id": dataset["id"], "preset": PRESET, "config": {"schedule.epochs": 2}}
    response = _job(client, alice, "/v1/jobs/preview", **body, idempotency_key="k")
    assert response.status_code == 200, response.text
    preview = response.json()
    assert (preview["gpus"], preview["queue"]) == (1, "default")
    assert client.get("/v1/jobs", headers=alice).json()["total"] == 0

    job = _job(client, alice, **body, idempotency_key="k").json()
    resolved = job["resolved_config"]
    assert preview["config"]["runtime"]["output_dir"].startswith(str(settings.jobs_path.absolute()))
    for cfg in (preview["config"], resolved):
        cfg["runtime"].pop("output_dir")
    assert preview["config"] == resolved

    refused = _job(client, alice, "/v1/jobs/preview", **body | {"config": {"loss.gls": 1}})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["details"][0]["field"] == "body.config.loss.gls"


def test_a_key_reused_with_another_preset_is_refused(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    first = _job(client, alice, dataset_id=dataset["id"], preset=PRESET, idempotency_key="k")
    assert first.status_code == 201, first.text
    again = _job(client, alice, dataset_id=dataset["id"], preset="smoke", idempotency_key="k")
    assert again.status_code == 409, again.text
