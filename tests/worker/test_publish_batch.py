"""The jobs of one group commit sent to a real Redis in one batch (one pipeline), and what a
failed batch leaves: every job of it waiting, its send stamp taken back for the dispatcher."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.core.broker import RUN_JOB_TASK, send_committed_jobs, stamp_send
from service.core.db import session_scope
from service.core.models import Job, JobState
from service.core.settings import Settings
from tests.worker.conftest import MakeJob, load_job

pytestmark = pytest.mark.integration

#: A database of the test Redis server of its own: no worker of another test reads it.
REDIS_URL = os.environ.get("REID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
BATCH_DB = f"{REDIS_URL}/14"


@pytest.fixture
def redis_db() -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(BATCH_DB, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        pytest.skip(f"Redis at {BATCH_DB} does not answer ({type(exc).__name__})")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of commands of each Redis pipeline executed (publishes go through them)."""
    import redis.client

    sizes: list[int] = []
    real = redis.client.Pipeline.execute

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(self.command_stack))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    return sizes


def _stamped(factory: sessionmaker[Session], make_job: MakeJob, n: int) -> list[Job]:
    """``n`` QUEUED jobs, committed stamped as sent (as a submission leaves them)."""
    jobs = []
    for _ in range(n):
        job_id = make_job()
        with session_scope(factory) as session:
            job = session.get(Job, job_id)
            assert job is not None
            stamp_send(job)
        jobs.append(load_job(factory, job_id))
    return jobs


def _messages(client: Any) -> list[dict[str, Any]]:
    return [json.loads(m) for key in client.keys("cpu*") for m in client.lrange(key, 0, -1)]


def _send(settings: Settings, factory: sessionmaker[Session], jobs: list[Job]) -> list[uuid.UUID]:
    with factory() as session:
        return [job.id for job in send_committed_jobs(settings, session, jobs)]


def test_a_group_s_jobs_go_in_one_pipeline(
    settings: Settings,
    factory: sessionmaker[Session],
    make_job: Callable[..., uuid.UUID],
    redis_db: Any,
    pipelines: list[int],
) -> None:
    settings.worker.broker_url = BATCH_DB
    first = _stamped(factory, make_job, 1)
    assert _send(settings, factory, first) == []  # the queue is declared with the first send
    redis_db.delete(*redis_db.keys("cpu*"))
    pipelines.clear()
    jobs = _stamped(factory, make_job, 3)
    assert _send(settings, factory, jobs) == []
    assert pipelines == [3]  # one LPUSH each, one round trip
    messages = _messages(redis_db)
    assert (
        sorted(m["headers"]["id"] == m["properties"]["correlation_id"] for m in messages)
        == [True] * 3
    )
    assert {m["headers"]["task"] for m in messages} == {RUN_JOB_TASK}
    assert sorted(m["headers"]["argsrepr"] for m in messages) == sorted(
        repr([str(job.id)]).replace('"', "'") for job in jobs
    )
    for job in jobs:
        stored = load_job(factory, job.id)
        assert stored.state is JobState.QUEUED and stored.heartbeat_at == job.heartbeat_at


def test_a_failed_batch_leaves_every_job_to_the_dispatcher(
    settings: Settings,
    factory: sessionmaker[Session],
    make_job: Callable[..., uuid.UUID],
    redis_db: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis.client
    import redis.exceptions

    def fail(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("connection reset by peer")

    settings.worker.broker_url = BATCH_DB
    first = _stamped(factory, make_job, 1)
    assert _send(settings, factory, first) == []  # the queue declared before the broker fails
    redis_db.delete(*redis_db.keys("cpu*"))
    monkeypatch.setattr(redis.client.Pipeline, "execute", fail)
    jobs = _stamped(factory, make_job, 3)
    assert _send(settings, factory, jobs) == [job.id for job in jobs]
    assert "a batch of 3 jobs did not reach the broker whole" in caplog.text
    assert _messages(redis_db) == []
    for job in jobs:
        stored = load_job(factory, job.id)
        assert stored.state is JobState.QUEUED and stored.heartbeat_at is None
        assert job.heartbeat_at is None and job.version == stored.version  # as committed
