"""MLflow unreachable while jobs train, with real processes (a Celery worker, a private Redis and
PostgreSQL, a real ``mlflow server`` started late or never):

* MLflow comes up in the middle: the job trains on regardless, says so in its warnings, and when
  MLflow answers the trainer catches up: one run with every epoch, the model registered.
* MLflow never comes: the job still SUCCEEDS and its warnings name what MLflow never received.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.app import create_app
from service.core.settings import TrackingSettings
from tests.helpers import free_port, mlflow_server
from tests.reliability.servers import RedisServer
from tests.reliability.stack import FINAL_STATES, job_body, service_stack, wait_for_job
from tests.reliability.test_restarts import Api
from tests.service.conftest import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 4


def test_mlflow_down_then_up_the_job_catches_up(
    tmp_path: Path, own_database: str, own_redis: RedisServer
) -> None:
    port = free_port()
    tracking = TrackingSettings(
        tracking_uri=f"http://127.0.0.1:{port}",
        request_timeout_s=2,
        retry_after_s=1,
        final_sync_s=180,
    )
    with service_stack(tmp_path, own_database, own_redis.url, tracking) as stack:
        stack.start_worker()
        with TestClient(create_app(stack.settings)) as client:
            api = Api(client, stack.api_key())
            dataset_id = api.register(stack.synthetic_dataset())
            job_id = api.submit(job_body(dataset_id, epochs=EPOCHS, steps=3))
            # training goes on while MLflow is down, and the job says so
            job = wait_for_job(api.job, job_id, lambda j: bool(j["warnings"]), "a warning", stack)
            assert job["state"] == "RUNNING"
            assert f"MLflow at http://127.0.0.1:{port} failed" in job["warnings"][0]
            assert "training goes on" in job["warnings"][0]

            backend = f"sqlite:///{tmp_path / 'mlflow-backend.db'}"
            (tmp_path / "mlflow").mkdir()
            with mlflow_server(tmp_path / "mlflow", backend, port=port) as url:
                job = wait_for_job(
                    api.job,
                    job_id,
                    lambda j: j["state"] in FINAL_STATES,
                    "the end",
                    stack,
                    timeout=300,
                )
                assert job["state"] == "SUCCEEDED", job["reason"]
                assert job["warnings"][-1].startswith("MLflow reachable again: caught up")
                assert (job["model_name"], job["model_version"]) == ("reid-alice", "1")
                ml = MlflowClient(url)
                run = ml.get_run(job["mlflow_run_id"])
                assert run.info.status == "FINISHED"
                history = ml.get_metric_history(run.info.run_id, "loss/total")
                assert {m.step for m in history} == set(range(1, EPOCHS + 1))


def test_mlflow_never_up_the_job_succeeds_and_says_what_was_lost(
    tmp_path: Path, own_database: str, own_redis: RedisServer
) -> None:
    tracking = TrackingSettings(
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        request_timeout_s=1,
        retry_after_s=3600,
        final_sync_s=0,
    )
    with service_stack(tmp_path, own_database, own_redis.url, tracking) as stack:
        stack.start_worker()
        with TestClient(create_app(stack.settings)) as client:
            api = Api(client, stack.api_key())
            dataset_id = api.register(stack.synthetic_dataset())
            job_id = api.submit(job_body(dataset_id, epochs=2))
            job = wait_for_job(
                api.job, job_id, lambda j: j["state"] in FINAL_STATES, "the end", stack
            )
    assert job["state"] == "SUCCEEDED", job["reason"]
    assert job["mlflow_run_id"] is None and job["model_version"] is None
    assert "never logged: the run; metrics of epochs 1-2; the final model" in job["warnings"][-1]
    assert (stack.settings.jobs_path / job_id / "model_final.pt").is_file()
