"""/v1/checks: pairs of a READY gallery's crops judged by a person, and the precision they
estimate, against a real MLflow store (SQLite) with two registered versions of alice's model.

The galleries are real indexes (``GalleryIndex``, saved where the builder saves them) of a real
Market-layout dataset folder, with features laid out by hand so that the nearest crops from
other cameras, and so the true precision at rank 1, are known: the answers given here are the
truth (same person or not, from the file names), so the estimate must be that precision.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from reid_core.inference.search import GalleryIndex
from service.app import create_app
from service.core import registry as registry_module
from service.core.db import session_scope
from service.core.folders import gallery_dir
from service.core.gallery_states import change_gallery_state, lock_gallery
from service.core.models import GalleryState
from service.core.pair_estimate import wilson_interval
from service.core.settings import Settings, TrackingSettings, WorkerSettings
from tests.service.conftest import Headers, copied_settings, write_jpeg
from worker.build_gallery import gallery_records

Json = dict[str, Any]

#: The metrics a check logs to its version's run.
HUMAN = (
    "human/precision_at_1",
    "human/precision_at_1_low",
    "human/precision_at_1_high",
    "human/precision_at_5",
    "human/precision_at_5_low",
    "human/precision_at_5_high",
    "human/answers",
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """A store where alice's ``reid-alice`` has versions 1 and 2, each registered by its own run
    (as two jobs, the second a retraining, would leave them); the store's URI and the run of
    each version."""
    tmp = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    experiment = client.create_experiment(
        "reid-training", artifact_location=(tmp / "artifacts").as_uri()
    )
    client.create_registered_model("reid-alice", tags={"reid.owner": "alice"})
    runs = {}
    for job in ("job-1", "job-2"):
        run = client.create_run(experiment, tags={"reid.job_id": job})
        version = client.create_model_version(
            "reid-alice",
            source=f"{run.info.artifact_uri}/model",
            run_id=run.info.run_id,
            tags={"reid.job_id": job},
        )
        runs[str(version.version)] = run.info.run_id
    return store, runs


@pytest.fixture
def settings(
    tmp_path: Path, migrated_sqlite: Path, registry: tuple[str, dict[str, str]]
) -> Settings:
    return copied_settings(
        tmp_path,
        migrated_sqlite,
        mlflow=TrackingSettings(tracking_uri=registry[0]),
        worker=WorkerSettings(enqueue_on_submit=False),
    )


def test_equal_values_logged_in_one_millisecond_stay_two_points_of_the_history(
    settings: Settings, registry: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's store keeps one row per (key, timestamp, step, value): the registry stamps each
    log a millisecond after the last one, so an unchanged count logged again is not lost."""
    frozen = registry_module._MetricStamps(clock=lambda: 1_700_000_000.0)
    monkeypatch.setattr(registry_module, "_metric_stamps", frozen)
    models = registry_module.ModelRegistry(settings)
    for _ in range(3):
        models.log_version_metrics("alice", "reid-alice", "2", {"probe/count": 4.0})
    history = MlflowClient(tracking_uri=registry[0]).get_metric_history(
        registry[1]["2"], "probe/count"
    )
    stamps = sorted(m.timestamp for m in history)
    assert stamps == [1_700_000_000_000, 1_700_000_000_001, 1_700_000_000_002]
    assert {m.value for m in history} == {4.0}


# ----------------------------------------------------------------------------------------------
# the dataset and its galleries
# ----------------------------------------------------------------------------------------------

#: Five people, each seen once by camera 1 and once by camera 2 (camera ids 0 and 1).
PEOPLE = (1, 2, 3, 4, 5)


def _angle(degrees: float) -> np.ndarray:
    return np.array([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


def _features(pid: int, camid: int, angles: dict[tuple[int, int], float]) -> np.ndarray:
    """People 1-3: one direction each, the same from both cameras (each crop's nearest crop
    from the other camera is its own person's). People 4 and 5: directions at ``angles`` in a
    plane of their own, where the layout decides who is whose nearest."""
    feature = np.zeros(5, dtype=np.float32)
    if pid <= 3:
        feature[1 + pid] = 1.0
    else:
        feature[:2] = _angle(angles[pid, camid])
    return feature


#: Version 1: person 4 in camera 1 at 0 degrees, in camera 2 at 12; person 5 in camera 2 at 10,
#: in camera 1 at 40. The nearest crop from the other camera of each of those four crops:
#: (4, c1) -> (5, c2) at 10 degrees (not (4, c2) at 12), (5, c1) -> (4, c2) at 28 (not 30),
#: (5, c2) -> (4, c1) at 10 (not 30), (4, c2) -> (4, c1) at 12 (not 28): one right of four.
#: With the six crops of people 1-3, all right: precision at rank 1 is 7 / 10.
VERSION_1 = {(4, 0): 0.0, (4, 1): 12.0, (5, 1): 10.0, (5, 0): 40.0}
#: Version 2, retrained: the four crops of people 4 and 5 all find their own person first.
VERSION_2 = {(4, 0): 0.0, (4, 1): 5.0, (5, 1): 45.0, (5, 0): 40.0}


@pytest.fixture
def market(client: TestClient, alice: Headers, dataset_root: Path) -> Json:
    """alice's Market-layout dataset: the five people, once per camera, in every split."""
    folder = dataset_root / "people"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        for pid in PEOPLE:
            for cam in (1, 2):
                write_jpeg(folder / split / f"{pid:04d}_c{cam}s1_000{pid}{cam}_00.jpg", pid + cam)
    response = client.post(
        "/v1/datasets", json={"name": "people", "path": str(folder)}, headers=alice
    )
    assert response.status_code == 201, response.text
    body: Json = response.json()
    return body


MakeGallery = Callable[..., Json]


@pytest.fixture
def make_gallery(
    client: TestClient, app: FastAPI, settings: Settings, alice: Headers, market: Json
) -> MakeGallery:
    """``make_gallery(version, angles)``: alice's READY gallery of the dataset with that model
    version, its index holding the hand-laid features (what the builder saves, without its
    network)."""

    def make(version: str, angles: dict[tuple[int, int], float], headers: Headers = alice) -> Json:
        response = client.post(
            "/v1/galleries",
            json={
                "dataset_id": market["id"],
                "model_name": "reid-alice",
                "model_version": version,
                "gpus": 0,
            },
            headers=headers,
        )
        assert response.status_code == 202, response.text
        gallery_id = uuid.UUID(response.json()["id"])
        records, _ = gallery_records("market_folder", Path(market["path"]))
        features = np.stack([_features(r.pid, r.camid, angles) for r in records])
        index = GalleryIndex.from_features(features, records, use_gpu=False)
        index.save(gallery_dir(settings, gallery_id))
        with session_scope(app.state.session_factory) as session:
            gallery = lock_gallery(session, gallery_id)
            assert gallery is not None
            change_gallery_state(session, gallery, GalleryState.BUILDING, "test")
            gallery.images_done = gallery.image_count = len(records)
            gallery.feature_dim = index.feature_dim
            change_gallery_state(session, gallery, GalleryState.READY, "test index")
        gallery_json: Json = client.get(f"/v1/galleries/{gallery_id}", headers=alice).json()
        return gallery_json

    return make


def _check(client: TestClient, headers: Headers, gallery: Json, **body: Any) -> Any:
    return client.post("/v1/checks", json={"gallery_id": gallery["id"], **body}, headers=headers)


def _pairs(client: TestClient, headers: Headers, check: Json) -> list[Json]:
    response = client.get(f"/v1/checks/{check['id']}/pairs", headers=headers)
    assert response.status_code == 200, response.text
    items: list[Json] = response.json()["items"]
    return items


def _person(path: str) -> int:
    return int(Path(path).name[:4])


def _truth(pair: Json) -> str:
    same = _person(pair["query"]["path"]) == _person(pair["candidate"]["path"])
    return "same" if same else "different"


def _answer(client: TestClient, headers: Headers, check: Json, index: int, answer: str) -> Any:
    return client.put(
        f"/v1/checks/{check['id']}/pairs/{index}/answer", json={"answer": answer}, headers=headers
    )


def _key(pair: Json) -> tuple[str, str]:
    a, b = sorted((pair["query"]["path"], pair["candidate"]["path"]))
    return a, b


# ----------------------------------------------------------------------------------------------
# pairs
# ----------------------------------------------------------------------------------------------


def test_a_check_samples_each_query_with_its_nearest_crops_from_other_cameras(
    client: TestClient, alice: Headers, make_gallery: MakeGallery, market: Json
) -> None:
    gallery = make_gallery("1", VERSION_1)
    response = _check(client, alice, gallery, queries=6, seed=11)
    assert response.status_code == 201, response.text
    check = response.json()
    assert response.headers["location"] == f"/v1/checks/{check['id']}"
    assert (check["gallery_id"], check["dataset_id"]) == (gallery["id"], market["id"])
    assert (check["model_name"], check["model_version"]) == ("reid-alice", "1")
    assert (check["seed"], check["queries"], check["answered"], check["min_answers"]) == (
        11,
        6,
        0,
        10,
    )
    assert check["precision_at_1"] == {
        "estimate": None,
        "low": 0.0,
        "high": 1.0,
        "same": 0,
        "different": 0,
        "unsure": 0,
        "answers": 0,
    }

    pairs = _pairs(client, alice, check)
    assert [p["index"] for p in pairs] == list(range(check["pairs"]))
    queries = [p["query"]["path"] for p in pairs if p["at_rank_1"]]
    assert len(queries) == len(set(queries)) == 6  # six distinct queries, one rank-1 pair each
    assert sum(p["at_rank_5"] for p in pairs) == 6  # and one drawn rank each
    for pair in pairs:
        assert pair["answer"] is None
        assert pair["query"]["camera_id"] != pair["candidate"]["camera_id"]  # other cameras
        assert pair["query"]["path"].startswith("bounding_box_test/")
        assert pair["at_rank_1"] == (pair["rank"] == 1)
        assert 1 <= pair["rank"] <= 5  # five crops from the other camera: every rank possible
    # each query's pairs come together: its rank-1 pair first, then its drawn one if another
    for first, second in itertools.pairwise(pairs):
        if not second["at_rank_1"]:
            assert second["query"] == first["query"] and first["at_rank_1"]
            assert not first["at_rank_5"] and second["rank"] > 1

    # the nearest crops from the other camera are the laid-out ones: (4, c1) finds (5, c2)
    firsts = {
        (_person(p["query"]["path"]), p["query"]["camera_id"]): p for p in pairs if p["at_rank_1"]
    }
    if (4, 0) in firsts:
        assert _person(firsts[4, 0]["candidate"]["path"]) == 5

    # the images are the gallery's: its image route answers each position
    image = client.get(
        f"/v1/galleries/{gallery['id']}/images/{pairs[0]['query']['position']}", headers=alice
    )
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"

    # asking again answers the same check; another seed or size is refused
    again = _check(client, alice, gallery)
    assert again.status_code == 200 and again.json()["id"] == check["id"]
    assert _check(client, alice, gallery, seed=11, queries=6).status_code == 200
    other = _check(client, alice, gallery, seed=12)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "check_exists"
    assert "seed 11 and 6 queries (seed differ)" in other.json()["error"]["message"]
    listed = client.get("/v1/checks", headers=alice).json()
    assert [c["id"] for c in listed["items"]] == [check["id"]] and listed["total"] == 1
    by_gallery = client.get("/v1/checks", params={"gallery_id": gallery["id"]}, headers=alice)
    assert by_gallery.json()["items"] == [
        client.get(f"/v1/checks/{check['id']}", headers=alice).json()
    ]

    # the same seed gives the same sample: deleted and made again, the pairs are the same
    assert client.delete(f"/v1/checks/{check['id']}", headers=alice).status_code == 204
    assert client.get(f"/v1/checks/{check['id']}", headers=alice).status_code == 404
    remade = _check(client, alice, gallery, queries=6, seed=11)
    assert remade.status_code == 201 and remade.json()["id"] != check["id"]
    assert _pairs(client, alice, remade.json()) == pairs


def test_a_check_needs_a_ready_gallery_and_a_dataset(
    client: TestClient, alice: Headers, market: Json, make_gallery: MakeGallery
) -> None:
    queued = client.post(
        "/v1/galleries",
        json={
            "dataset_id": market["id"],
            "model_name": "reid-alice",
            "model_version": "1",
            "gpus": 0,
        },
        headers=alice,
    ).json()
    response = _check(client, alice, queued)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "gallery_not_ready"
    assert _check(client, alice, {"id": str(uuid.uuid4())}).status_code == 404
    bad = client.post("/v1/checks", json={"gallery_id": queued["id"], "queries": 0}, headers=alice)
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["field"] == "body.queries"

    gallery = make_gallery("1", VERSION_1)
    check = _check(client, alice, gallery).json()
    assert client.delete(f"/v1/datasets/{market['id']}", headers=alice).status_code == 204
    # the answers belonged to the dataset's images: its checks went with it
    assert client.get(f"/v1/checks/{check['id']}", headers=alice).status_code == 404
    gone = _check(client, alice, gallery)
    assert gone.status_code == 409
    assert gone.json()["error"]["code"] == "dataset_gone"


# ----------------------------------------------------------------------------------------------
# answers and the estimate
# ----------------------------------------------------------------------------------------------


def test_answers_estimate_precision_with_wilson_intervals_logged_to_the_versions_run(
    client: TestClient,
    alice: Headers,
    make_gallery: MakeGallery,
    registry: tuple[str, dict[str, str]],
) -> None:
    store, runs = registry
    check = _check(client, alice, make_gallery("1", VERSION_1), queries=10).json()
    pairs = _pairs(client, alice, check)
    assert sum(p["at_rank_1"] for p in pairs) == 10  # every crop is a query

    answered: Json = {}
    for pair in pairs:
        response = _answer(client, alice, check, pair["index"], _truth(pair))
        assert response.status_code == 200, response.text
        answered = response.json()
        assert answered["mlflow_run_id"] == runs["1"] and answered["mlflow_error"] is None
    assert answered["answered"] == len(pairs)

    # by hand (VERSION_1): 7 of the 10 rank-1 crops show the query's person; p = 0.7, Wilson's
    # 95% interval [0.3968, 0.8922]
    p1 = answered["precision_at_1"]
    assert (p1["same"], p1["different"], p1["unsure"], p1["answers"]) == (7, 3, 0, 10)
    assert p1["estimate"] == pytest.approx(0.7)
    assert (p1["low"], p1["high"]) == pytest.approx((0.39677, 0.89221), abs=5e-5)
    # precision at 5: the truth of each query's drawn-rank pair
    drawn = [_truth(p) for p in pairs if p["at_rank_5"]]
    p5 = answered["precision_at_5"]
    assert (p5["same"], p5["different"], p5["answers"]) == (
        drawn.count("same"),
        drawn.count("different"),
        10,
    )
    assert p5["estimate"] == pytest.approx(drawn.count("same") / 10)
    assert (p5["low"], p5["high"]) == pytest.approx(wilson_interval(drawn.count("same"), 10))
    assert client.get(f"/v1/checks/{check['id']}", headers=alice).json() == {
        k: v for k, v in answered.items() if not k.startswith("mlflow_")
    }

    # unsure is left out and counted apart: (4, c2)'s rank-1 pair, the one right of four among
    # people 4 and 5, is not shown by any other query at rank 1 -> 6 of 9, [0.3542, 0.8794]
    right = next(
        p
        for p in pairs
        if p["at_rank_1"] and _person(p["query"]["path"]) == 4 and _truth(p) == "same"
    )
    unsure = _answer(client, alice, check, right["index"], "unsure").json()
    p1 = unsure["precision_at_1"]
    assert (p1["same"], p1["different"], p1["unsure"], p1["answers"]) == (6, 3, 1, 9)
    assert p1["estimate"] == pytest.approx(6 / 9)
    assert (p1["low"], p1["high"]) == pytest.approx((0.35420, 0.87941), abs=5e-5)
    assert unsure["answered"] == len(pairs)  # an unsure answer is an answer

    # what the version's run holds: each metric's last value, at step = pairs answered
    client_ml = MlflowClient(tracking_uri=store)
    metrics = client_ml.get_run(runs["1"]).data.metrics
    assert {k: metrics[k] for k in HUMAN} == pytest.approx(
        {
            "human/precision_at_1": 6 / 9,
            "human/precision_at_1_low": p1["low"],
            "human/precision_at_1_high": p1["high"],
            "human/precision_at_5": unsure["precision_at_5"]["estimate"],
            "human/precision_at_5_low": unsure["precision_at_5"]["low"],
            "human/precision_at_5_high": unsure["precision_at_5"]["high"],
            "human/answers": float(len(pairs)),
        }
    )
    history = client_ml.get_metric_history(runs["1"], "human/answers")
    assert len(history) == len(pairs) + 1  # one value per answer, all at step 0
    assert {m.step for m in history} == {0}
    assert not set(HUMAN) & set(client_ml.get_run(runs["2"]).data.metrics)  # not version 2's

    # undo: the pair is unanswered again, the estimate and the run follow
    undone = client.delete(f"/v1/checks/{check['id']}/pairs/{right['index']}/answer", headers=alice)
    assert undone.status_code == 200, undone.text
    assert undone.json()["answered"] == len(pairs) - 1
    assert undone.json()["precision_at_1"]["unsure"] == 0
    assert undone.json()["precision_at_1"]["answers"] == 9
    assert _pairs(client, alice, check)[right["index"]]["answer"] is None
    metrics = client_ml.get_run(runs["1"]).data.metrics
    assert metrics["human/answers"] == len(pairs) - 1
    assert metrics["human/precision_at_1"] == pytest.approx(6 / 9)  # the pair is unanswered

    # refusals
    assert _answer(client, alice, check, len(pairs), "same").status_code == 404
    missing = _answer(client, alice, check, len(pairs), "same").json()["error"]
    assert missing["code"] == "pair_not_found"
    assert f"its pairs are 0 to {len(pairs) - 1}" in missing["message"]
    wrong = _answer(client, alice, check, 0, "maybe")
    assert wrong.status_code == 422
    assert wrong.json()["error"]["details"][0]["field"] == "body.answer"


def test_a_retrained_versions_check_reuses_the_answers_on_the_same_pairs(
    client: TestClient, alice: Headers, make_gallery: MakeGallery
) -> None:
    first = _check(client, alice, make_gallery("1", VERSION_1), queries=10).json()
    first_pairs = _pairs(client, alice, first)
    for pair in first_pairs:
        assert _answer(client, alice, first, pair["index"], _truth(pair)).status_code == 200

    # version 2's check of the same dataset: the first check's seed, so the same queries
    second = _check(client, alice, make_gallery("2", VERSION_2)).json()
    assert (second["seed"], second["queries"]) == (first["seed"], 10)
    assert second["model_version"] == "2"
    second_pairs = _pairs(client, alice, second)
    assert [p["query"] for p in second_pairs if p["at_rank_1"]] == [
        p["query"] for p in first_pairs if p["at_rank_1"]
    ]
    known = {_key(p): _truth(p) for p in first_pairs}
    reused = [p for p in second_pairs if _key(p) in known]
    # people 1-3 find the same crops; both crops of person 4 find each other, a pair version 1
    # showed ((4, c2) -> (4, c1)); person 5's two crops find each other, a pair version 1
    # showed only if a drawn rank (2) of one of them picked it
    five = _key(
        {
            "query": {"path": "bounding_box_test/0005_c1s1_00051_00.jpg"},
            "candidate": {"path": "bounding_box_test/0005_c2s1_00052_00.jpg"},
        }
    )
    assert sum(p["at_rank_1"] for p in reused) == 8 + 2 * (five in known)
    for pair in second_pairs:
        assert pair["answer"] == known.get(_key(pair))
    shown = client.get(f"/v1/checks/{second['id']}", headers=alice).json()
    assert shown["answered"] == len(reused)
    p1 = shown["precision_at_1"]
    n = 8 + 2 * (five in known)
    assert (p1["same"], p1["different"], p1["answers"]) == (n, 0, n)  # all right: it improved
    assert (p1["low"], p1["high"]) == pytest.approx(wilson_interval(n, n))

    # an answer is the pair's: changed in the second check, the first sees it too
    shared = next(p for p in reused if p["at_rank_1"])
    changed = _answer(client, alice, second, shared["index"], "different").json()
    assert changed["precision_at_1"]["different"] >= 1
    in_first = next(p for p in _pairs(client, alice, first) if _key(p) == _key(shared))
    assert in_first["answer"] == "different"


def test_other_owners_see_no_check_and_answer_nothing(
    client: TestClient, alice: Headers, bob: Headers, make_gallery: MakeGallery
) -> None:
    gallery = make_gallery("1", VERSION_1)
    check = _check(client, alice, gallery).json()
    assert _check(client, bob, gallery).status_code == 404  # alice's gallery
    assert client.get("/v1/checks", headers=bob).json()["items"] == []
    base = f"/v1/checks/{check['id']}"
    for method, url in (
        ("GET", base),
        ("GET", f"{base}/pairs"),
        ("DELETE", f"{base}/pairs/0/answer"),
        ("DELETE", base),
    ):
        response = client.request(method, url, headers=bob)
        assert response.status_code == 404, (method, url)
        assert response.json()["error"]["message"] == f"check {check['id']} not found"
    assert _answer(client, bob, check, 0, "same").status_code == 404
    assert client.get("/v1/checks/not-a-uuid", headers=alice).status_code == 404
    shown = client.get(base, headers=alice).json()
    assert shown["answered"] == 0  # bob's tries left nothing


def test_an_answer_is_kept_when_mlflow_is_down(
    tmp_path: Path,
    client: TestClient,
    alice: Headers,
    settings: Settings,
    make_gallery: MakeGallery,
) -> None:
    check = _check(client, alice, make_gallery("1", VERSION_1)).json()
    down = settings.model_copy(
        update={"mlflow": TrackingSettings(tracking_uri="http://127.0.0.1:9", request_timeout_s=1)}
    )
    with TestClient(create_app(down)) as other:
        response = _answer(other, alice, check, 0, "same")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mlflow_run_id"] is None
    assert "(MLflow at http://127.0.0.1:9) did not answer" in body["mlflow_error"]
    pairs = _pairs(client, alice, check)
    assert pairs[0]["answer"] == "same"
    # (the other pairs of the same two crops, when another query showed them, are answered too)
    assert body["answered"] == sum(_key(p) == _key(pairs[0]) for p in pairs) >= 1


def test_the_checks_api_is_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths["/v1/checks"]) == {"get", "post"}
    assert set(paths["/v1/checks/{check_id}/pairs/{index}/answer"]) == {"put", "delete"}
    put = paths["/v1/checks/{check_id}/pairs/{index}/answer"]["put"]
    assert "human/precision_at_1" in put["description"]
    assert {"404", "422"} <= set(put["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["PairAnswerIn"]["properties"]["answer"]["$ref"].endswith("PairAnswerValue")
    assert schemas["PairAnswerValue"]["enum"] == ["same", "different", "unsure"]
    assert "Wilson" in schemas["PrecisionOut"]["description"]
