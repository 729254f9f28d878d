"""Sending jobs to the broker, re-sending the ones it lost, and reaping dead workers' jobs.

The database is the source of truth; a message only says "look at job X". So:

* :func:`send_job` publishes a job id to its queue (:func:`worker.celery_app.resource_queue`) and
  never raises: if the broker is down, the job stays QUEUED in the database and is sent later.
  A successful send is recorded in ``heartbeat_at`` (for a waiting job it means "last sent to
  the broker"; a worker overwrites it with its own heartbeats once it picks the job).
* :meth:`Dispatcher.requeue_lost` sends waiting jobs (QUEUED, RETRYING) that were never sent
  (``dispatch_grace_s`` after their last change) or were sent long ago (``requeue_after_s``)
  without a worker picking them up. A duplicate message is harmless: the supervisor only starts
  a waiting job, so the second copy finds it running or finished and does nothing.
* :meth:`Dispatcher.reap` moves jobs whose worker stopped heartbeating (``heartbeat_timeout_s``):
  STARTING/RUNNING -> RETRYING (sent again, resumes from its checkpoint) or FAILED past
  ``max_retries``; CANCELLING -> CANCELLED. After a pass failed (the database was away), it
  reaps nothing for ``heartbeat_timeout_s``: supervisors could not heartbeat during the outage
  either, so an old heartbeat then says nothing about a dead worker until they had the time to
  write a new one.

``python -m worker dispatcher`` runs both every ``dispatcher_interval_s``; tests call
:meth:`Dispatcher.run_once` with a fake clock.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from service.db import session_scope
from service.job_states import lock_job
from service.models import Job, JobState, utcnow
from service.settings import Settings
from worker.celery_app import RUN_JOB_TASK, celery_app_for, celery_priority, resource_queue
from worker.outcome import ACTIVE_STATES, WAITING_STATES, reap_stale_job

__all__ = ["DispatchReport", "Dispatcher", "mark_dispatched", "send_and_mark", "send_job"]

log = logging.getLogger("worker.dispatcher")

#: ``send(job) -> bool``: publish one job; True when the broker took it.
SendFn = Callable[[Job], bool]


def send_job(settings: Settings, job: Job) -> bool:
    """Publish ``job``'s id to its queue; False (and a warning) when the broker refuses."""
    queue = resource_queue(job.gpus, job.queue, settings.queues[0])
    try:
        celery_app_for(settings).send_task(
            RUN_JOB_TASK,
            args=[str(job.id)],
            queue=queue,
            priority=celery_priority(job.priority, settings.job_bounds.max_priority),
            retry=False,
        )
    except Exception as exc:  # any broker error: the database keeps the job
        log.warning(
            "job %s: the broker did not take it (%s: %s); it stays %s and the dispatcher "
            "sends it later",
            job.id,
            type(exc).__name__,
            exc,
            job.state,
        )
        return False
    log.info("job %s sent to queue %s", job.id, queue)
    return True


def mark_dispatched(session: Session, job_id: uuid.UUID, now: datetime | None = None) -> bool:
    """Record a send in ``heartbeat_at`` if the job still waits (no worker took it meanwhile);
    True when it did."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(WAITING_STATES))
        .values(heartbeat_at=now or utcnow(), updated_at=Job.updated_at)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def send_and_mark(settings: Settings, session: Session, job: Job) -> bool:
    """:func:`send_job`, then :func:`mark_dispatched` committed in ``session`` (used by the API
    after it committed the new job). Never raises for a broker or database problem."""
    if not send_job(settings, job):
        return False
    now = utcnow()
    try:
        marked = mark_dispatched(session, job.id, now)
        session.commit()
        if marked:  # the caller's object shows what the database holds (not a pending change)
            set_committed_value(job, "heartbeat_at", now)
    except Exception:
        session.rollback()
        log.warning("job %s was sent, but recording the send failed", job.id, exc_info=True)
    return True


@dataclass
class DispatchReport:
    """What one pass did: job ids sent again, and reaped jobs with their new state."""

    requeued: list[uuid.UUID] = field(default_factory=list)
    reaped: dict[uuid.UUID, JobState] = field(default_factory=dict)


class Dispatcher:
    """Re-sends lost waiting jobs and reaps jobs of dead workers (see the module)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        clock: Callable[[], datetime] = utcnow,
        send: SendFn | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.clock = clock
        self.send: SendFn = send or (lambda job: send_job(settings, job))
        self._last_pass_failed = False
        #: When the database answered again after a failed pass (None: no outage seen).
        self._back_at: datetime | None = None

    def _send_and_mark(self, job: Job) -> bool:
        if not self.send(job):
            return False
        with session_scope(self.session_factory) as session:
            mark_dispatched(session, job.id, self.clock())
        return True

    def requeue_lost(self) -> list[uuid.UUID]:
        """Send waiting jobs never sent, or sent ``requeue_after_s`` ago and still waiting."""
        w = self.settings.worker
        now = self.clock()
        never_sent = and_(
            Job.heartbeat_at.is_(None),
            Job.updated_at < now - timedelta(seconds=w.dispatch_grace_s),
        )
        sent_long_ago = Job.heartbeat_at < now - timedelta(seconds=w.requeue_after_s)
        with self.session_factory() as session:
            jobs = list(
                session.execute(
                    select(Job)
                    .where(Job.state.in_(WAITING_STATES), or_(never_sent, sent_long_ago))
                    .order_by(Job.priority.desc(), Job.created_at)
                ).scalars()
            )
        sent = []
        for job in jobs:
            if self._send_and_mark(job):
                sent.append(job.id)
            else:
                break  # the broker is down: try again on the next pass
        if sent:
            log.info("re-sent %d waiting job(s): %s", len(sent), ", ".join(map(str, sent)))
        return sent

    def _is_stale(self, job: Job, cutoff: datetime) -> bool:
        if job.state not in ACTIVE_STATES:
            return False
        last = job.heartbeat_at or job.updated_at
        return last is not None and last < cutoff

    def reap(self) -> dict[uuid.UUID, JobState]:
        """Jobs whose worker stopped heartbeating: CANCELLED, RETRYING (sent again) or FAILED."""
        now = self.clock()
        timeout = timedelta(seconds=self.settings.worker.heartbeat_timeout_s)
        if self._last_pass_failed:
            self._back_at = now  # moves with every pass until one gets through
        if self._back_at is not None and now - self._back_at < timeout:
            log.info(
                "not reaping until %s: the database was away, heartbeats could not be written",
                f"{self._back_at + timeout:%H:%M:%S}",
            )
            return {}
        cutoff = now - timeout
        stale = or_(
            Job.heartbeat_at < cutoff,
            and_(Job.heartbeat_at.is_(None), Job.updated_at < cutoff),
        )
        with self.session_factory() as session:
            ids = list(
                session.execute(select(Job.id).where(Job.state.in_(ACTIVE_STATES), stale)).scalars()
            )
        reaped: dict[uuid.UUID, JobState] = {}
        for job_id in ids:
            with session_scope(self.session_factory) as session:
                job = lock_job(session, job_id)
                if job is None or not self._is_stale(job, cutoff):
                    continue  # it heartbeated or changed state since
                reaped[job_id] = reap_stale_job(session, job, now)
                log.warning("job %s reaped: %s (%s)", job_id, job.state, job.reason)
            if reaped[job_id] is JobState.RETRYING:
                self._send_and_mark(job)
        return reaped

    def run_once(self) -> DispatchReport:
        """One pass: reap, then re-send (a reaped job is sent at once)."""
        report = DispatchReport()
        try:
            report.reaped = self.reap()
            report.requeued = self.requeue_lost()
        except Exception:
            self._last_pass_failed = True
            raise
        self._last_pass_failed = False
        return report

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Pass after pass every ``dispatcher_interval_s`` until ``stop`` is set; errors (the
        database or the broker down) are logged and the next pass tries again."""
        stop = stop or threading.Event()
        interval = self.settings.worker.dispatcher_interval_s
        log.info("dispatcher started (every %.0f s)", interval)
        while not stop.is_set():
            try:
                report = self.run_once()
                if report.reaped or report.requeued:
                    log.info(
                        "pass: %d reaped, %d re-sent", len(report.reaped), len(report.requeued)
                    )
            except Exception:
                log.exception("dispatcher pass failed; trying again in %.0f s", interval)
            stop.wait(interval)
