"""Model use through the API, against a real MLflow store (SQLite, local artifacts) holding a model
that a real (tiny) training registered: ``POST .../embed`` and ``/v1/galleries`` (create, build
with the worker's builder called in-process, search, delete), with owner scoping and the errors.
"""

from __future__ import annotations

import io
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from reid_core.data import build_dataset, generate_synthetic_market, parse_market_name
from reid_core.engine.exit_codes import ExitCode
from reid_core.inference.embedder import Embedder
from reid_core.inference.search import GalleryIndex
from reid_core.train import run
from service.app import create_app
from service.core.db import session_scope
from service.core.folders import gallery_dir
from service.core.gallery_states import change_gallery_state
from service.core.images import MAX_EMBED_IMAGES
from service.core.model_cache import LoadingLRU, forget_index
from service.core.models import Gallery, GalleryState, utcnow
from service.core.settings import Settings, TrackingSettings, WorkerSettings
from tests.integration.conftest import preserved_process_state, tiny_config
from tests.service.conftest import Headers, copied_settings, make_settings, write_image_folder
from worker.build_gallery import build_gallery
from worker.dispatcher import Dispatcher
from worker.mlflow_hook import MLflowHook
from worker.tracking import TrackingSpec, TrackingState

Json = dict[str, Any]


def _train_and_register(store: str, tmp: Path, model_name: str, *overrides: str) -> Path:
    """A tiny training job of alice on synthetic data whose run registers ``model_name``
    version 1 (alias ``best``) in ``store``; returns the run's ``model_final.pt``."""
    data = tmp / "data"
    if not data.exists():
        build_dataset("synthetic", data, num_identities=8, images_per_identity=4)
    spec = TrackingSpec(
        tracking_uri=store,
        experiment="reid-training",
        model_name=model_name,
        job_id=f"job-{model_name}",
        run_name=f"job-{model_name}",
        artifact_location=(tmp / "artifacts").as_uri(),
        tags={"reid.owner": "alice"},
        final_sync_s=0.0,
    )
    out = tmp / f"run-{model_name}"
    # ResNet-18, not the tiny default MobileNetV3: trained for a few steps from scratch, the
    # MobileNet's features are all alike (cosine 1.0 to 6 digits), which would make every
    # ranking below a tie; the residual trunk's are not (an image finds itself first).
    cfg = tiny_config(out, data, "model.backbone=resnet18", *overrides)
    with preserved_process_state():
        assert run(cfg, [MLflowHook(spec, out)]) == ExitCode.OK
    assert TrackingState.load(out).model_version == "1"
    return out / "model_final.pt"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A store where a job of alice registered ``reid-alice`` version 1 (alias ``best``); the
    store's URI and the run's ``model_final.pt``."""
    tmp = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    return store, _train_and_register(store, tmp, "reid-alice")


@pytest.fixture
def settings(tmp_path: Path, migrated_sqlite: Path, registry: tuple[str, Path]) -> Settings:
    """On that store; galleries are not sent to a broker (the tests build them in-process)."""
    return copied_settings(
        tmp_path,
        migrated_sqlite,
        mlflow=TrackingSettings(tracking_uri=registry[0]),
        worker=WorkerSettings(enqueue_on_submit=False),
    )


@pytest.fixture
def embedder(registry: tuple[str, Path]) -> Embedder:
    """The registered version's embedder, loaded from the training run's own file."""
    return Embedder.from_file(registry[1])


@pytest.fixture
def market(client: TestClient, alice: Headers, dataset_root: Path) -> Json:
    """alice's Market-layout dataset: 6 test identities, 3 cameras."""
    folder = generate_synthetic_market(
        dataset_root / "market", num_identities=6, images_per_identity=4, height=96, width=48
    )
    response = client.post(
        "/v1/datasets", json={"name": "market", "path": str(folder)}, headers=alice
    )
    assert response.status_code == 201, response.text
    body: Json = response.json()
    assert body["format"] == "market_folder"
    return body


def _create(client: TestClient, headers: Headers, **body: Any) -> Any:
    return client.post("/v1/galleries", json={"gpus": 0, **body}, headers=headers)


def _build(app: FastAPI, settings: Settings, gallery_id: str) -> GalleryState | None:
    return build_gallery(settings, app.state.session_factory, uuid.UUID(gallery_id))


def _search(
    client: TestClient,
    headers: Headers,
    gallery_id: str,
    image: Path,
    k: int = 5,
    camera: int | None = None,
) -> Any:
    params = {"k": k} if camera is None else {"k": k, "camera": camera}
    with image.open("rb") as f:
        files = {"image": (image.name, f, "image/jpeg")}
        return client.post(
            f"/v1/galleries/{gallery_id}/search", params=params, files=files, headers=headers
        )


@pytest.fixture
def ready(
    client: TestClient, app: FastAPI, settings: Settings, alice: Headers, market: Json
) -> Json:
    """alice's gallery of the Market dataset with the ``best`` version, built and READY."""
    response = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version="best"
    )
    assert response.status_code == 202, response.text
    assert _build(app, settings, response.json()["id"]) is GalleryState.READY
    gallery: Json = client.get(f"/v1/galleries/{response.json()['id']}", headers=alice).json()
    return gallery


# ----------------------------------------------------------------------------------------------
# galleries
# ----------------------------------------------------------------------------------------------


def test_create_answers_a_queued_gallery(
    client: TestClient, alice: Headers, bob: Headers, market: Json
) -> None:
    response = _create(
        client,
        alice,
        dataset_id=market["id"],
        model_name="reid-alice",
        model_version="best",
        name="cams",
    )
    assert response.status_code == 202, response.text
    gallery = response.json()
    assert response.headers["location"] == f"/v1/galleries/{gallery['id']}"
    assert gallery["state"] == "QUEUED"
    assert gallery["error"] is None
    assert (gallery["model_name"], gallery["model_version"]) == ("reid-alice", "1")  # resolved
    assert gallery["name"] == "cams"
    assert (gallery["gpus"], gallery["queue"]) == (0, "default")
    assert gallery["dataset_id"] == market["id"]
    assert gallery["progress"] == 0.0
    assert gallery["image_count"] == market["splits"]["gallery"]["images"]
    assert "reid-alice version 1 (best)" in gallery["reason"]
    assert client.get(f"/v1/galleries/{gallery['id']}", headers=alice).json() == gallery
    page = client.get("/v1/galleries", headers=alice).json()
    assert page["total"] == 1 and page["items"] == [gallery]
    # a number works as well as an alias, as JSON number or text
    again = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version=1
    )
    assert again.status_code == 202 and again.json()["model_version"] == "1"
    integral = _create(  # gpus 0.0 is the integer 0, as JSON Schema reads it
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version=1, gpus=0.0
    )
    assert integral.status_code == 202 and integral.json()["gpus"] == 0

    # bob sees none of it
    assert client.get("/v1/galleries", headers=bob).json()["total"] == 0
    for method, url in (
        ("GET", f"/v1/galleries/{gallery['id']}"),
        ("DELETE", f"/v1/galleries/{gallery['id']}"),
    ):
        missing = client.request(method, url, headers=bob)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "gallery_not_found"
    assert (
        _search(client, bob, gallery["id"], next(Path(market["path"]).rglob("*.jpg"))).status_code
        == 404
    )


def test_create_refuses_what_is_not_yours_or_not_there(
    client: TestClient, alice: Headers, bob: Headers, market: Json
) -> None:
    def error(headers: Headers, status: int, **body: Any) -> Json:
        response = _create(client, headers, **body)
        assert response.status_code == status, response.text
        return dict(response.json()["error"])

    ok = {"dataset_id": market["id"], "model_name": "reid-alice", "model_version": "1"}
    assert error(alice, 404, **{**ok, "dataset_id": str(uuid.uuid4())})["code"] == (
        "dataset_not_found"
    )
    assert error(bob, 404, **ok)["code"] == "dataset_not_found"  # alice's dataset
    missing = error(alice, 404, **{**ok, "model_version": "7"})
    assert missing["message"] == "model version reid-alice/7 not found"
    assert error(alice, 404, **{**ok, "model_name": "reid-nobody"})["code"] == "model_not_found"
    assert error(alice, 404, **{**ok, "model_version": "production"})["code"] == (
        "model_version_not_found"
    )  # no such alias
    bad = error(alice, 422, **{**ok, "model_version": "not a version"})
    assert bad["details"][0]["field"] == "body.model_version"
    assert error(alice, 422, **{**ok, "gpus": 2})["details"][0]["field"] == "body.gpus"
    assert error(alice, 422, **{**ok, "gpus": True})["details"][0]["field"] == "body.gpus"
    assert error(alice, 422, **{**ok, "gpus": 0.5})["details"][0]["field"] == "body.gpus"
    assert error(alice, 422, **{**ok, "gpus": 2.0})["details"][0]["field"] == "body.gpus"
    unknown_queue = error(alice, 422, **{**ok, "queue": "nope"})
    assert unknown_queue["message"] == "unknown queue 'nope'; this service has: default"
    assert error(alice, 422, **{**ok, "extra": 1})["details"][0]["field"] == "body.extra"
    assert client.get("/v1/galleries", headers=alice).json()["total"] == 0


def test_search_waits_for_ready(client: TestClient, alice: Headers, market: Json) -> None:
    gallery = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version="1"
    ).json()
    image = next(Path(market["path"], "query").glob("*.jpg"))
    response = _search(client, alice, gallery["id"], image)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "gallery_not_ready"
    assert "is QUEUED" in response.json()["error"]["message"]


def test_built_gallery_answers_searches(
    client: TestClient, alice: Headers, market: Json, ready: Json, embedder: Embedder
) -> None:
    root = Path(market["path"])
    gallery_images = sorted((root / "bounding_box_test").glob("*.jpg"))
    assert ready["state"] == "READY", ready["reason"]
    assert ready["progress"] == 1.0
    assert ready["image_count"] == ready["images_done"] == len(gallery_images)
    assert ready["skipped_count"] == 0
    assert ready["feature_dim"] == embedder.feature_dim
    assert ready["started_at"] is not None and ready["finished_at"] is not None
    assert (
        ready["reason"]
        == f"{len(gallery_images)} images indexed ({embedder.feature_dim}-d features)"
    )

    # a gallery image finds itself first
    image = gallery_images[3]
    response = _search(client, alice, ready["id"], image, k=4)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["model_name"], result["model_version"], result["k"]) == ("reid-alice", "1", 4)
    assert result["query"] == image.name
    hits = result["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert hits[0]["path"] == f"bounding_box_test/{image.name}"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for hit in hits:  # labels as the file names carry them (camera 0-based)
        pid, camid = parse_market_name(Path(hit["path"]).name) or (None, None)
        assert (hit["person_id"], hit["camera_id"]) == (pid, camid)

    # the same ranking as reid_core's own index of the same images, with the same model
    query = next((root / "query").glob("*.jpg"))
    reference = GalleryIndex.build(embedder, build_dataset("market_folder", root).gallery)
    expected = reference.search(embedder.embed_files([query]), k=len(gallery_images))[0]
    whole = _search(client, alice, ready["id"], query, k=1000).json()["hits"]  # k > gallery
    assert [h["path"] for h in whole] == [
        Path(h.path).relative_to(root).as_posix() for h in expected
    ]
    np.testing.assert_allclose([h["score"] for h in whole], [h.score for h in expected], atol=1e-5)
    assert [h["position"] for h in whole] == [h.position for h in expected]  # the same rows


@pytest.fixture(scope="module")
def camera_norm_model(registry: tuple[str, Path]) -> Path:
    """``reid-alice-cameras`` version 1 in the same store: trained with ``model.camera_norm``."""
    store, first_model = registry
    return _train_and_register(
        store, first_model.parent.parent, "reid-alice-cameras", "model.camera_norm=true"
    )


def test_a_camera_norm_models_gallery_and_queries_use_their_cameras(
    client: TestClient,
    app: FastAPI,
    settings: Settings,
    alice: Headers,
    market: Json,
    camera_norm_model: Path,
) -> None:
    """The builder embeds each gallery image with its camera's statistics; a search with the
    query's ``camera`` embeds the query with its own (a gallery image finds itself at score 1),
    one without it with the pooled statistics."""
    response = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice-cameras", model_version="1"
    )
    assert response.status_code == 202, response.text
    gallery_id = response.json()["id"]
    assert _build(app, settings, gallery_id) is GalleryState.READY
    root = Path(market["path"])
    image = sorted((root / "bounding_box_test").glob("*.jpg"))[3]
    _, camid = parse_market_name(image.name) or (None, -1)
    own_path = f"bounding_box_test/{image.name}"

    hits = _search(client, alice, gallery_id, image, k=1000, camera=camid).json()["hits"]
    assert hits[0]["path"] == own_path
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    embedder = Embedder.from_file(camera_norm_model)
    reference = GalleryIndex.build(embedder, build_dataset("market_folder", root).gallery)
    expected = reference.search(embedder.embed_files([image], cameras=[camid]), k=1000)[0]
    assert [h["position"] for h in hits] == [h.position for h in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in expected], atol=1e-5)

    pooled = _search(client, alice, gallery_id, image, k=1000).json()["hits"]
    own = next(h for h in pooled if h["path"] == own_path)
    assert own["score"] < 1.0 - 1e-4  # the query without its camera is normalised otherwise
    bad = _search(client, alice, gallery_id, image, camera=-1)
    assert bad.status_code == 422 and "camera" in bad.text


def test_index_is_read_back_from_disk_after_a_restart(
    client: TestClient, alice: Headers, market: Json, ready: Json, settings: Settings
) -> None:
    image = next(Path(market["path"], "query").glob("*.jpg"))
    before = _search(client, alice, ready["id"], image).json()
    folder = gallery_dir(settings, uuid.UUID(ready["id"]))
    assert GalleryIndex.exists(folder)
    forget_index(folder)  # what a new API process starts with
    with TestClient(create_app(settings)) as restarted:
        after = _search(restarted, alice, ready["id"], image).json()
    assert after == before


def test_search_refuses_bad_queries(client: TestClient, alice: Headers, ready: Json) -> None:
    url = f"/v1/galleries/{ready['id']}/search"
    text = {"image": ("notes.txt", b"these are not pixels", "text/plain")}
    response = client.post(url, files=text, headers=alice)
    assert response.status_code == 422
    error = response.json()["error"]
    assert "'notes.txt' is not an image" in error["message"]
    assert error["details"][0] == {
        "field": "body.image[0]",
        "message": error["message"],
        "value": "notes.txt",
    }
    jpeg = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (48, 96), (200, 10, 10)).save(jpeg, format="JPEG")
    truncated = {"image": ("cut.jpg", jpeg.getvalue()[:200], "image/jpeg")}
    cut = client.post(url, files=truncated, headers=alice)
    assert cut.status_code == 422 and "'cut.jpg' is not an image" in cut.json()["error"]["message"]
    assert client.post(url, params={"k": 0}, files=text, headers=alice).status_code == 422
    assert client.post(url, params={"k": 1001}, files=text, headers=alice).status_code == 422
    wrong_field = client.post(url, files={"query": ("a.jpg", jpeg.getvalue())}, headers=alice)
    assert wrong_field.status_code == 422
    assert wrong_field.json()["error"]["details"][0]["field"] == "body.query"
    two = [("image", ("a.jpg", jpeg.getvalue())), ("image", ("b.jpg", jpeg.getvalue()))]
    assert client.post(url, files=two, headers=alice).status_code == 413
    as_json = client.post(url, json={"image": "a.jpg"}, headers=alice)
    assert as_json.status_code == 415


def test_delete_removes_the_gallery_and_its_index(
    client: TestClient, alice: Headers, ready: Json, settings: Settings, market: Json
) -> None:
    folder = gallery_dir(settings, uuid.UUID(ready["id"]))
    assert folder.is_dir()
    assert client.delete(f"/v1/galleries/{ready['id']}", headers=alice).status_code == 204
    assert not folder.exists()
    assert client.get(f"/v1/galleries/{ready['id']}", headers=alice).status_code == 404
    image = next(Path(market["path"], "query").glob("*.jpg"))
    assert _search(client, alice, ready["id"], image).status_code == 404
    assert client.delete(f"/v1/galleries/{ready['id']}", headers=alice).status_code == 404


def _image(client: TestClient, headers: Headers, gallery_id: str, position: object) -> Any:
    return client.get(f"/v1/galleries/{gallery_id}/images/{position}", headers=headers)


def test_a_hits_position_answers_the_indexed_image_file(
    client: TestClient, alice: Headers, bob: Headers, market: Json, ready: Json
) -> None:
    root = Path(market["path"])
    query = next((root / "query").glob("*.jpg"))
    hits = _search(client, alice, ready["id"], query, k=3).json()["hits"]
    assert len(hits) == 3
    for hit in hits:
        response = _image(client, alice, ready["id"], hit["position"])
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (root / hit["path"]).read_bytes()
    # the positions are the index's rows: every image once, 0 to n - 1
    whole = _search(client, alice, ready["id"], query, k=1000).json()["hits"]
    assert sorted(h["position"] for h in whole) == list(range(ready["images_done"]))

    # another owner's gallery does not exist for bob
    theirs = _image(client, bob, ready["id"], hits[0]["position"])
    assert theirs.status_code == 404
    assert theirs.json()["error"]["code"] == "gallery_not_found"
    assert _image(client, alice, str(uuid.uuid4()), 0).status_code == 404


def test_an_image_position_outside_the_index_is_404_or_422(
    client: TestClient, alice: Headers, ready: Json
) -> None:
    count = ready["images_done"]
    assert _image(client, alice, ready["id"], count - 1).status_code == 200
    for position in (count, 2**70):
        response = _image(client, alice, ready["id"], position)
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "gallery_image_not_found"
        assert error["message"] == (
            f"gallery {ready['id']} has no image at position {position}: it indexes {count} "
            f"image(s), at positions 0 to {count - 1}"
        )
    for bad in (-1, "x", "1.5"):
        response = _image(client, alice, ready["id"], bad)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["details"][0]["field"] == "path.position"


def test_an_image_deleted_from_disk_is_404_naming_it(
    client: TestClient, alice: Headers, market: Json, ready: Json
) -> None:
    root = Path(market["path"])
    query = next((root / "query").glob("*.jpg"))
    hit = _search(client, alice, ready["id"], query, k=1).json()["hits"][0]
    (root / hit["path"]).unlink()
    response = _image(client, alice, ready["id"], hit["position"])
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "gallery_image_missing"
    assert error["message"] == (
        f"gallery image {hit['path']} (position {hit['position']}) is no longer on disk; the "
        "dataset's folder changed after the gallery was built"
    )
    (root / hit["path"]).mkdir()  # something else in its place is no image file either
    assert _image(client, alice, ready["id"], hit["position"]).status_code == 404


def test_images_wait_for_ready_and_for_the_index(
    client: TestClient, alice: Headers, market: Json, ready: Json, settings: Settings
) -> None:
    queued = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version="1"
    ).json()
    response = _image(client, alice, queued["id"], 0)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "gallery_not_ready"
    assert f"gallery {queued['id']} is QUEUED (" in response.json()["error"]["message"]

    # a READY gallery whose index files went away: the same 409 as its searches
    folder = gallery_dir(settings, uuid.UUID(ready["id"]))
    shutil.rmtree(folder)
    forget_index(folder)
    image = _image(client, alice, ready["id"], 0)
    assert image.status_code == 409
    assert image.json()["error"]["code"] == "gallery_index_missing"
    query = next(Path(market["path"], "query").glob("*.jpg"))
    search = _search(client, alice, ready["id"], query)
    assert (search.status_code, search.json()) == (409, image.json())


def test_the_image_route_is_documented(client: TestClient, alice: Headers) -> None:
    operation = client.get("/openapi.json").json()["paths"][
        "/v1/galleries/{gallery_id}/images/{position}"
    ]["get"]
    assert operation["summary"].startswith("One indexed image of the gallery")
    assert {"200", "404", "409"} <= set(operation["responses"])
    assert "image/*" in operation["responses"]["200"]["content"]
    position = next(p for p in operation["parameters"] if p["name"] == "position")
    assert position["schema"]["minimum"] == 0


def test_image_folder_gallery_indexes_every_readable_image(
    client: TestClient,
    app: FastAPI,
    settings: Settings,
    alice: Headers,
    dataset_root: Path,
) -> None:
    folder = write_image_folder(dataset_root / "crops", bad=1)
    dataset = client.post(
        "/v1/datasets", json={"name": "crops", "path": str(folder)}, headers=alice
    ).json()
    gallery = _create(
        client, alice, dataset_id=dataset["id"], model_name="reid-alice", model_version="best"
    ).json()
    assert gallery["image_count"] == 4
    assert _build(app, settings, gallery["id"]) is GalleryState.READY
    built = client.get(f"/v1/galleries/{gallery['id']}", headers=alice).json()
    assert (built["image_count"], built["skipped_count"]) == (4, 1)
    assert "1 unreadable image(s) left out" in built["reason"]
    hits = _search(client, alice, gallery["id"], folder / "cam2" / "img_1.jpg", k=10).json()["hits"]
    assert len(hits) == 4  # the whole gallery
    assert hits[0]["path"] == "cam2/img_1.jpg"
    assert hits[0]["person_id"] is None  # unlabeled
    assert {h["camera_id"] for h in hits} == {0, 1}  # cam1/, cam2/


def test_a_build_that_cannot_read_its_data_fails_with_the_reason(
    client: TestClient, app: FastAPI, settings: Settings, alice: Headers, market: Json
) -> None:
    gallery = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version="1"
    ).json()
    moved = Path(market["path"]).with_name("moved-away")
    Path(market["path"]).rename(moved)
    assert _build(app, settings, gallery["id"]) is GalleryState.FAILED
    failed = client.get(f"/v1/galleries/{gallery['id']}", headers=alice).json()
    assert failed["state"] == "FAILED"
    assert failed["error"] == failed["reason"]
    assert failed["reason"].startswith("the build failed: dataset root ")
    assert f"{market['path']} does not exist" in failed["reason"]
    assert failed["finished_at"] is not None
    # a final gallery is not built again
    assert _build(app, settings, gallery["id"]) is None


def _reaper_pass(app: FastAPI, settings: Settings) -> list[uuid.UUID]:
    """One pass of ``python -m worker dispatcher``: the gallery builds it failed."""
    dispatcher = Dispatcher(settings, app.state.session_factory, send=lambda _job: False)
    return dispatcher.run_once().failed_galleries


def test_a_build_whose_worker_died_is_failed_by_the_reaper(
    client: TestClient, app: FastAPI, settings: Settings, alice: Headers, market: Json
) -> None:
    gallery = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version="1"
    ).json()
    long_ago = utcnow() - timedelta(seconds=settings.worker.heartbeat_timeout_s + 1)
    with session_scope(app.state.session_factory) as session:
        session.execute(
            update(Gallery)
            .where(Gallery.id == uuid.UUID(gallery["id"]))
            .values(state=GalleryState.BUILDING, worker_id="w9:42", heartbeat_at=long_ago)
        )
    url = f"/v1/galleries/{gallery['id']}"
    assert client.get(url, headers=alice).json()["state"] == "BUILDING"  # a read only reads
    assert _reaper_pass(app, settings) == [uuid.UUID(gallery["id"])]
    shown = client.get(url, headers=alice).json()
    assert shown["state"] == "FAILED"
    assert shown["reason"].startswith("the build stopped: worker w9:42 sent no heartbeat since")
    assert client.get("/v1/galleries", headers=alice).json()["items"][0]["state"] == "FAILED"
    events = client.get(f"{url}/events", headers=alice).json()
    assert (events[-1]["from_state"], events[-1]["to_state"]) == ("BUILDING", "FAILED")
    assert events[-1]["reason"] == shown["reason"]


def test_a_failed_gallery_is_retried_and_built(
    client: TestClient,
    app: FastAPI,
    settings: Settings,
    alice: Headers,
    bob: Headers,
    market: Json,
    dataset_root: Path,
) -> None:
    gallery = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version="1"
    ).json()
    url = f"/v1/galleries/{gallery['id']}"
    refused = client.post(f"{url}/retry", headers=alice)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "gallery_not_failed"
    assert "is QUEUED: only a FAILED gallery" in refused.json()["error"]["message"]
    # its worker died mid-build: FAILED by the reaper
    long_ago = utcnow() - timedelta(seconds=settings.worker.heartbeat_timeout_s + 1)
    with session_scope(app.state.session_factory) as session:
        session.execute(
            update(Gallery)
            .where(Gallery.id == uuid.UUID(gallery["id"]))
            .values(
                state=GalleryState.BUILDING,
                worker_id="w9:42",
                heartbeat_at=long_ago,
                images_done=7,
                progress=0.4,
            )
        )
    assert _reaper_pass(app, settings) == [uuid.UUID(gallery["id"])]
    failed = client.get(url, headers=alice).json()
    assert failed["state"] == "FAILED"
    assert f"retry it (POST /v1/galleries/{gallery['id']}/retry)" in failed["reason"]
    assert client.post(f"{url}/retry", headers=bob).status_code == 404

    retried = client.post(f"{url}/retry", headers=alice)
    assert retried.status_code == 202, retried.text
    body = retried.json()
    assert (body["id"], body["state"], body["progress"], body["images_done"]) == (
        gallery["id"],
        "QUEUED",
        0.0,
        0,
    )
    assert body["reason"].startswith("retried by alice (was: the build stopped: worker w9:42")
    assert (body["worker_id"], body["started_at"], body["finished_at"]) == (None, None, None)
    assert _build(app, settings, gallery["id"]) is GalleryState.READY
    built = client.get(url, headers=alice).json()
    assert (built["state"], built["progress"]) == ("READY", 1.0)
    events = client.get(f"{url}/events", headers=alice).json()
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "QUEUED"),
        ("BUILDING", "FAILED"),  # set BUILDING above behind the state machine's back
        ("FAILED", "QUEUED"),
        ("QUEUED", "BUILDING"),
        ("BUILDING", "READY"),
    ]
    assert events[2]["reason"] == body["reason"]
    assert events[-1]["reason"] == built["reason"]
    assert client.get(f"{url}/events", headers=bob).status_code == 404
    query = next((Path(market["path"]) / "query").glob("*.jpg"))
    assert _search(client, alice, gallery["id"], query).status_code == 200
    again = client.post(f"{url}/retry", headers=alice)
    assert again.status_code == 409
    assert "is READY" in again.json()["error"]["message"]


def test_a_gallery_whose_dataset_is_gone_is_not_retried(
    client: TestClient, app: FastAPI, alice: Headers, market: Json
) -> None:
    gallery = _create(
        client, alice, dataset_id=market["id"], model_name="reid-alice", model_version="1"
    ).json()
    with session_scope(app.state.session_factory) as session:
        locked = session.get(Gallery, uuid.UUID(gallery["id"]))
        assert locked is not None
        change_gallery_state(session, locked, GalleryState.FAILED, "the build failed: test")
    assert client.delete(f"/v1/datasets/{market['id']}", headers=alice).status_code == 204
    refused = client.post(f"/v1/galleries/{gallery['id']}/retry", headers=alice)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "dataset_gone"


def test_broker_down_fails_the_gallery_at_once(
    tmp_path: Path,
    migrated_sqlite: Path,
    registry: tuple[str, Path],
    make_key: Callable[[str], str],
) -> None:
    db = tmp_path / "broker-down.db"
    shutil.copyfile(migrated_sqlite, db)
    settings = make_settings(
        tmp_path,
        f"sqlite:///{db}",
        mlflow=TrackingSettings(tracking_uri=registry[0]),
        worker=WorkerSettings(broker_url="redis://127.0.0.1:9/0"),
    )
    folder = generate_synthetic_market(
        settings.dataset_roots[0] / "m",
        num_identities=4,
        images_per_identity=4,
        height=96,
        width=48,
    )
    app = create_app(settings)
    from service.core.api_keys import create_api_key

    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "alice")
    headers = {"X-API-Key": token}
    with TestClient(app) as client:
        dataset = client.post(
            "/v1/datasets", json={"name": "m", "path": str(folder)}, headers=headers
        ).json()
        response = _create(
            client, headers, dataset_id=dataset["id"], model_name="reid-alice", model_version="1"
        )
        assert response.status_code == 202
        gallery = client.get(f"/v1/galleries/{response.json()['id']}", headers=headers).json()
        # retried while the broker is still down: FAILED again at once, the answer says so
        retried = client.post(f"/v1/galleries/{gallery['id']}/retry", headers=headers)
        again = client.get(f"/v1/galleries/{gallery['id']}", headers=headers).json()
    assert gallery["state"] == "FAILED"
    assert gallery["reason"].startswith("the workers' broker did not take the build (")
    assert f"retry it (POST /v1/galleries/{gallery['id']}/retry)" in gallery["reason"]
    assert retried.status_code == 202
    assert retried.json()["state"] == again["state"] == "FAILED"
    assert again["reason"].startswith("the workers' broker did not take the build (")


# ----------------------------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------------------------


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_embed_answers_the_embedders_features(
    client: TestClient, alice: Headers, market: Json, embedder: Embedder
) -> None:
    paths = sorted(Path(market["path"], "query").glob("*.jpg"))[:5]
    response = client.post(
        "/v1/models/reid-alice/versions/best/embed", files=_files(paths), headers=alice
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"]) == ("reid-alice", "1")
    assert body["feature_dim"] == embedder.feature_dim
    assert [item["name"] for item in body["items"]] == [p.name for p in paths]
    features = np.array([item["feature"] for item in body["items"]])
    assert features.shape == (len(paths), embedder.feature_dim)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(features, embedder.embed_files(paths), atol=1e-5)


def test_embed_refuses_bad_uploads(
    client: TestClient, alice: Headers, bob: Headers, market: Json
) -> None:
    url = "/v1/models/reid-alice/versions/1/embed"
    image = next(Path(market["path"], "query").glob("*.jpg"))
    broken = [*_files([image]), ("files", ("readme.md", b"# not an image", "text/markdown"))]
    response = client.post(url, files=broken, headers=alice)
    assert response.status_code == 422
    error = response.json()["error"]
    assert "'readme.md' is not an image" in error["message"]
    assert error["details"][0]["field"] == "body.files[1]"

    too_many = client.post(url, files=_files([image] * (MAX_EMBED_IMAGES + 1)), headers=alice)
    assert too_many.status_code == 413
    assert f"at most {MAX_EMBED_IMAGES} images" in too_many.json()["error"]["message"]
    no_file = client.post(
        url, data={"files": "a.jpg"}, files=[("other", ("x", b""))], headers=alice
    )
    assert no_file.status_code == 422
    assert client.post(url, json={}, headers=alice).status_code == 415

    assert client.post(url, files=_files([image]), headers=bob).status_code == 404
    unknown = client.post(
        "/v1/models/reid-alice/versions/9/embed", files=_files([image]), headers=alice
    )
    assert unknown.status_code == 404


# ----------------------------------------------------------------------------------------------
# the API's model cache
# ----------------------------------------------------------------------------------------------


def test_loading_lru_loads_once_evicts_the_oldest_and_caches_no_failure() -> None:
    cache: LoadingLRU[str, int] = LoadingLRU(capacity=2)
    loads: list[str] = []
    release = threading.Event()

    def slow_load() -> int:
        loads.append("a")
        release.wait(timeout=30)
        return 1

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(cache.get_or_load, "a", slow_load) for _ in range(4)]
        release.set()
        assert [f.result(timeout=30) for f in futures] == [1, 1, 1, 1]
    assert loads == ["a"]  # the other threads waited for the first load

    def failing() -> int:
        raise OSError("registry down")

    with pytest.raises(OSError, match="registry down"):
        cache.get_or_load("b", failing)
    assert "b" not in cache
    assert cache.get_or_load("b", lambda: 2) == 2
    assert cache.get_or_load("a", lambda: -1) == 1  # a hit: "a" is now the newest
    assert cache.get_or_load("c", lambda: 3) == 3  # evicts "b", the least recently used
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)
    cache.discard("a")
    assert len(cache) == 1
