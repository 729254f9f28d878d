"""End to end: the API submits, a real Celery worker (solo pool, a subprocess) supervises the real
trainer, on Redis and a fresh PostgreSQL database migrated by Alembic; the trainer logs to a real
MLflow server (PostgreSQL backend, proxied artifacts), whose registry the API reads.

One worker serves every test of the module, on a queue of its own. The data set is tiny and
synthetic, registered through the API; each run takes seconds on one CPU thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reid_core.data import generate_synthetic_market
from service.app import create_app
from service.core import migrate
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.settings import JobBounds, Settings, TrackingSettings
from tests.helpers import TINY_JOB_CONFIG, mlflow_server, postgres_database, require_postgres
from tests.worker.conftest import fast_worker_settings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("REID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

TINY = TINY_JOB_CONFIG

FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def _check_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        pytest.skip(
            f"Redis at {REDIS_URL} does not answer ({type(exc).__name__}); start it or set "
            "REID_TEST_REDIS_URL"
        )
    finally:
        client.close()


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    admin_url = require_postgres()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"reid_worker_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with (
        postgres_database("reid_mlflow_test") as backend,
        mlflow_server(tmp_path_factory.mktemp("mlflow"), backend) as url,
    ):
        yield url


@dataclass
class Stack:
    settings: Settings
    client: TestClient
    headers: dict[str, str]
    dataset_id: str
    worker_log: Path
    dataset_root: Path

    def submit(self, config: dict[str, Any], **fields: Any) -> str:
        body = {
            "dataset_id": self.dataset_id,
            "config": {**TINY, **config},
            "gpus": 0,
            "queue": self.settings.queues[1],
            **fields,
        }
        response = self.client.post("/v1/jobs", json=body, headers=self.headers)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def events(self, job_id: str) -> list[dict[str, Any]]:
        response = self.client.get(f"/v1/jobs/{job_id}/events", headers=self.headers)
        assert response.status_code == 200
        events: list[dict[str, Any]] = response.json()
        return events

    def output_dir(self, job_id: str) -> Path:
        return self.settings.jobs_path / job_id

    def wait(
        self, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            if time.monotonic() > deadline:
                log = self.worker_log.read_text(errors="replace")[-3000:]
                pytest.fail(
                    f"job {job_id} stuck in {job['state']} ({job['reason']}); worker:\n{log}"
                )
            time.sleep(0.1)

    def wait_final(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait(job_id, lambda j: j["state"] in FINAL, timeout)


def _wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def stack(
    database_url: str, mlflow_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    _check_redis()
    tmp = tmp_path_factory.mktemp("worker_e2e")
    queue = f"wtest{uuid.uuid4().hex[:8]}"
    roots = tmp / "roots"
    settings = Settings(
        _env_file=None,
        data_dir=tmp / "var",
        database_url=database_url,
        dataset_roots=[roots],
        jobs_dir=tmp / "jobs",
        queues=["default", queue],
        job_bounds=JobBounds(max_epochs=100, max_retries=3),
        worker=fast_worker_settings(
            broker_url=REDIS_URL,
            gpus="",
            poll_interval_s=0.2,
            heartbeat_interval_s=1,
            kill_grace_s=30,
        ),
        mlflow=TrackingSettings(tracking_uri=mlflow_url, request_timeout_s=5),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env.update(
        {
            "REID_DATA_DIR": str(settings.data_dir),
            "REID_DATABASE_URL": database_url,
            "REID_QUEUES": f'["default", "{queue}"]',
            "REID_WORKER__BROKER_URL": REDIS_URL,
            "REID_WORKER__GPUS": "",
            "REID_WORKER__POLL_INTERVAL_S": "0.2",
            "REID_WORKER__HEARTBEAT_INTERVAL_S": "1",
            "REID_WORKER__KILL_GRACE_S": "30",
            "REID_MLFLOW__TRACKING_URI": mlflow_url,
            "REID_MLFLOW__REQUEST_TIMEOUT_S": "5",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            # No cached ImageNet weights: model.pretrained=imagenet fails at run time.
            "TORCH_HOME": str(tmp / "torch_home"),
        }
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
            env=env,
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
            roots / "synthetic", num_identities=8, images_per_identity=4, height=96, width=48
        )
        app = create_app(settings)
        with session_scope(app.state.session_factory) as session:
            _, token = create_api_key(session, "alice")
        headers = {"Authorization": f"Bearer {token}"}
        with TestClient(app) as client:
            response = client.post(
                "/v1/datasets", json={"name": "synthetic", "path": str(data)}, headers=headers
            )
            assert response.status_code == 201, response.text
            yield Stack(settings, client, headers, response.json()["id"], worker_log, data)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        _drop_queue_keys(queue)


def _drop_queue_keys(queue: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        keys = list(client.scan_iter(f"*{queue}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _states(stack: Stack, job_id: str) -> list[str]:
    return [e["to_state"] for e in stack.events(job_id)]


def _runs_of(stack: Stack, job_id: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(stack.settings.mlflow.experiment)
    return list(client.search_runs([experiment.experiment_id], f"tags.`reid.job_id` = '{job_id}'"))


def test_submitted_job_runs_to_success(stack: Stack) -> None:
    job_id = stack.submit({"schedule.epochs": 2, "schedule.max_steps_per_epoch": 2})
    job = stack.wait_final(job_id)
    assert job["state"] == "SUCCEEDED", job["reason"]
    assert _states(stack, job_id) == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    reasons = [e["reason"] for e in stack.events(job_id)]
    assert reasons[1].startswith(f"picked up by {stack.settings.queues[1]}@")
    assert "trainer started" in reasons[2]
    assert job["progress"] == 1.0
    assert job["epoch"] == 2
    assert job["step"] == 4
    assert "mAP" in job["metrics"]["eval"]
    assert set(job["metrics"]["losses"]) >= {"total"}
    out = stack.output_dir(job_id)
    assert (out / "model_final.pt").is_file()
    assert (out / "job_config.yaml").is_file()
    assert "final model saved" in (out / "process.log").read_text()

    # MLflow: one finished run with the job's metrics, the model registered as a version
    (run,) = _runs_of(stack, job_id)
    assert job["mlflow_run_id"] == run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/mAP"] == pytest.approx(job["metrics"]["eval"]["mAP"])
    assert job["warnings"] == []
    assert (job["model_name"], job["model_version"]) == ("reid-alice", "1")
    version = stack.client.get("/v1/models/reid-alice/versions/1", headers=stack.headers).json()
    assert version["job_id"] == job_id and version["run_id"] == run.info.run_id

    # ... and what a user does with it: load the embedder from the registry, embed an image
    import mlflow

    mlflow.set_tracking_uri(stack.settings.mlflow_tracking_uri)
    embedder = mlflow.pytorch.load_model("models:/reid-alice@best")
    image = next(stack.dataset_root.rglob("*.jpg"))
    feature = embedder.embed_files([image])
    assert feature.shape == (1, embedder.feature_dim)
    assert abs(float((feature**2).sum()) - 1.0) < 1e-5


def test_cancel_a_running_job(stack: Stack) -> None:
    job_id = stack.submit({"schedule.epochs": 60, "schedule.max_steps_per_epoch": 4})
    stack.wait(job_id, lambda j: j["state"] == "RUNNING" and (j["step"] or 0) >= 1)
    response = stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=stack.headers)
    assert response.status_code == 202, response.text
    job = stack.wait_final(job_id)
    assert job["state"] == "CANCELLED", job["reason"]
    assert job["reason"] == "cancelled: the trainer saved a checkpoint and stopped"
    assert _states(stack, job_id)[-2:] == ["CANCELLING", "CANCELLED"]
    assert list((stack.output_dir(job_id) / "checkpoints").glob("step_*.pt"))
    (run,) = _runs_of(stack, job_id)
    assert run.info.status == "KILLED"


def test_killed_trainer_is_restarted_and_resumes(stack: Stack) -> None:
    # no max_retries, no max_restarts: the service's default restart policy
    job_id = stack.submit({"schedule.epochs": 4, "schedule.max_steps_per_epoch": 4})
    out = stack.output_dir(job_id)
    _wait_for_file(out / "checkpoints" / "last_checkpoint")  # epoch 1 saved
    pid = int((out / "trainer.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    job = stack.wait_final(job_id)
    assert job["state"] == "SUCCEEDED", job["reason"]
    assert _states(stack, job_id) == [
        "QUEUED", "STARTING", "RUNNING", "RETRYING", "STARTING", "RUNNING", "SUCCEEDED",
    ]  # fmt: skip
    retrying = stack.events(job_id)[3]["reason"]
    assert "killed by SIGKILL" in retrying and "restart 1 of 3" in retrying
    assert (job["restarts"], job["max_restarts"], job["retries"]) == (1, 3, 0)
    assert "resumed from" in (out / "train.log").read_text()
    assert (out / "model_final.pt").is_file()
    # two attempts, one MLflow run, every epoch in it
    (run,) = _runs_of(stack, job_id)
    assert run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    history = MlflowClient(stack.settings.mlflow_tracking_uri).get_metric_history(
        run.info.run_id, "loss/total"
    )
    assert {m.step for m in history} == {1, 2, 3, 4}


def test_config_rejected_at_run_time_fails_the_job(stack: Stack) -> None:
    # Valid for the API; at run time no ImageNet weights are found (TORCH_HOME is empty).
    job_id = stack.submit({"model.pretrained": "imagenet"}, max_retries=2)
    job = stack.wait_final(job_id)
    assert job["state"] == "FAILED"
    assert job["reason"].startswith("the configuration was rejected (exit code 2 BAD_CONFIG): ")
    assert "weights" in job["reason"]
    assert job["retries"] == 0
    assert _states(stack, job_id) == ["QUEUED", "STARTING", "RUNNING", "FAILED"]
