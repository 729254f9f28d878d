"""What a trainer's exit means for its job, and the retry-or-fail rule; pure functions.

Exit codes (:class:`reid_core.engine.exit_codes.ExitCode`) and the job state they lead to:

======================================  ===================  =====================================
how the trainer ended                   cancel requested     otherwise
======================================  ===================  =====================================
0 OK                                    SUCCEEDED            SUCCEEDED
75 INTERRUPTED (SIGTERM, checkpointed)  CANCELLED            retry (preempted: worker shutdown)
killed by a signal (OOM killer, ...)    CANCELLED            retry
1 CRASHED, any other code               CANCELLED            retry
2 BAD_CONFIG, 3 BAD_DATA, 5 DIVERGED    FAILED               FAILED (a rerun would fail again)
4 NO_SPACE                              FAILED               FAILED (as reid_core documents it)
past the job's timeout                  (n/a)                FAILED (unless it exited 0)
======================================  ===================  =====================================

"Retry" is RETRYING (and the job is sent again; the trainer resumes from its last checkpoint)
while ``retries < max_retries``, else FAILED; the reason says which. Reasons of failures end with
the last error line of the trainer's log.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from reid_core.engine.exit_codes import ExitCode
from service.core.job_states import change_state
from service.core.models import Job, JobState

__all__ = [
    "Outcome",
    "decide_outcome",
    "last_error_line",
    "reap_stale_job",
    "retry_or_fail",
]

#: Exit codes a rerun would hit again.
_PERMANENT = {
    ExitCode.BAD_CONFIG: "the configuration was rejected",
    ExitCode.BAD_DATA: "the dataset is unusable",
    ExitCode.NO_SPACE: "a checkpoint could not be written (disk full or read-only?)",
    ExitCode.DIVERGED: "the loss diverged",
}

_LOG_PREFIX = re.compile(r"^\S+ \S+ (?:ERROR|CRITICAL) \[rank\d+\] [\w.]+: ")
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Outcome:
    """The job state a trainer's exit leads to; ``state`` is RETRYING when it will run again."""

    state: JobState
    reason: str

    @property
    def retry(self) -> bool:
        return self.state is JobState.RETRYING


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _with_error(text: str, last_error: str | None) -> str:
    return f"{text}: {last_error}" if last_error else text


def decide_outcome(
    returncode: int,
    *,
    cancel_requested: bool = False,
    timed_out: bool = False,
    timeout_minutes: int | None = None,
    retries: int = 0,
    max_retries: int = 0,
    last_error: str | None = None,
) -> Outcome:
    """Map how the trainer ended to the job's next state (see the module's table).

    ``retries`` is the number of retries already made (before this one), ``returncode`` is
    :attr:`subprocess.Popen.returncode` (negative: killed by that signal).
    """
    if returncode == ExitCode.OK:
        return Outcome(JobState.SUCCEEDED, "training finished (exit code 0)")
    if returncode in _PERMANENT:
        code = ExitCode(returncode)
        text = f"{_PERMANENT[code]} (exit code {returncode} {code.name})"
        return Outcome(JobState.FAILED, _with_error(text, last_error))
    if cancel_requested:
        if returncode == ExitCode.INTERRUPTED:
            return Outcome(
                JobState.CANCELLED, "cancelled: the trainer saved a checkpoint and stopped"
            )
        if returncode < 0:
            how = f"was killed by {_signal_name(returncode)}"
        else:
            how = f"exited with code {returncode}"
        return Outcome(JobState.CANCELLED, f"cancelled: the trainer {how}")
    if timed_out:
        limit = f"{timeout_minutes} minutes" if timeout_minutes is not None else "its time limit"
        return Outcome(
            JobState.FAILED,
            f"timed out after {limit} (the trainer was stopped; exit code {returncode})",
        )
    if returncode == ExitCode.INTERRUPTED:
        why = "preempted: the trainer was interrupted and saved a checkpoint (exit code 75)"
    elif returncode < 0:
        why = _with_error(f"the trainer was killed by {_signal_name(returncode)}", last_error)
    else:
        name = ExitCode(returncode).name if returncode in ExitCode._value2member_map_ else ""
        code_text = f"exit code {returncode}" + (f" {name}" if name else "")
        why = _with_error(f"the trainer crashed ({code_text})", last_error)
    return _retry_outcome(why, retries, max_retries)


def _retry_outcome(why: str, retries: int, max_retries: int) -> Outcome:
    if retries < max_retries:
        return Outcome(
            JobState.RETRYING,
            f"{why}; retry {retries + 1} of {max_retries}, resuming from the last checkpoint",
        )
    return Outcome(JobState.FAILED, f"{why}; no retries left ({retries} of {max_retries} used)")


def last_error_line(log_path: Path, max_bytes: int = 64 * 1024) -> str | None:
    """The last error the trainer printed (``ERROR`` log lines, ``error:`` messages, the last
    line of a traceback), else its last line; None without a log."""
    try:
        with log_path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return None
    chosen = lines[-1]
    for line in reversed(lines):
        if _LOG_PREFIX.match(line) or line.lower().startswith("error:"):
            chosen = line
            break
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line):  # a traceback's last line
            chosen = line
            break
    chosen = _LOG_PREFIX.sub("", chosen)
    if len(chosen) > _MAX_ERROR_CHARS:
        chosen = chosen[: _MAX_ERROR_CHARS - 3] + "..."
    return chosen


def retry_or_fail(session: Session, job: Job, why: str) -> JobState:
    """RETRYING (``retries`` + 1) while the job has retries left, else FAILED; the caller sends a
    RETRYING job to the broker after its commit."""
    outcome = _retry_outcome(why, job.retries or 0, job.max_retries or 0)
    change_state(session, job, outcome.state, outcome.reason)
    if outcome.retry:
        job.worker_id = None
        job.heartbeat_at = None  # "not sent yet": the dispatcher sends it if nobody does
    return outcome.state


def reap_stale_job(session: Session, job: Job, now: datetime) -> JobState:
    """A job whose worker stopped heartbeating: CANCELLING -> CANCELLED, else retry or fail."""
    last = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
    who = job.worker_id or "its worker"
    why = f"{who} stopped heartbeating (last heartbeat {last}, reaped {now:%Y-%m-%dT%H:%M:%S}Z)"
    if job.state is JobState.CANCELLING:
        change_state(session, job, JobState.CANCELLED, f"cancelled: {why}")
        return JobState.CANCELLED
    return retry_or_fail(session, job, why)
