"""One supervisor for any child process a worker runs (a trainer, a gallery builder).

The Celery task imports no torch; the work runs in a child started by :func:`spawn`: its own
process group (``start_new_session``: a signal reaches every rank torchrun started), stdout and
stderr appended to a log file, ``CUDA_VISIBLE_DEVICES`` pinned from ``REID_WORKER__GPUS`` and, on
Linux, SIGTERM when the worker dies (``PR_SET_PDEATHSIG``), so no orphan runs on unseen.

:func:`watch` polls the child every ``poll_interval_s`` and calls the policy's ``tick`` (with
``heartbeat=True`` every ``heartbeat_interval_s``): the policy heartbeats its row and says whether
to stop (a cancel, a timeout, a lost claim, a deleted gallery). A database error in ``tick`` is
logged and the child goes on. Stopping is SIGTERM to the group (a trainer checkpoints and exits
75), SIGKILL after ``kill_grace_s``; once the child ended, whatever it left in its group is
killed. Jobs (:mod:`worker.supervisor`) and galleries (:mod:`worker.gallery_task`) are the two
policies, each a :class:`ChildSupervisor`: the worker's settings, database, id and clock, and the
claim's first question, :meth:`ChildSupervisor.claimable` (is the row this worker's to take?).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any, Self, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_engine, make_session_factory
from service.core.heartbeat import is_stale
from service.core.models import Gallery, Job, utcnow
from service.core.settings import Settings, WorkerSettings, get_settings

log = logging.getLogger("worker.child")

_PR_SET_PDEATHSIG = 1

#: ``tick(heartbeat) -> why to stop, or None``; ``heartbeat`` says a heartbeat is due.
TickFn = Callable[[bool], str | None]


R = TypeVar("R", Job, Gallery)

_FACTORIES: dict[str, sessionmaker[Session]] = {}


@dataclass
class ChildSupervisor:
    """What a policy over a child process starts from: the settings, the database, this worker's
    id (``host:pid``) and a clock (tests pass a fake one)."""

    settings: Settings
    factory: sessionmaker[Session]
    worker_id: str
    clock: Callable[[], datetime] = field(default=utcnow, kw_only=True)

    @classmethod
    def for_task(cls, task: Any, **options: Any) -> Self:
        """The supervisor a Celery ``task`` runs: the settings, one database engine per URL in
        this process, and ``host:pid`` as the worker's id."""
        settings = get_settings()
        factory = _FACTORIES.get(settings.database_url)
        if factory is None:
            engine = make_engine(settings.database_url)
            factory = _FACTORIES[settings.database_url] = make_session_factory(engine)
        hostname = getattr(task.request, "hostname", None) or socket.gethostname()
        return cls(settings, factory, f"{hostname}:{os.getpid()}", **options)

    def claimable(
        self, row: R | None, missing: str, held: Container[object], now: datetime
    ) -> R | str:
        """``row`` (locked by the caller) when this worker may take it, else why it is left as
        it is: ``missing`` (no such row), already finished, or in a ``held`` state (one a worker
        owns) on another worker that still heartbeats (the message was redelivered). A held row
        whose worker went quiet (:mod:`service.core.heartbeat`) is the caller's to take over."""
        if row is None:
            return missing
        if row.state.is_final:
            return f"already {row.state}"
        timeout = timedelta(seconds=self.settings.worker.heartbeat_timeout_s)
        if (
            row.state in held
            and row.worker_id != self.worker_id
            and not is_stale(row, timeout, now)
        ):
            return f"{row.state} on {row.worker_id} (fresh heartbeat): left alone"
        return row


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGTERM when this thread's process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


def child_environment(settings: Settings) -> dict[str, str]:
    """This process's environment, unbuffered, with the worker's devices pinned."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if settings.worker.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = settings.worker.gpus
    return env


def spawn(
    argv: Sequence[str], log_file: IO[bytes], settings: Settings, header: str
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, its output appended to ``log_file`` after the
    line ``header`` (raises OSError when it cannot start)."""
    log_file.write(f"{header}{' '.join(argv)}\n".encode())
    log_file.flush()
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=child_environment(settings),
        start_new_session=True,  # its own process group: signals reach every rank
        preexec_fn=_parent_death_signal(),
    )


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def watch(
    proc: subprocess.Popen[bytes],
    worker: WorkerSettings,
    tick: TickFn,
    name: str,
    *,
    should_stop: Callable[[], str | None] = lambda: None,
) -> str | None:
    """Wait for the child (see the module); returns why it was stopped, or None. ``should_stop``
    gives the reasons that need no database (a timeout, a worker shutdown), asked every poll even
    when ``tick`` fails. ``name`` (``job <id>``) starts the log lines."""
    last_heartbeat = time.monotonic()
    stopped: str | None = None
    term_at: float | None = None
    killed = False
    while proc.poll() is None:
        now = time.monotonic()
        heartbeat = now - last_heartbeat >= worker.heartbeat_interval_s
        try:
            stop = tick(heartbeat)
            if heartbeat:
                last_heartbeat = now
        except Exception:  # the database is away: let the child go on, try again next poll
            log.warning("%s: could not update the database", name, exc_info=True)
            stop = None
        stop = stop or should_stop()
        if stopped is None and stop is not None:
            stopped = stop
            log.info("%s: stopping its child (%s): SIGTERM", name, stopped)
            signal_group(proc, signal.SIGTERM)
            term_at = now
        if term_at is not None and not killed and now - term_at >= worker.kill_grace_s:
            log.warning(
                "%s: child still running %.0f s after SIGTERM: SIGKILL", name, worker.kill_grace_s
            )
            signal_group(proc, signal.SIGKILL)
            killed = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=worker.poll_interval_s)
    signal_group(proc, signal.SIGKILL)  # what it left behind in its group (ranks of a torchrun)
    return stopped


def stop_now(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, SIGKILL after ``grace_s``, and wait: the supervisor itself fails (or its worker
    is killed), the child must not outlive it."""
    if proc.poll() is not None:
        return
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait()
