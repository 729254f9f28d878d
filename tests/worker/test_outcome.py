"""The exit-code mapping, the last error line of a log, and the queue routing."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.core.broker import celery_priority, resource_queue
from service.core.db import session_scope
from service.core.job_states import lock_job
from service.core.models import JobState
from tests.worker.conftest import MakeJob, event_states, load_job
from worker.outcome import apply_outcome, decide_outcome, last_error_line

S = JobState


@pytest.mark.parametrize(
    ("code", "cancel", "retries", "max_retries", "state", "words"),
    [
        (0, False, 0, 0, S.SUCCEEDED, "finished"),
        (0, True, 0, 0, S.SUCCEEDED, "finished"),  # done before it saw the cancel
        (75, True, 0, 3, S.CANCELLED, "checkpoint"),
        (-9, True, 0, 3, S.CANCELLED, "SIGKILL"),
        (1, True, 0, 3, S.CANCELLED, "code 1"),
        (1, False, 0, 1, S.RETRYING, "crashed (exit code 1 CRASHED)"),
        (1, False, 1, 1, S.FAILED, "no retries left (1 of 1 used)"),
        (1, False, 0, 0, S.FAILED, "the job allows no retries (max_retries is 0)"),
        # killed from outside: the restart budget (none here), whatever the retries
        (-9, False, 0, 1, S.FAILED, "killed by SIGKILL"),
        (75, False, 0, 2, S.FAILED, "allows no restarts"),
        # a fault of its own is a crash: the retry budget
        (-11, False, 0, 0, S.FAILED, "killed by SIGSEGV"),
        (-11, False, 0, 1, S.RETRYING, "killed by SIGSEGV; retry 1 of 1"),
        (-6, False, 0, 1, S.RETRYING, "killed by SIGABRT"),
        (42, False, 0, 1, S.RETRYING, "exit code 42"),
        (2, False, 0, 5, S.FAILED, "configuration was rejected (exit code 2 BAD_CONFIG)"),
        (2, True, 0, 5, S.FAILED, "BAD_CONFIG"),
        (3, False, 0, 5, S.FAILED, "dataset is unusable"),
        (4, False, 0, 5, S.FAILED, "NO_SPACE"),
        (5, False, 0, 5, S.FAILED, "diverged"),
    ],
)
def test_exit_codes(
    code: int, cancel: bool, retries: int, max_retries: int, state: JobState, words: str
) -> None:
    outcome = decide_outcome(
        code, cancel_requested=cancel, retries=retries, max_retries=max_retries
    )
    assert outcome.state is state
    assert words in outcome.reason
    assert outcome.retry == (state is S.RETRYING)


def test_a_kill_from_outside_restarts_within_its_own_budget() -> None:
    outcome = decide_outcome(-9, restarts=0, max_restarts=3, max_retries=0)
    assert (outcome.state, outcome.restart) == (S.RETRYING, True)
    assert outcome.reason == (
        "the trainer was killed by SIGKILL (the kernel's OOM killer sends it when memory runs "
        "out); restart 1 of 3, resuming from the last checkpoint"
    )
    # SIGTERM from outside: the trainer saved a checkpoint (75) or was killed by it
    for code in (75, -15):
        outcome = decide_outcome(code, restarts=1, max_restarts=3)
        assert (outcome.state, outcome.restart) == (S.RETRYING, True)
        assert "restart 2 of 3" in outcome.reason
    exhausted = decide_outcome(-9, restarts=3, max_restarts=3, retries=0, max_retries=5)
    assert exhausted.state is S.FAILED
    assert exhausted.reason.endswith("; no restarts left (3 of 3 used)")
    crash = decide_outcome(1, restarts=0, max_restarts=3, retries=0, max_retries=1)
    assert (crash.state, crash.restart) == (S.RETRYING, False)


def test_signals_the_service_sent_never_restart() -> None:
    budgets = {"restarts": 0, "max_restarts": 3}
    cancelled = decide_outcome(-9, cancel_requested=True, **budgets)
    assert (cancelled.state, cancelled.reason) == (
        S.CANCELLED,
        "cancelled: the trainer was killed by SIGKILL",
    )
    assert decide_outcome(-9, timed_out=True, **budgets).state is S.FAILED
    # a worker shutdown preempts: the retry budget, never the restart one
    for code in (75, -9):
        preempted = decide_outcome(code, preempted=True, retries=0, max_retries=1, **budgets)
        assert (preempted.state, preempted.restart) == (S.RETRYING, False)
        assert preempted.reason.startswith("preempted: the worker shut down, the trainer ")
        assert "retry 1 of 1" in preempted.reason
    no_retries = decide_outcome(75, preempted=True, max_retries=0, **budgets)
    assert no_retries.state is S.FAILED
    assert "the job allows no retries (max_retries is 0)" in no_retries.reason


def test_retry_reason_says_resume_and_attempt() -> None:
    outcome = decide_outcome(1, retries=1, max_retries=3, last_error="CUDA error: boom")
    assert outcome.reason == (
        "the trainer crashed (exit code 1 CRASHED): CUDA error: boom; "
        "retry 2 of 3, resuming from the last checkpoint"
    )


def test_failure_reason_ends_with_the_error() -> None:
    outcome = decide_outcome(3, last_error="dataset 'x' has no training images")
    assert outcome.reason.endswith(": dataset 'x' has no training images")


def test_timeout_fails_without_retry() -> None:
    outcome = decide_outcome(75, timed_out=True, timeout_minutes=30, max_retries=5)
    assert outcome.state is S.FAILED
    assert "timed out after 30 minutes" in outcome.reason
    assert decide_outcome(0, timed_out=True).state is S.SUCCEEDED


def test_last_error_line(tmp_path: Path) -> None:
    log = tmp_path / "process.log"
    assert last_error_line(log) is None
    log.write_text(
        "2026-01-01 00:00:00,000 INFO [rank0] reid_core.train: starting\n"
        "2026-01-01 00:00:01,000 ERROR [rank0] reid_core.train: data.root /x does not exist\n"
        "2026-01-01 00:00:02,000 INFO [rank0] reid_core.train: bye\n\n"
    )
    assert last_error_line(log) == "data.root /x does not exist"
    log.write_text("error: override loss.gls.threshold: unknown key 'gls'\n")
    assert last_error_line(log) == "error: override loss.gls.threshold: unknown key 'gls'"
    log.write_text('Traceback (most recent call last):\n  File "x"\nModuleNotFoundError: torch\n')
    assert last_error_line(log) == "ModuleNotFoundError: torch"
    log.write_text("just a line\n" + "x" * 2000 + "\n")
    line = last_error_line(log)
    assert line is not None and len(line) == 500 and line.endswith("...")


def test_queues_by_resource() -> None:
    assert resource_queue(0) == "cpu"
    assert resource_queue(1, "default", "default") == "gpu1"
    assert resource_queue(2, None, "default") == "gpu2"
    assert resource_queue(1, "research", "default") == "research.gpu1"
    # job priorities: 0 lowest .. max; Redis consumes Celery priority 0 first
    assert celery_priority(9, 9) == 0
    assert celery_priority(0, 9) == 9


def test_a_cancel_whose_state_was_written_back_to_running_ends_cancelled(
    factory: sessionmaker[Session], make_job: MakeJob
) -> None:
    """Where the database has no row locks (SQLite), the supervisor's "trainer started" can
    write RUNNING over the API's CANCELLING: the cancel request stays, the job ends CANCELLED
    through CANCELLING, never in an error that leaves it RUNNING."""
    job_id = make_job(
        states=(JobState.STARTING, JobState.RUNNING), cancel_requested=True, worker_id="w1"
    )
    outcome = decide_outcome(-15, cancel_requested=True)
    with session_scope(factory) as session:
        job = lock_job(session, job_id)
        assert job is not None
        apply_outcome(session, job, outcome)
    assert load_job(factory, job_id).state is JobState.CANCELLED
    assert event_states(factory, job_id)[-2:] == ["CANCELLING", "CANCELLED"]
