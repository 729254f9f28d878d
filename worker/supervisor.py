"""The job supervisor: the Celery task :func:`run_job` and the :class:`Supervisor` behind it.

It claims a job, starts its trainer (``python -m worker.train_job``) as a child process
(:mod:`worker.child`), watches it (heartbeat, progress, cancel, timeout) and maps its exit to the
job's next state (:mod:`worker.outcome`). The steps, and what each writes, are in worker/README.md,
"What a job goes through"; every state change goes through
:func:`service.core.job_states.change_state` with a reason.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from celery.signals import worker_shutting_down
from sqlalchemy import func, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from reid_core.atomic_write import write_atomic
from service.core.broker import RUN_JOB_TASK, mark_dispatched, send_job
from service.core.db import session_scope
from service.core.folders import JobDir
from service.core.job_progress import progress_columns
from service.core.job_states import ACTIVE_STATES, WAITING_STATES, change_state, lock_job
from service.core.models import Job, JobEvent, JobState
from service.core.registry import DATASET_TAG, OWNER_TAG
from worker.celery_app import app
from worker.child import ChildSupervisor, signal_group, spawn, stop_now, watch
from worker.outcome import (
    Outcome,
    apply_outcome,
    decide_outcome,
    last_error_line,
    reap_stale_job,
)
from worker.tracking import TrackingSpec, TrackingState, terminate_run

log = logging.getLogger("worker.supervisor")

#: What a database that cannot be reached (or is restarting) raises.
DB_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeoutError)

#: ``(gpus, config_path) -> argv`` of the trainer.
CommandFn = Callable[[int, Path], list[str]]


def trainer_command(gpus: int, config_path: Path) -> list[str]:
    """``python -m worker.train_job --config <path>``; torchrun with one process per GPU."""
    train = ["-m", "worker.train_job", "--config", str(config_path)]
    if gpus > 1:
        run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        return [sys.executable, *run, *train]
    return [sys.executable, *train]


def _attempts(session: Session, job_id: uuid.UUID) -> int:
    """How many times the job was picked up so far: its STARTING events."""
    query = select(func.count()).where(
        JobEvent.job_id == job_id, JobEvent.to_state == JobState.STARTING
    )
    return int(session.execute(query).scalar_one())


@dataclass
class _Claim:
    """What the supervisor needs of a job it claimed (read once, in the claiming transaction)."""

    job_id: uuid.UUID
    config: dict[str, Any]
    gpus: int
    attempt: int  # 1 for the job's first run; every rerun (restart, retry) resumes
    timeout_minutes: int
    owner: str
    dataset_id: uuid.UUID | None
    model_name: str
    mlflow_run_id: str | None

    @property
    def output_dir(self) -> Path:
        return Path(self.config["runtime"]["output_dir"])

    @property
    def folder(self) -> JobDir:
        return JobDir(self.output_dir)


class _Stop:
    CANCEL = "cancel"
    TIMEOUT = "timeout"
    SHUTDOWN = "worker shutdown"
    LOST = "lost claim"


@dataclass(kw_only=True)
class Supervisor(ChildSupervisor):
    """Runs one job's trainer to its end (see the module). ``command``, ``clock``, ``send`` (a
    rerun to the broker; :func:`service.core.broker.send_job` by default) and
    ``seconds_per_minute`` are for tests."""

    command: CommandFn = trainer_command
    stop_event: threading.Event = field(default_factory=threading.Event)
    send: Callable[[Job], bool] | None = None
    seconds_per_minute: float = 60.0
    _applied: dict[str, Any] = field(default_factory=dict, init=False)

    def _if_ours(self, job: Job | None) -> Job | None:
        """``job`` while it is this worker's (claimed by it and active), else None: the reaper,
        another worker or a cancel before the trainer started has it now."""
        if job is None or job.worker_id != self.worker_id or job.state not in ACTIVE_STATES:
            return None
        return job

    # ------------------------------------------------------------------------------------------
    # claim
    # ------------------------------------------------------------------------------------------

    def _claim(self, job_id: uuid.UUID) -> _Claim | str:
        """STARTING and ours, or a word on why not (the job is left as it is)."""
        with session_scope(self.factory) as session:
            now = self.clock()
            job = self.claimable(lock_job(session, job_id), "no such job", ACTIVE_STATES, now)
            if isinstance(job, str):
                return job
            # Held but its worker is gone (this message is a redelivery): reap, then run it here.
            held = job.state in ACTIVE_STATES
            if held and reap_stale_job(session, job, now) is not JobState.RETRYING:
                return f"reaped: {job.state}"
            if job.state not in WAITING_STATES:
                return f"{job.state}: nothing to run"
            attempt = _attempts(session, job.id) + 1
            change_state(
                session,
                job,
                JobState.STARTING,
                f"picked up by {self.worker_id} (attempt {attempt})",
            )
            job.worker_id = self.worker_id
            job.heartbeat_at = now
            gpus_available = self._gpus_available()
            if gpus_available is not None and job.gpus > gpus_available:
                change_state(
                    session,
                    job,
                    JobState.FAILED,
                    f"the job needs {job.gpus} GPU(s) but worker {self.worker_id} has "
                    f"{gpus_available} (REID_WORKER__GPUS={self.settings.worker.gpus!r}): "
                    "check the queue routing",
                )
                return "failed: not enough GPUs"
            claim = _Claim(
                job_id=job.id,
                config=json.loads(json.dumps(job.resolved_config)),
                gpus=job.gpus,
                attempt=attempt,
                timeout_minutes=job.timeout_minutes,
                owner=job.owner,
                dataset_id=job.dataset_id,
                model_name=job.model_name or self.settings.mlflow.model_name_for(job.owner),
                mlflow_run_id=job.mlflow_run_id,
            )
        return claim

    def _gpus_available(self) -> int | None:
        pinned = self.settings.worker.gpus
        if pinned is None:
            return None
        return len([d for d in pinned.split(",") if d.strip()])

    # ------------------------------------------------------------------------------------------
    # spawn
    # ------------------------------------------------------------------------------------------

    def _write_config(self, claim: _Claim) -> Path:
        config = claim.config
        if claim.attempt > 1:
            # A rerun continues from the job's own last checkpoint.
            config.setdefault("checkpoint", {})["resume"] = "auto"
        claim.output_dir.mkdir(parents=True, exist_ok=True)
        path = claim.folder.job_config
        write_atomic(path, yaml.safe_dump(config, sort_keys=False))
        return path

    def _write_tracking(self, claim: _Claim) -> Path:
        m = self.settings.mlflow
        tags = {OWNER_TAG: claim.owner}
        if claim.dataset_id is not None:
            tags[DATASET_TAG] = str(claim.dataset_id)
        spec = TrackingSpec(
            tracking_uri=self.settings.mlflow_tracking_uri,
            experiment=m.experiment,
            model_name=claim.model_name,
            job_id=str(claim.job_id),
            run_name=f"job-{claim.job_id}",
            artifact_location=self.settings.mlflow_artifact_location,
            tags=tags,
            run_id=claim.mlflow_run_id,
            request_timeout_s=m.request_timeout_s,
            retry_after_s=m.retry_after_s,
            final_sync_s=m.final_sync_s,
            log_checkpoints=m.log_checkpoints,
        )
        return spec.write(claim.output_dir)

    def _spawn(
        self, claim: _Claim, config_path: Path, log_file: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        header = (
            f"\n--- {self.clock():%Y-%m-%dT%H:%M:%S}Z attempt {claim.attempt} on {self.worker_id}: "
        )
        proc = spawn(self.command(claim.gpus, config_path), log_file, self.settings, header)
        write_atomic(claim.folder.trainer_pid, f"{proc.pid}\n")
        return proc

    # ------------------------------------------------------------------------------------------
    # watch
    # ------------------------------------------------------------------------------------------

    def _tracking_values(self, folder: JobDir) -> dict[str, Any]:
        state = TrackingState.load(folder.path)
        values: dict[str, Any] = {}
        if state.run_id:
            values["mlflow_run_id"] = state.run_id
        if state.model_version:
            values["model_name"] = state.model_name
            values["model_version"] = state.model_version
        if state.warnings:
            values["warnings"] = list(state.warnings)
        return values

    def _apply_progress(self, job: Job, folder: JobDir) -> None:
        progress = folder.read_progress()
        values = {} if progress is None else progress_columns(progress)
        values.update(self._tracking_values(folder))
        if not values or values == self._applied:
            return
        for name, value in values.items():
            if getattr(job, name) != value:
                setattr(job, name, value)
        self._applied = values

    def _tick(self, claim: _Claim, heartbeat: bool) -> tuple[bool, bool]:
        """Heartbeat (if due) and progress; returns (still ours, cancel requested)."""
        with session_scope(self.factory) as session:
            job = self._if_ours(lock_job(session, claim.job_id))
            if job is None:
                return False, False
            if heartbeat:
                job.heartbeat_at = self.clock()
            self._apply_progress(job, claim.folder)
            return True, bool(job.cancel_requested or job.state is JobState.CANCELLING)

    def _mark_running(self, claim: _Claim, pid: int) -> bool:
        """STARTING -> RUNNING; False when the claim was lost meanwhile."""
        with session_scope(self.factory) as session:
            job = self._if_ours(lock_job(session, claim.job_id))
            if job is None:
                return False
            if job.state is JobState.STARTING:
                change_state(
                    session,
                    job,
                    JobState.RUNNING,
                    f"trainer started on {self.worker_id} (pid {pid})",
                )
            job.heartbeat_at = self.clock()
            return True

    def _watch(self, claim: _Claim, proc: subprocess.Popen[bytes]) -> str | None:
        """Wait for the trainer; returns why it was stopped (a ``_Stop`` value) or None."""
        deadline = time.monotonic() + claim.timeout_minutes * self.seconds_per_minute

        def tick(heartbeat: bool) -> str | None:
            ours, cancel = self._tick(claim, heartbeat)
            if not ours:
                return _Stop.LOST
            return _Stop.CANCEL if cancel else None

        def should_stop() -> str | None:
            if time.monotonic() >= deadline:
                return _Stop.TIMEOUT
            return _Stop.SHUTDOWN if self.stop_event.is_set() else None

        name = f"job {claim.job_id}"
        return watch(proc, self.settings.worker, tick, name, should_stop=should_stop)

    # ------------------------------------------------------------------------------------------
    # finish
    # ------------------------------------------------------------------------------------------

    def _finish(self, claim: _Claim, returncode: int, stopped: str | None) -> str:
        last_error = last_error_line(claim.folder.process_log)

        def outcome_of(job: Job) -> Outcome:
            return decide_outcome(
                returncode,
                cancel_requested=bool(job.cancel_requested or job.state is JobState.CANCELLING),
                timed_out=stopped == _Stop.TIMEOUT,
                preempted=stopped == _Stop.SHUTDOWN,
                timeout_minutes=claim.timeout_minutes,
                retries=job.retries or 0,
                max_retries=job.max_retries or 0,
                restarts=job.restarts or 0,
                max_restarts=job.max_restarts or 0,
                last_error=last_error,
            )

        # The run is closed before the job is (whoever sees the job final sees both), and
        # before the job is locked: MLflow may take its timeout, and on SQLite the lock holds
        # every writer of the database.
        with self.factory() as session:
            job = self._if_ours(session.get(Job, claim.job_id))
            if job is None:
                return "claim lost: the job's state is someone else's now"
            expected = outcome_of(job).state
        closed = expected if expected.is_final else None
        warning = None if closed is None else self._close_run(claim, closed)
        resend: Job | None = None
        with session_scope(self.factory) as session:
            job = self._if_ours(lock_job(session, claim.job_id))
            if job is None:
                return "claim lost: the job's state is someone else's now"
            self._apply_progress(job, claim.folder)
            outcome = outcome_of(job)
            target = outcome.state
            if target.is_final and target is not closed:  # the job changed since it was read
                warning = self._close_run(claim, target)
            if warning is not None:
                job.warnings = [*(job.warnings or []), warning]
            if job.state is JobState.STARTING and target is JobState.SUCCEEDED:
                change_state(session, job, JobState.RUNNING, "trainer started")
            job.heartbeat_at = self.clock()
            apply_outcome(session, job, outcome)
            if outcome.retry:
                resend = job
        if resend is not None and self._send(resend):
            with session_scope(self.factory) as session:
                mark_dispatched(session, resend.id, self.clock())
        log.info("job %s: %s (%s)", claim.job_id, outcome.state, outcome.reason)
        return str(outcome.state)

    def _send(self, job: Job) -> bool:
        return self.send(job) if self.send is not None else send_job(self.settings, job)

    def _close_run(self, claim: _Claim, state: JobState) -> str | None:
        """Mark the job's MLflow run FINISHED, FAILED or KILLED; a warning when MLflow refuses
        (bounded by ``mlflow.request_timeout_s``: the job's final state never waits long)."""
        run_id = TrackingState.load(claim.output_dir).run_id or claim.mlflow_run_id
        if run_id is None:
            return None
        status = {JobState.SUCCEEDED: "FINISHED", JobState.CANCELLED: "KILLED"}.get(state, "FAILED")
        return terminate_run(
            self.settings.mlflow_tracking_uri,
            run_id,
            status,
            self.settings.mlflow.request_timeout_s,
        )

    def _finish_early(self, job_id: uuid.UUID, state: JobState, reason: str) -> str:
        with session_scope(self.factory) as session:
            job = self._if_ours(lock_job(session, job_id))
            if job is None:
                return "claim lost"
            if job.state is JobState.CANCELLING:
                state, reason = JobState.CANCELLED, "cancelled before the trainer started"
            change_state(session, job, state, reason)
            return str(state)

    # ------------------------------------------------------------------------------------------

    def run(self, job_id: uuid.UUID) -> str:
        """Run the job to its end; returns its final word (the state, or why nothing ran)."""
        self._applied = {}
        claim = self._claim(job_id)
        if isinstance(claim, str):
            log.info("job %s: %s", job_id, claim)
            return claim
        try:
            config_path = self._write_config(claim)
            self._write_tracking(claim)
        except OSError as exc:
            return self._finish_early(
                job_id, JobState.FAILED, f"cannot write the job's config in its folder: {exc}"
            )
        with claim.folder.process_log.open("ab") as log_file:
            try:
                proc = self._spawn(claim, config_path, log_file)
            except OSError as exc:
                return self._finish_early(
                    job_id, JobState.FAILED, f"cannot start the trainer: {exc}"
                )
            try:
                if not self._mark_running(claim, proc.pid):
                    log.warning("job %s: claim lost before it ran: stopping it", job_id)
                    signal_group(proc, signal.SIGTERM)
                stopped = self._watch(claim, proc)
            except BaseException:
                # The supervisor itself fails (or the worker is killed): never leave an orphan.
                stop_now(proc, self.settings.worker.kill_grace_s)
                raise
        if stopped == _Stop.LOST:
            log.warning("job %s: another worker or the reaper took it; trainer stopped", job_id)
            return "claim lost"
        return self._finish_when_reachable(claim, proc.returncode, stopped)

    def _finish_when_reachable(self, claim: _Claim, returncode: int, stopped: str | None) -> str:
        """:meth:`_finish`, tried again while the database is unreachable: the trainer's outcome
        is known only here, and a task that failed now would leave the job RUNNING for the
        reaper to run again."""
        delay = self.settings.worker.poll_interval_s
        while True:
            try:
                return self._finish(claim, returncode, stopped)
            except DB_UNAVAILABLE as exc:
                log.warning(
                    "job %s: the trainer ended (exit %s) but the database is unreachable (%s); "
                    "trying again in %.0f s",
                    claim.job_id,
                    returncode,
                    type(exc).__name__,
                    delay,
                )
                time.sleep(delay)
                delay = min(2 * delay, self.settings.worker.heartbeat_interval_s)


# ----------------------------------------------------------------------------------------------
# the Celery task
# ----------------------------------------------------------------------------------------------

#: Set when the worker starts a warm shutdown: running trainers are checkpointed and retried.
SHUTTING_DOWN = threading.Event()


@worker_shutting_down.connect
def _on_worker_shutdown(**_: Any) -> None:
    SHUTTING_DOWN.set()


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Any, job_id: str) -> str:
    """Supervise job ``job_id`` from claim to final state (see :class:`Supervisor`)."""
    return Supervisor.for_task(self, stop_event=SHUTTING_DOWN).run(uuid.UUID(job_id))
