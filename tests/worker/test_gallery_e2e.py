"""End to end: a model trained by a job, a gallery built by a real Celery worker, searched.

The API (in-process) and a solo-pool Celery worker (a subprocess, as in test_celery.py) share
Redis, a fresh PostgreSQL database migrated by Alembic and a real MLflow server. A tiny job trains
and registers ``reid-alice`` version 1; ``POST /v1/galleries`` sends the build to the worker,
whose task runs ``python -m worker.build_gallery``; the search then answers from the index that
process saved. Skips, saying why, when Redis or PostgreSQL do not answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reid_core.data import generate_synthetic_market
from service.app import create_app
from service.core import migrate
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.folders import BUILD_LOG, gallery_dir
from service.core.settings import JobBounds, Settings, TrackingSettings
from tests.helpers import TINY_JOB_CONFIG, mlflow_server, postgres_database
from tests.worker.conftest import fast_worker_settings
from tests.worker.test_celery import REDIS_URL, _check_redis, _drop_queue_keys

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _worker_env(settings: Settings, queue: str, torch_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env.update(
        {
            "REID_DATA_DIR": str(settings.data_dir),
            "REID_DATABASE_URL": settings.database_url,
            "REID_QUEUES": f'["default", "{queue}"]',
            "REID_WORKER__BROKER_URL": REDIS_URL,
            "REID_WORKER__GPUS": "",
            "REID_WORKER__POLL_INTERVAL_S": "0.2",
            "REID_WORKER__HEARTBEAT_INTERVAL_S": "1",
            "REID_MLFLOW__TRACKING_URI": settings.mlflow_tracking_uri,
            "REID_MLFLOW__REQUEST_TIMEOUT_S": "5",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TORCH_HOME": str(torch_home),
        }
    )
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Path, Path]]:
    """``(settings, worker log, dataset folder)`` of a stack whose Celery worker listens on a
    queue of its own (``<queue>.cpu``)."""
    _check_redis()
    tmp = tmp_path_factory.mktemp("gallery_e2e")
    queue = f"gtest{uuid.uuid4().hex[:8]}"
    (tmp / "mlflow").mkdir()
    with (
        postgres_database("reid_gallery_test") as database_url,
        postgres_database("reid_gallery_mlflow") as mlflow_backend,
        mlflow_server(tmp / "mlflow", mlflow_backend) as mlflow_url,
    ):
        migrate.upgrade(database_url)
        settings = Settings(
            _env_file=None,
            data_dir=tmp / "var",
            database_url=database_url,
            dataset_roots=[tmp / "roots"],
            queues=["default", queue],
            job_bounds=JobBounds(max_epochs=10),
            worker=fast_worker_settings(
                broker_url=REDIS_URL, gpus="", poll_interval_s=0.2, heartbeat_interval_s=1
            ),
            mlflow=TrackingSettings(tracking_uri=mlflow_url, request_timeout_s=5),
        )
        worker_log = tmp / "celery_worker.log"
        with worker_log.open("wb") as log_file:
            worker = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                    "--pool", "solo", "--concurrency", "1", "--queues", f"{queue}.cpu",
                    "--hostname", f"{queue}@%h", "--loglevel", "INFO",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                ],
                cwd=REPO_ROOT,
                env=_worker_env(settings, queue, tmp / "torch_home"),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while b"ready." not in worker_log.read_bytes():
                assert worker.poll() is None, worker_log.read_text(errors="replace")
                assert time.monotonic() < deadline, "the Celery worker did not start"
                time.sleep(0.1)
            data = generate_synthetic_market(
                tmp / "roots" / "synthetic",
                num_identities=6,
                images_per_identity=4,
                height=96,
                width=48,
            )
            yield settings, worker_log, data
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            _drop_queue_keys(queue)


def _wait(
    client: TestClient,
    url: str,
    headers: dict[str, str],
    final: set[str],
    worker_log: Path,
    timeout_s: float = 90,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = client.get(url, headers=headers).json()
        if body["state"] in final:
            return body
        if time.monotonic() > deadline:
            tail = worker_log.read_text(errors="replace")[-3000:]
            pytest.fail(f"{url} stuck in {body['state']} ({body['reason']}); worker:\n{tail}")
        time.sleep(0.2)


def test_a_worker_builds_the_gallery_and_the_search_answers(
    stack: tuple[Settings, Path, Path],
) -> None:
    settings, worker_log, data = stack
    queue = settings.queues[1]
    app = create_app(settings)
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "alice")
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        dataset = client.post(
            "/v1/datasets", json={"name": "synthetic", "path": str(data)}, headers=headers
        ).json()

        # a model, trained and registered by a job (ResNet-18: a few steps from scratch give
        # features that tell images apart; the tiny MobileNet's are all alike)
        config = {**TINY_JOB_CONFIG, "model.backbone": "resnet18", "schedule.epochs": 1}
        job = client.post(
            "/v1/jobs",
            json={"dataset_id": dataset["id"], "config": config, "gpus": 0, "queue": queue},
            headers=headers,
        ).json()
        job = _wait(client, f"/v1/jobs/{job['id']}", headers, {"SUCCEEDED", "FAILED"}, worker_log)
        assert job["state"] == "SUCCEEDED", job["reason"]
        assert (job["model_name"], job["model_version"]) == ("reid-alice", "1")

        # the gallery, built by the worker
        body = {
            "dataset_id": dataset["id"],
            "model_name": "reid-alice",
            "model_version": "best",
            "gpus": 0,
            "queue": queue,
        }
        created = client.post("/v1/galleries", json=body, headers=headers)
        assert created.status_code == 202, created.text
        gallery_id = created.json()["id"]
        gallery = _wait(
            client, f"/v1/galleries/{gallery_id}", headers, {"READY", "FAILED"}, worker_log
        )
        assert gallery["state"] == "READY", gallery["reason"]
        gallery_images = sorted((data / "bounding_box_test").glob("*.jpg"))
        assert gallery["image_count"] == gallery["images_done"] == len(gallery_images)
        assert gallery["progress"] == 1.0
        assert gallery["model_version"] == "1"
        assert gallery["worker_id"].startswith(f"{queue}@")
        folder = gallery_dir(settings, uuid.UUID(gallery_id))
        build_log = (folder / BUILD_LOG).read_text()
        assert "-m worker.build_gallery" in build_log and "READY" in build_log

        # the search answers from the index the worker's builder saved
        image = gallery_images[5]
        with image.open("rb") as f:
            found = client.post(
                f"/v1/galleries/{gallery_id}/search",
                params={"k": 3},
                files={"image": (image.name, f, "image/jpeg")},
                headers=headers,
            )
        assert found.status_code == 200, found.text
        hits = found.json()["hits"]
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert hits[0]["path"] == f"bounding_box_test/{image.name}"
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

        assert client.delete(f"/v1/galleries/{gallery_id}", headers=headers).status_code == 204
        assert not folder.exists()
