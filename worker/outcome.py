"""What a trainer's exit means for its job, and the restart-or-retry rule; pure functions.

Exit codes (:class:`reid_core.engine.exit_codes.ExitCode`) and the job state they lead to:

===========================================  ==========  ===========  ========================
how the trainer ended                        cancel      worker       otherwise
                                             requested   shutdown
===========================================  ==========  ===========  ========================
0 OK                                         SUCCEEDED   SUCCEEDED    SUCCEEDED
75 INTERRUPTED (SIGTERM, checkpointed)       CANCELLED   retry        restart
killed from outside (SIGKILL, SIGTERM, ...)  CANCELLED   retry        restart
killed by its own fault (SIGSEGV, SIGABRT)   CANCELLED   retry        retry
1 CRASHED, any other code                    CANCELLED   retry        retry
2 BAD_CONFIG, 3 BAD_DATA, 5 DIVERGED         FAILED      FAILED       FAILED (reruns fail too)
4 NO_SPACE                                   FAILED      FAILED       FAILED
past the job's timeout                       (n/a)       (n/a)        FAILED (unless 0)
its worker stopped heartbeating              CANCELLED   (n/a)        restart
===========================================  ==========  ===========  ========================

"Worker shutdown": the supervisor stopped the trainer (SIGTERM, SIGKILL after the grace period)
because its worker shuts down: the job is preempted. "Killed from outside": the kernel's OOM
killer (SIGKILL), an operator's ``kill``; a fault of its own: SIGSEGV, SIGABRT, SIGBUS, SIGFPE,
SIGILL, SIGSYS.

Both **restart** and **retry** are RETRYING: the job is sent again and the trainer resumes from
its last checkpoint. They draw on two budgets of the job: a restart (the trainer or its worker
was killed by something outside the job, as Determined's ``max_restarts``) while ``restarts <
max_restarts``, a retry (the trainer itself failed) while ``retries < max_retries``; past its
budget the job is FAILED, and the reason says which budget ran out. Signals the service sends
itself (a cancel, the timeout, a worker shutdown) never count as restarts. Reasons of failures
end with the last error line of the trainer's log.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import Session

from reid_core.engine.exit_codes import ExitCode
from service.core.job_states import change_state
from service.core.models import Job, JobState

#: Exit codes a rerun would hit again.
_PERMANENT = {
    ExitCode.BAD_CONFIG: "the configuration was rejected",
    ExitCode.BAD_DATA: "the dataset is unusable",
    ExitCode.NO_SPACE: "a checkpoint could not be written (disk full or read-only?)",
    ExitCode.DIVERGED: "the loss diverged",
}

#: Signals a process raises on itself (a fault of its own): a crash, not a kill from outside.
_FAULTS = frozenset(
    {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGSYS}
)

_LOG_PREFIX = re.compile(r"^\S+ \S+ (?:ERROR|CRITICAL) \[rank\d+\] [\w.]+: ")
_MAX_ERROR_CHARS = 500

#: The two budgets of a job that send it again: ``restart`` (killed from outside) and
#: ``retry`` (it failed by itself); each is counted in the job's ``<plural>`` field and bounded
#: by ``max_<plural>``.
Budget = Literal["restart", "retry"]
_PLURAL: dict[Budget, str] = {"restart": "restarts", "retry": "retries"}


@dataclass(frozen=True)
class Outcome:
    """The job state a trainer's exit leads to; ``state`` is RETRYING when it will run again,
    ``restart`` says that rerun draws on the restart budget (else on the retry budget)."""

    state: JobState
    reason: str
    restart: bool = False

    @property
    def retry(self) -> bool:
        return self.state is JobState.RETRYING


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _killed_from_outside(returncode: int) -> bool:
    """Killed by a signal the trainer did not raise on itself (or stopped by one: exit 75)."""
    if returncode == ExitCode.INTERRUPTED:
        return True
    return returncode < 0 and -returncode not in _FAULTS


def _with_error(text: str, last_error: str | None) -> str:
    return f"{text}: {last_error}" if last_error else text


def decide_outcome(
    returncode: int,
    *,
    cancel_requested: bool = False,
    timed_out: bool = False,
    preempted: bool = False,
    timeout_minutes: int | None = None,
    retries: int = 0,
    max_retries: int = 0,
    restarts: int = 0,
    max_restarts: int = 0,
    last_error: str | None = None,
) -> Outcome:
    """Map how the trainer ended to the job's next state (see the module's table).

    ``returncode`` is :attr:`subprocess.Popen.returncode` (negative: killed by that signal);
    ``preempted``: the supervisor stopped the trainer for a worker shutdown; ``retries`` and
    ``restarts`` are those already made (before this one).
    """
    if returncode == ExitCode.OK:
        return Outcome(JobState.SUCCEEDED, "training finished (exit code 0)")
    if returncode in _PERMANENT:
        code = ExitCode(returncode)
        text = f"{_PERMANENT[code]} (exit code {returncode} {code.name})"
        return Outcome(JobState.FAILED, _with_error(text, last_error))
    if cancel_requested:
        return Outcome(JobState.CANCELLED, f"cancelled: the trainer {_how_stopped(returncode)}")
    if timed_out:
        limit = f"{timeout_minutes} minutes" if timeout_minutes is not None else "its time limit"
        return Outcome(
            JobState.FAILED,
            f"timed out after {limit} (the trainer was stopped; exit code {returncode})",
        )
    if preempted:
        why = f"preempted: the worker shut down, the trainer {_how_stopped(returncode)}"
        return _run_again(why, "retry", retries, max_retries)
    if _killed_from_outside(returncode):
        # no error line: the trainer was stopped where it stood, its log's last line says nothing
        if returncode == ExitCode.INTERRUPTED:
            why = (
                "the trainer was stopped by a signal from outside the service and saved a "
                "checkpoint (exit code 75)"
            )
        else:
            why = _killed_text(returncode)
        return _run_again(why, "restart", restarts, max_restarts)
    if returncode < 0:
        why = _with_error(f"the trainer was killed by {_signal_name(returncode)}", last_error)
    else:
        name = ExitCode(returncode).name if returncode in ExitCode._value2member_map_ else ""
        code_text = f"exit code {returncode}" + (f" {name}" if name else "")
        why = _with_error(f"the trainer crashed ({code_text})", last_error)
    return _run_again(why, "retry", retries, max_retries)


def how_it_ended(returncode: int) -> str:
    """How a child process ended: ``was killed by SIGKILL``, ``exited with code 1``."""
    if returncode < 0:
        return f"was killed by {_signal_name(returncode)}"
    return f"exited with code {returncode}"


def _how_stopped(returncode: int) -> str:
    """How a trainer the service stopped (a cancel, a worker shutdown) ended."""
    if returncode == ExitCode.INTERRUPTED:
        return "saved a checkpoint and stopped"
    return how_it_ended(returncode)


def _killed_text(returncode: int) -> str:
    text = f"the trainer was killed by {_signal_name(returncode)}"
    if returncode == -signal.SIGKILL:
        text += " (the kernel's OOM killer sends it when memory runs out)"
    return text


def _run_again(why: str, budget: Budget, used: int, allowed: int) -> Outcome:
    """RETRYING while ``used < allowed`` of ``budget``, else FAILED; the reason says which."""
    plural = _PLURAL[budget]
    if used < allowed:
        return Outcome(
            JobState.RETRYING,
            f"{why}; {budget} {used + 1} of {allowed}, resuming from the last checkpoint",
            restart=budget == "restart",
        )
    if allowed == 0:
        return Outcome(JobState.FAILED, f"{why}; the job allows no {plural} (max_{plural} is 0)")
    return Outcome(JobState.FAILED, f"{why}; no {plural} left ({used} of {allowed} used)")


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


def apply_outcome(session: Session, job: Job, outcome: Outcome) -> None:
    """Move ``job`` as ``outcome`` says (a rerun counted in its budget); a RETRYING job is also
    let go (no worker, "not sent yet"): the caller sends it to the broker after its commit, else
    the dispatcher does.

    A job cancelled while its state still reads STARTING or RUNNING (its cancel request
    recorded, its state written back over CANCELLING by a concurrent change where the database
    has no row locks: SQLite) goes through CANCELLING first, as the state machine wants."""
    if outcome.state is JobState.CANCELLED and job.state in (JobState.STARTING, JobState.RUNNING):
        change_state(session, job, JobState.CANCELLING, "cancel requested")
    change_state(session, job, outcome.state, outcome.reason, restart=outcome.restart)
    if outcome.retry:
        job.worker_id = None
        job.heartbeat_at = None


def reap_stale_job(session: Session, job: Job, now: datetime) -> JobState:
    """A job whose worker stopped heartbeating: CANCELLING -> CANCELLED, else a restart (the
    worker was killed, or its machine lost) while the job has restarts left, else FAILED."""
    last = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
    who = job.worker_id or "its worker"
    why = f"{who} stopped heartbeating (last heartbeat {last}, reaped {now:%Y-%m-%dT%H:%M:%S}Z)"
    if job.state is JobState.CANCELLING:
        change_state(session, job, JobState.CANCELLED, f"cancelled: {why}")
        return JobState.CANCELLED
    outcome = _run_again(why, "restart", job.restarts or 0, job.max_restarts or 0)
    apply_outcome(session, job, outcome)
    return outcome.state
