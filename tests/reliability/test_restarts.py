"""Restarts under load, with real processes: a Celery worker (``python -m worker run``) training
tiny jobs, the dispatcher (``python -m worker dispatcher``), the API, a private Redis broker and a
private PostgreSQL database.

* Redis restarted (without persistence) while one job runs and two wait in it: every message is
  lost, yet the running job finishes and the dispatcher sends the waiting ones again; each job runs
  exactly once.
* The API killed while jobs run: they go on to SUCCEEDED, and a new API process serves them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.app import create_app
from tests.reliability.servers import RedisServer, free_port, wait_until
from tests.reliability.stack import (
    FINAL_STATES,
    ServiceStack,
    job_body,
    service_stack,
    wait_for_job,
)
from tests.service.conftest import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ONE_RUN = ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]


def _waiting_messages(broker: redis.Redis, queue: str) -> int:
    """Messages waiting in the queue's lists (one per priority level)."""
    return sum(
        int(broker.llen(key))
        for key in broker.scan_iter(f"{queue}*")
        if broker.type(key) == b"list"
    )


class Api:
    """The jobs API over any client (the in-process app or a uvicorn process)."""

    def __init__(self, client: httpx.Client, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    def submit(self, body: dict[str, Any]) -> str:
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
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()
        return events

    def states(self, job_id: str) -> list[str]:
        return [e["to_state"] for e in self.events(job_id)]

    def register(self, folder: Path) -> str:
        response = self.client.post(
            "/v1/datasets", json={"name": "synthetic", "path": str(folder)}, headers=self.headers
        )
        assert response.status_code == 201, response.text
        dataset_id: str = response.json()["id"]
        return dataset_id


@pytest.fixture
def stack(tmp_path: Path, own_database: str, own_redis: RedisServer) -> Iterator[ServiceStack]:
    # Jobs sent more than a second ago and still waiting are sent again by the dispatcher.
    with service_stack(tmp_path, own_database, own_redis.url, requeue_after_s=1) as stack:
        yield stack


def test_redis_restart_loses_no_job(stack: ServiceStack, own_redis: RedisServer) -> None:
    stack.start_worker()
    with TestClient(create_app(stack.settings)) as client:
        api = Api(client, stack.api_key())
        dataset_id = api.register(stack.synthetic_dataset())
        running = api.submit(job_body(dataset_id, epochs=6))
        waiting = [api.submit(job_body(dataset_id, epochs=1)) for _ in range(2)]
        wait_for_job(api.job, running, lambda j: j["state"] == "RUNNING", "RUNNING", stack)
        broker = redis.Redis.from_url(own_redis.url)
        assert _waiting_messages(broker, "cpu") == 2  # the two others wait in Redis

        own_redis.restart()
        assert broker.dbsize() == 0, "the restarted Redis still holds messages"
        broker.close()
        assert api.job(running)["state"] == "RUNNING"  # the restart happened mid-job

        done = wait_for_job(
            api.job, running, lambda j: j["state"] in FINAL_STATES, "the end", stack
        )
        assert done["state"] == "SUCCEEDED", done["reason"]
        assert [api.job(j)["state"] for j in waiting] == ["QUEUED", "QUEUED"]

        dispatcher = stack.start_dispatcher()
        for job_id in waiting:
            job = wait_for_job(
                api.job, job_id, lambda j: j["state"] in FINAL_STATES, "the end", stack
            )
            assert job["state"] == "SUCCEEDED", job["reason"]
        for job_id in [running, *waiting]:
            assert api.states(job_id) == ONE_RUN  # each ran once, whatever was sent twice
    assert "re-sent" in dispatcher.log.read_text()


def test_api_restart_while_jobs_run(stack: ServiceStack) -> None:
    stack.start_worker()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    first = stack.start_api(port)
    with httpx.Client(base_url=base, timeout=30) as client:
        api = Api(client, stack.api_key())
        dataset_id = api.register(stack.synthetic_dataset())
        jobs = [api.submit(job_body(dataset_id, epochs=2)) for _ in range(2)]
        wait_for_job(api.job, jobs[0], lambda j: j["state"] == "RUNNING", "RUNNING", stack)

        first.kill()  # the API crashes
        with pytest.raises(httpx.TransportError):
            client.get("/healthz")
        # Training goes on without it: the first job ends, the second one starts.
        wait_until(
            lambda: (stack.settings.jobs_path / jobs[1] / "progress.json").exists(),
            "the second job to start while the API is down",
        )

        stack.start_api(port)
        for job_id in jobs:
            job = wait_for_job(
                api.job, job_id, lambda j: j["state"] in FINAL_STATES, "the end", stack
            )
            assert job["state"] == "SUCCEEDED", job["reason"]
            assert job["progress"] == 1.0
            assert api.states(job_id) == ONE_RUN
            assert (stack.settings.jobs_path / job_id / "model_final.pt").is_file()
