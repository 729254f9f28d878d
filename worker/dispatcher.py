"""Re-sending the jobs the broker lost, and reaping what dead workers left: jobs, gallery builds.

The database is the source of truth; a message only says "look at job X", and a duplicate one
finds the job running or finished and does nothing. :meth:`Dispatcher.requeue_lost` sends
waiting jobs never sent or sent long ago; :meth:`Dispatcher.reap` and
:meth:`Dispatcher.reap_galleries` settle jobs and builds whose worker stopped heartbeating, and
reap nothing for ``heartbeat_timeout_s`` after a pass that could not reach the database.
worker/README.md ("What a job goes through", the reaper) gives the rules; ``python -m worker
dispatcher`` runs them every ``dispatcher_interval_s``, tests call :meth:`Dispatcher.run_once`
with a fake clock.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from service.core.broker import mark_dispatched, send_job
from service.core.db import session_scope
from service.core.gallery_states import fail_if_stale, lock_gallery
from service.core.heartbeat import is_stale, stale_clause
from service.core.job_states import ACTIVE_STATES, WAITING_STATES, lock_job
from service.core.models import Gallery, GalleryState, Job, JobState, utcnow
from service.core.settings import Settings
from worker.outcome import reap_stale_job

log = logging.getLogger("worker.dispatcher")

#: ``send(job) -> bool``: publish one job; True when the broker took it.
SendFn = Callable[[Job], bool]


@dataclass
class DispatchReport:
    """What one pass did: job ids sent again, reaped jobs with their new state, and the ids of
    the gallery builds it failed."""

    requeued: list[uuid.UUID] = field(default_factory=list)
    reaped: dict[uuid.UUID, JobState] = field(default_factory=dict)
    failed_galleries: list[uuid.UUID] = field(default_factory=list)


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

    def _holding(self, now: datetime, timeout: timedelta) -> bool:
        """True while reaping waits after an outage of the database (see the module)."""
        if self._last_pass_failed:
            self._back_at = now  # moves with every pass until one gets through
        if self._back_at is not None and now - self._back_at < timeout:
            log.info(
                "not reaping until %s: the database was away, heartbeats could not be written",
                f"{self._back_at + timeout:%H:%M:%S}",
            )
            return True
        return False

    def _stale_ids(
        self, model: type[Job] | type[Gallery], states: Iterable[Any], cutoff: datetime
    ) -> list[uuid.UUID]:
        """Rows in ``states`` stale at ``cutoff`` (:func:`service.core.heartbeat.stale_clause`)."""
        query = select(model.id).where(model.state.in_(states), stale_clause(model, cutoff))
        with self.session_factory() as session:
            return list(session.execute(query).scalars())

    def reap(self) -> dict[uuid.UUID, JobState]:
        """Jobs whose worker stopped heartbeating: CANCELLED, RETRYING (sent again) or FAILED."""
        now = self.clock()
        timeout = timedelta(seconds=self.settings.worker.heartbeat_timeout_s)
        if self._holding(now, timeout):
            return {}
        cutoff = now - timeout
        ids = self._stale_ids(Job, ACTIVE_STATES, cutoff)
        reaped: dict[uuid.UUID, JobState] = {}
        for job_id in ids:
            with session_scope(self.session_factory) as session:
                job = lock_job(session, job_id)
                if job is None or job.state not in ACTIVE_STATES or not is_stale(job, timeout, now):
                    continue  # it heartbeated or changed state since
                reaped[job_id] = reap_stale_job(session, job, now)
                log.warning("job %s reaped: %s (%s)", job_id, job.state, job.reason)
            if reaped[job_id] is JobState.RETRYING:
                self._send_and_mark(job)
        return reaped

    def reap_galleries(self) -> list[uuid.UUID]:
        """Gallery builds whose worker stopped heartbeating: FAILED (their owner may retry)."""
        now = self.clock()
        timeout_s = self.settings.worker.heartbeat_timeout_s
        if self._holding(now, timedelta(seconds=timeout_s)):
            return []
        ids = self._stale_ids(Gallery, [GalleryState.BUILDING], now - timedelta(seconds=timeout_s))
        failed = []
        for gallery_id in ids:
            with session_scope(self.session_factory) as session:
                gallery = lock_gallery(session, gallery_id)
                # it may have heartbeated, finished or been deleted since
                if gallery is not None and fail_if_stale(session, gallery, timeout_s, now):
                    failed.append(gallery_id)
                    log.warning("gallery %s reaped: %s", gallery_id, gallery.reason)
        return failed

    def run_once(self) -> DispatchReport:
        """One pass: reap jobs and gallery builds, then re-send (a reaped job is sent at once)."""
        report = DispatchReport()
        try:
            report.reaped = self.reap()
            report.failed_galleries = self.reap_galleries()
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
                if report.reaped or report.requeued or report.failed_galleries:
                    log.info(
                        "pass: %d reaped, %d re-sent, %d gallery build(s) failed",
                        len(report.reaped),
                        len(report.requeued),
                        len(report.failed_galleries),
                    )
            except Exception:
                log.exception("dispatcher pass failed; trying again in %.0f s", interval)
            stop.wait(interval)
