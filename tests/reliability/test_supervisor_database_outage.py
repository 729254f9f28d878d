"""The job supervisor while its PostgreSQL database is away: the trainer keeps running, and the
job's end is written once the database is back (not lost, not left RUNNING for the reaper).

The supervisor runs in a thread of the test (as in a solo-pool worker) with a stand-in trainer
(:mod:`tests.reliability.gated_trainer`) that trains until the test releases it, so the trainer
ends while the database is still down.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_engine, session_scope
from service.core.folders import JobDir
from service.core.job_states import change_state
from service.core.models import Job, JobState
from service.core.settings import Settings
from tests.reliability.gated_trainer import RELEASE_FILE
from tests.reliability.servers import PostgresServer, wait_until
from tests.worker.conftest import event_states, fast_worker_settings, load_job
from worker.supervisor import Supervisor

pytestmark = pytest.mark.integration

GATED_TRAINER = Path(__file__).with_name("gated_trainer.py")


def gated_command(_gpus: int, config_path: Path) -> list[str]:
    return [sys.executable, str(GATED_TRAINER), "--config", str(config_path)]


class CountingSessionmaker(sessionmaker[Session]):
    """A session factory that counts the sessions asked of it (each one a try to reach the
    database)."""

    calls = 0

    def __call__(self, **local_kw: Any) -> Session:
        self.calls += 1
        return super().__call__(**local_kw)


class SupervisorThread(threading.Thread):
    """``Supervisor.run(job_id)`` in the background; keeps its result or its exception."""

    def __init__(self, supervisor: Supervisor, job_id: uuid.UUID) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.supervisor = supervisor
        self.job_id = job_id
        self.result: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.supervisor.run(self.job_id)
        except BaseException as exc:
            self.error = exc


@pytest.fixture
def settings(own_database: str, tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "var",
        database_url=own_database,
        jobs_dir=tmp_path / "jobs",
        worker=fast_worker_settings(),
    )


@pytest.fixture
def factory(settings: Settings) -> Iterator[CountingSessionmaker]:
    engine = make_engine(settings.database_url)
    yield CountingSessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def _queued_job(factory: sessionmaker[Session], settings: Settings) -> uuid.UUID:
    job_id = uuid.uuid4()
    with session_scope(factory) as session:
        job = Job(
            id=job_id,
            owner="alice",
            resolved_config={
                "runtime": {"output_dir": str(settings.jobs_path / str(job_id))},
                "fake": {"step_s": 0.02},
            },
            config_overrides={},
            gpus=0,
            priority=0,
            queue="default",
            max_retries=0,
            retries=0,
            timeout_minutes=60,
            progress=0.0,
            metrics={},
            cancel_requested=False,
        )
        change_state(session, job, JobState.QUEUED, "submitted by alice")
    return job_id


def _step(output_dir: Path) -> int:
    try:
        return int(json.loads((output_dir / "progress.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_training_goes_on_while_the_database_is_down_and_its_end_is_recorded_after(
    settings: Settings, factory: CountingSessionmaker, own_postgres: PostgresServer
) -> None:
    job_id = _queued_job(factory, settings)
    out = settings.jobs_path / str(job_id)
    supervisor = Supervisor(
        settings, factory, "test:1", command=gated_command, send=lambda _job: True
    )
    thread = SupervisorThread(supervisor, job_id)
    thread.start()
    try:
        wait_until(
            lambda: load_job(factory, job_id).state is JobState.RUNNING and _step(out) >= 1,
            "the job to run",
        )
        pid = int(JobDir(out).trainer_pid.read_text())

        own_postgres.stop()
        step_at_outage = _step(out)
        wait_until(
            lambda: _step(out) >= step_at_outage + 10,
            "the trainer to go on training while the database is down",
        )
        assert _alive(pid)
        assert thread.is_alive(), f"the supervisor gave up: {thread.error!r}"

        (out / RELEASE_FILE).touch()
        wait_until(lambda: not _alive(pid), "the trainer to finish")
        # The trainer ended while the database is down: the supervisor must keep trying to write
        # the outcome, not fail the task (which would leave the job RUNNING for the reaper to
        # run again).
        tries_at_end = factory.calls
        wait_until(
            lambda: factory.calls >= tries_at_end + 3 or not thread.is_alive(),
            "the supervisor to try the database again",
        )
        assert thread.is_alive(), (
            f"the supervisor gave up while the database was down: {thread.error!r}"
        )

        own_postgres.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the supervisor did not finish once the database was back"
    finally:
        (out / RELEASE_FILE).touch()  # whatever happened, let the trainer end
        if not own_postgres.running:
            own_postgres.start()
        thread.join(timeout=60)

    assert thread.error is None, repr(thread.error)
    assert thread.result == "SUCCEEDED"
    job = load_job(factory, job_id)
    assert job.state is JobState.SUCCEEDED, job.reason
    assert event_states(factory, job_id) == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert job.progress == 1.0
    assert job.step == _step(out)  # the last progress, written with the outcome
    assert job.finished_at is not None
