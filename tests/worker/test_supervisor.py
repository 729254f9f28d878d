"""The supervisor on SQLite with a fake trainer (no torch, no broker): claims, progress,
exit-code handling, cancel (SIGTERM, then SIGKILL after the grace period), timeout, retries."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import session_scope
from service.core.folders import JobDir
from service.core.job_states import change_state, lock_job
from service.core.models import Job, JobState
from service.core.settings import Settings
from tests.worker.conftest import FakeClock, MakeJob, event_states, fake_command, load_job
from worker.supervisor import Supervisor

S = JobState


def _supervisor(
    settings: Settings,
    factory: sessionmaker[Session],
    sent: list[uuid.UUID] | None = None,
    **kwargs: object,
) -> Supervisor:
    def send(job: Job) -> bool:
        if sent is not None:
            sent.append(job.id)
        return True

    return Supervisor(settings, factory, "test:1", command=fake_command, send=send, **kwargs)  # type: ignore[arg-type]


def _output_dir(settings: Settings, job_id: uuid.UUID) -> Path:
    return settings.jobs_path / str(job_id)


def test_success_copies_progress_and_writes_every_state(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    job_id = make_job(fake={"steps": 4})
    assert _supervisor(settings, factory).run(job_id) == "SUCCEEDED"
    job = load_job(factory, job_id)
    assert job.state is S.SUCCEEDED
    assert event_states(factory, job_id) == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert job.progress == 1.0
    assert job.step == 4
    assert job.metrics["eval"] == {"mAP": 40.0}
    assert job.metrics["eta_seconds"] == 0.0
    assert job.worker_id == "test:1"
    assert job.started_at is not None and job.finished_at is not None
    out = _output_dir(settings, job_id)
    assert yaml.safe_load(JobDir(out).job_config.read_text())["fake"] == {"steps": 4}
    assert JobDir(out).trainer_pid.read_text().strip().isdigit()
    assert "attempt 1 on test:1" in JobDir(out).process_log.read_text()


def test_bad_data_fails_with_the_last_error_line(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    job_id = make_job(fake={"exit_codes": [3], "error": "no training images"}, max_retries=3)
    assert _supervisor(settings, factory).run(job_id) == "FAILED"
    job = load_job(factory, job_id)
    assert job.reason == ("the dataset is unusable (exit code 3 BAD_DATA): no training images")
    assert job.retries == 0


def test_crash_retries_with_resume_then_succeeds(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    job_id = make_job(fake={"exit_codes": [1, 0], "error": "CUDA error"}, max_retries=2)
    job_id_path = JobDir(_output_dir(settings, job_id)).job_config
    sent: list[uuid.UUID] = []
    supervisor = _supervisor(settings, factory, sent)
    assert supervisor.run(job_id) == "RETRYING"
    job = load_job(factory, job_id)
    assert "crashed (exit code 1 CRASHED): CUDA error; retry 1 of 2" in (job.reason or "")
    assert job.retries == 1
    assert sent == [job_id]
    assert job.heartbeat_at is not None  # marked as sent
    # The redelivered message: resumed from the checkpoint.
    assert supervisor.run(job_id) == "SUCCEEDED"
    assert yaml.safe_load(job_id_path.read_text())["checkpoint"]["resume"] == "auto"
    assert event_states(factory, job_id) == [
        "QUEUED",
        "STARTING",
        "RUNNING",
        "RETRYING",
        "STARTING",
        "RUNNING",
        "SUCCEEDED",
    ]
    # A third copy of the message finds the job finished and does nothing.
    assert supervisor.run(job_id) == "already SUCCEEDED"


def test_a_kill_from_outside_restarts_then_fails_when_restarts_run_out(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    job_id = make_job(fake={"exit_codes": [-9, -9, 0]}, max_restarts=1, max_retries=3)
    supervisor = _supervisor(settings, factory, [])
    assert supervisor.run(job_id) == "RETRYING"
    job = load_job(factory, job_id)
    assert (job.restarts, job.retries) == (1, 0)
    assert "killed by SIGKILL" in (job.reason or "")
    assert "restart 1 of 1, resuming from the last checkpoint" in (job.reason or "")
    assert supervisor.run(job_id) == "FAILED"
    job = load_job(factory, job_id)
    assert (job.restarts, job.retries) == (1, 0)  # its retries are for crashes, not kills
    assert (job.reason or "").endswith("; no restarts left (1 of 1 used)")
    log = JobDir(_output_dir(settings, job_id)).process_log.read_text()
    assert "attempt 2 on test:1" in log and "attempt 2 resume=auto" in log


def _cancel_when_running(factory: sessionmaker[Session], job_id: uuid.UUID) -> threading.Thread:
    def cancel() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with session_scope(factory) as session:
                job = lock_job(session, job_id)
                assert job is not None
                if job.state is S.RUNNING and (job.step or 0) >= 1:
                    change_state(session, job, S.CANCELLING, "cancel requested by alice")
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=cancel, daemon=True)
    thread.start()
    return thread


def test_cancel_sends_sigterm_and_the_trainer_checkpoints(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    job_id = make_job(fake={"steps": 500, "step_s": 0.02})
    thread = _cancel_when_running(factory, job_id)
    assert _supervisor(settings, factory).run(job_id) == "CANCELLED"
    thread.join()
    job = load_job(factory, job_id)
    assert job.reason == "cancelled: the trainer saved a checkpoint and stopped"
    assert list((_output_dir(settings, job_id) / "checkpoints").glob("step_*.pt"))


def test_cancel_kills_a_trainer_that_ignores_sigterm(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    settings.worker.kill_grace_s = 0.3
    job_id = make_job(fake={"steps": 500, "step_s": 0.02, "ignore_sigterm": True})
    thread = _cancel_when_running(factory, job_id)
    assert _supervisor(settings, factory).run(job_id) == "CANCELLED"
    thread.join()
    assert load_job(factory, job_id).reason == "cancelled: the trainer was killed by SIGKILL"


def test_timeout_stops_and_fails_the_job(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    job_id = make_job(fake={"steps": 500, "step_s": 0.02}, timeout_minutes=1, max_retries=3)
    # 2 s: time for the trainer to start and set its SIGTERM handler on a loaded machine
    supervisor = _supervisor(settings, factory, seconds_per_minute=2.0)
    assert supervisor.run(job_id) == "FAILED"
    job = load_job(factory, job_id)
    assert (job.reason or "").startswith("timed out after 1 minutes")
    assert list((_output_dir(settings, job_id) / "checkpoints").glob("step_*.pt"))


def test_a_job_running_elsewhere_is_left_alone_unless_its_worker_is_dead(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob, clock: FakeClock
) -> None:
    job_id = make_job(
        states=(S.STARTING, S.RUNNING),
        fake={"steps": 2},
        max_restarts=1,
        worker_id="other:7",
        heartbeat_at=clock(),
    )
    supervisor = _supervisor(settings, factory, clock=clock)
    assert "left alone" in supervisor.run(job_id)
    assert load_job(factory, job_id).state is S.RUNNING
    assert not _output_dir(settings, job_id).exists()  # nothing was started
    clock.advance(61)  # other:7 stopped heartbeating: reaped, then run here
    assert supervisor.run(job_id) == "SUCCEEDED"
    assert event_states(factory, job_id) == [
        "QUEUED",
        "STARTING",
        "RUNNING",
        "RETRYING",
        "STARTING",
        "RUNNING",
        "SUCCEEDED",
    ]


def test_not_enough_gpus_fails_clearly(
    settings: Settings, factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    settings.worker.gpus = "0"
    job_id = make_job(gpus=2)
    assert _supervisor(settings, factory).run(job_id) == "failed: not enough GPUs"
    reason = load_job(factory, job_id).reason or ""
    assert "needs 2 GPU(s) but worker test:1 has 1" in reason


def test_the_run_is_closed_while_no_writer_of_the_database_waits(
    settings: Settings,
    factory: sessionmaker[Session],
    make_job: MakeJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MLflow may take its timeout to close a run: the supervisor closes it before it locks the
    job, so on SQLite (where the job's lock is the database's write lock) others keep writing."""
    job_id = make_job(fake={"steps": 2})
    database = make_url(settings.database_url).database
    closed: list[tuple[JobState, str]] = []

    def close_run(_self: Supervisor, _claim: object, state: JobState) -> str | None:
        other = sqlite3.connect(str(database), timeout=0.5, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # waits for the write lock at most 0.5 s
            other.execute("ROLLBACK")
            closed.append((state, "written beside it"))
        except sqlite3.OperationalError as exc:
            closed.append((state, str(exc)))
        finally:
            other.close()
        return None

    monkeypatch.setattr(Supervisor, "_close_run", close_run)
    assert _supervisor(settings, factory).run(job_id) == "SUCCEEDED"
    assert closed == [(S.SUCCEEDED, "written beside it")]
    assert load_job(factory, job_id).state is S.SUCCEEDED
