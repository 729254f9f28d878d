"""A Celery worker SIGKILLed in the middle of a job, with real processes (a private Redis and
PostgreSQL, the dispatcher, the embedded MLflow store): its trainer checkpoints and stops (it gets
SIGTERM when its worker dies), the reaper sees the heartbeat go stale and sends the job again, a
second worker resumes it from the checkpoint and finishes it; MLflow holds one run for the job,
with every epoch once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.app import create_app
from tests.reliability.servers import RedisServer, wait_until
from tests.reliability.stack import (
    FINAL_STATES,
    Child,
    ServiceStack,
    job_body,
    service_stack,
    wait_for_job,
)
from tests.reliability.test_restarts import Api
from tests.service.conftest import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 5


@pytest.fixture
def stack(tmp_path: Path, own_database: str, own_redis: RedisServer) -> Iterator[ServiceStack]:
    # A heartbeat older than 3 s means the worker is gone.
    with service_stack(tmp_path, own_database, own_redis.url, heartbeat_timeout_s=3) as stack:
        yield stack


def _worker(stack: ServiceStack, name: str) -> Child:
    worker = stack.spawn(
        name, "-m", "worker", "run", "--queues", "cpu", "--gpus", "none",
        "--hostname", f"{name}@%h",
    )  # fmt: skip
    wait_until(
        lambda: b"ready." in worker.log.read_bytes() or not worker.running(),
        f"the Celery worker {name} to start",
    )
    assert worker.running(), worker.tail()
    return worker


def test_a_killed_worker_s_job_resumes_elsewhere_in_the_same_run(stack: ServiceStack) -> None:
    first = _worker(stack, "worker-a")
    stack.start_dispatcher()
    with TestClient(create_app(stack.settings)) as client:
        api = Api(client, stack.api_key())
        dataset_id = api.register(stack.synthetic_dataset())
        job_id = api.submit({**job_body(dataset_id, epochs=EPOCHS, steps=3), "max_retries": 1})
        out = stack.settings.jobs_path / job_id
        wait_until(
            lambda: (out / "checkpoints" / "last_checkpoint").exists(),
            "the first checkpoint",
            timeout=120,
        )
        assert api.job(job_id)["state"] == "RUNNING"

        first.kill()  # SIGKILL to the worker (its trainer is in a process group of its own)
        wait_for_job(api.job, job_id, lambda j: j["state"] == "RETRYING", "RETRYING", stack)
        second = _worker(stack, "worker-b")

        job = wait_for_job(
            api.job, job_id, lambda j: j["state"] in FINAL_STATES, "the end", stack, timeout=240
        )
        assert job["state"] == "SUCCEEDED", job["reason"]
        assert api.states(job_id) == [
            "QUEUED", "STARTING", "RUNNING", "RETRYING", "STARTING", "RUNNING", "SUCCEEDED",
        ]  # fmt: skip
        events = client.get(f"/v1/jobs/{job_id}/events", headers=api.headers).json()
        assert "heartbeat" in events[3]["reason"]
        assert "worker-b@" in events[4]["reason"]
        assert second.running()

    # The first trainer saved where it was stopped; the second one started from there.
    assert "resumed from" in (out / "train.log").read_text()
    # One MLflow run for the job, finished, with each epoch's metrics.
    client_ml = MlflowClient(stack.settings.mlflow_tracking_uri)
    experiment = client_ml.get_experiment_by_name(stack.settings.mlflow.experiment)
    runs = client_ml.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`reid.job_id` = '{job_id}'"
    )
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert job["mlflow_run_id"] == runs[0].info.run_id
    steps = {m.step for m in client_ml.get_metric_history(runs[0].info.run_id, "loss/total")}
    assert steps == set(range(1, EPOCHS + 1))
