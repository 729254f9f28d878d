"""Fixtures of the worker tests: a migrated SQLite file per test, job rows, a fake clock.

The Celery tests (``integration``) use the PostgreSQL server at ``REID_TEST_DATABASE_URL``
(default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and the Redis server at
``REID_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); they skip, saying why, when
either does not answer.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.core import migrate
from service.core.db import make_engine, make_session_factory, session_scope
from service.core.job_states import change_state
from service.core.models import Job, JobState, utcnow
from service.core.settings import JobBounds, Settings, WorkerSettings

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")


@pytest.fixture(autouse=True)
def _no_reid_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test alone, not from the developer's REID_* variables."""
    for name in list(os.environ):
        if name.startswith("REID_") and not name.startswith("REID_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "reid.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


def fast_worker_settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "poll_interval_s": 0.05,
        "heartbeat_interval_s": 0.2,
        "heartbeat_timeout_s": 60,
        "kill_grace_s": 5,
        "dispatch_grace_s": 10,
        "requeue_after_s": 300,
    }
    values.update(overrides)
    return WorkerSettings(**values)


@pytest.fixture
def settings(tmp_path: Path, migrated_sqlite: Path) -> Settings:
    db = tmp_path / "reid.db"
    shutil.copyfile(migrated_sqlite, db)
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "var",
        database_url=f"sqlite:///{db}",
        jobs_dir=tmp_path / "jobs",
        job_bounds=JobBounds(max_gpus=2, max_retries=3),
        worker=fast_worker_settings(),
    )


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


class FakeClock:
    """``utcnow`` that only moves when told."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeJob = Callable[..., uuid.UUID]


@pytest.fixture
def make_job(factory: sessionmaker[Session], settings: Settings) -> MakeJob:
    """A job row (QUEUED, then moved through ``states``), with a fake-trainer config."""

    def make(
        *,
        states: tuple[JobState, ...] = (),
        fake: dict[str, Any] | None = None,
        max_retries: int = 0,
        gpus: int = 0,
        timeout_minutes: int = 60,
        **fields: Any,
    ) -> uuid.UUID:
        job_id = uuid.uuid4()
        config = {
            "runtime": {"output_dir": str(settings.jobs_path / str(job_id))},
            "checkpoint": {"resume": "auto"},
            "fake": fake or {},
        }
        with session_scope(factory) as session:
            job = Job(
                id=job_id,
                owner="alice",
                resolved_config=config,
                config_overrides={},
                gpus=gpus,
                priority=0,
                queue="default",
                max_retries=max_retries,
                retries=0,
                timeout_minutes=timeout_minutes,
                progress=0.0,
                metrics={},
                cancel_requested=False,
            )
            change_state(session, job, JobState.QUEUED, "submitted by alice")
            for state in states:
                change_state(session, job, state, f"test: {state}")
            for name, value in fields.items():
                setattr(job, name, value)
        return job_id

    return make


def load_job(factory: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def event_states(factory: sessionmaker[Session], job_id: uuid.UUID) -> list[str]:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return [str(e.to_state) for e in job.events]


def fake_command(_gpus: int, config_path: Path) -> list[str]:
    return [sys.executable, str(FAKE_TRAINER), "--config", str(config_path)]
