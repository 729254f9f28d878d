"""The dispatcher (re-sends waiting jobs the broker lost) and the reaper, on SQLite with a fake
clock and a fake broker."""

from __future__ import annotations

import uuid
from typing import cast

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import session_scope
from service.core.models import Gallery, GalleryState, Job, JobState
from service.core.settings import Settings
from tests.helpers import make_gallery
from tests.worker.conftest import FakeClock, MakeJob, event_states, load_job
from worker.dispatcher import Dispatcher

S = JobState
G = GalleryState


class FakeBroker:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.sent: list[uuid.UUID] = []

    def __call__(self, job: Job) -> bool:
        if self.up:
            self.sent.append(job.id)
        return self.up


def _dispatcher(
    settings: Settings, factory: sessionmaker[Session], clock: FakeClock, broker: FakeBroker
) -> Dispatcher:
    return Dispatcher(settings, factory, clock=clock, send=broker)


def test_reaper_restarts_then_fails(
    settings: Settings, factory: sessionmaker[Session], clock: FakeClock, make_job: MakeJob
) -> None:
    broker = FakeBroker()
    dispatcher = _dispatcher(settings, factory, clock, broker)
    job_id = make_job(
        states=(S.STARTING, S.RUNNING),
        max_restarts=1,
        max_retries=2,
        worker_id="w1:1",
        heartbeat_at=clock(),
    )
    clock.advance(30)  # fresh (timeout 60 s): left alone
    assert dispatcher.run_once().reaped == {}
    assert load_job(factory, job_id).state is S.RUNNING

    clock.advance(61)
    report = dispatcher.run_once()
    assert report.reaped == {job_id: S.RETRYING}
    assert broker.sent == [job_id]  # sent again at once, and marked as sent
    job = load_job(factory, job_id)
    assert job.state is S.RETRYING
    # a dead worker is a kill from outside: a restart, not a retry
    assert (job.restarts, job.retries) == (1, 0)
    assert job.worker_id is None
    assert job.heartbeat_at == clock()
    assert "w1:1 stopped heartbeating" in (job.reason or "")
    assert "restart 1 of 1" in (job.reason or "")

    # Its second run dies too: no restarts left (its retries are for crashes).
    other = make_job(
        states=(S.STARTING, S.RUNNING),
        max_restarts=1,
        restarts=1,
        max_retries=2,
        worker_id="w2:1",
        heartbeat_at=clock(),
    )
    clock.advance(120)
    report = dispatcher.run_once()
    assert report.reaped[other] is S.FAILED
    assert (load_job(factory, other).reason or "").endswith("; no restarts left (1 of 1 used)")
    assert event_states(factory, other)[-1] == "FAILED"


def test_reaper_cancels_a_cancelling_job_and_skips_finished_ones(
    settings: Settings, factory: sessionmaker[Session], clock: FakeClock, make_job: MakeJob
) -> None:
    broker = FakeBroker()
    cancelling = make_job(states=(S.STARTING, S.RUNNING, S.CANCELLING), heartbeat_at=clock())
    done = make_job(states=(S.STARTING, S.RUNNING, S.SUCCEEDED), heartbeat_at=clock())
    clock.advance(600)
    report = _dispatcher(settings, factory, clock, broker).run_once()
    assert report.reaped == {cancelling: S.CANCELLED}
    assert load_job(factory, done).state is S.SUCCEEDED
    assert broker.sent == []


def test_requeue_lost_waiting_jobs(
    settings: Settings, factory: sessionmaker[Session], clock: FakeClock, make_job: MakeJob
) -> None:
    broker = FakeBroker(up=False)
    dispatcher = _dispatcher(settings, factory, clock, broker)
    never_sent = make_job()  # the broker was down when it was submitted
    assert dispatcher.run_once().requeued == []  # within the grace period
    clock.advance(11)
    assert dispatcher.run_once().requeued == []  # broker still down: it stays QUEUED
    assert load_job(factory, never_sent).heartbeat_at is None

    broker.up = True
    assert dispatcher.run_once().requeued == [never_sent]
    assert load_job(factory, never_sent).heartbeat_at == clock()
    clock.advance(200)  # sent recently (requeue_after_s=300): not again
    assert dispatcher.run_once().requeued == []
    clock.advance(101)  # still waiting 300 s later: the message may be lost, send again
    assert dispatcher.run_once().requeued == [never_sent]
    assert broker.sent == [never_sent, never_sent]
    assert load_job(factory, never_sent).state is S.QUEUED


class FlakyDatabase:
    """A session factory that raises OperationalError while ``down``, like an unreachable
    PostgreSQL."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.down = False

    def __call__(self) -> Session:
        if self.down:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return self.factory()


def test_reaper_waits_a_heartbeat_timeout_after_a_database_outage(
    settings: Settings, factory: sessionmaker[Session], clock: FakeClock, make_job: MakeJob
) -> None:
    database = FlakyDatabase(factory)
    dispatcher = Dispatcher(
        settings,
        cast(sessionmaker[Session], database),
        clock=clock,
        send=FakeBroker(),
    )
    alive = make_job(states=(S.STARTING, S.RUNNING), worker_id="w1:1", heartbeat_at=clock())
    dead = make_job(states=(S.STARTING, S.RUNNING), worker_id="w2:1", heartbeat_at=clock())
    database.down = True
    for _ in range(10):  # five minutes without a database (timeout 60 s)
        clock.advance(30)
        with pytest.raises(OperationalError):
            dispatcher.run_once()
    database.down = False
    clock.advance(30)
    # both heartbeats are 330 s old, but nobody could write one: nothing is reaped yet
    assert dispatcher.run_once().reaped == {}
    clock.advance(10)
    with session_scope(factory) as session:  # the live supervisor heartbeats again
        session.execute(update(Job).where(Job.id == alive).values(heartbeat_at=clock()))
    clock.advance(40)
    assert dispatcher.run_once().reaped == {}  # 50 s after the outage: still holding
    clock.advance(20)
    # a heartbeat timeout after the outage: the job whose worker is silent is reaped
    assert dispatcher.run_once().reaped == {dead: S.FAILED}  # max_restarts 0
    assert load_job(factory, alive).state is S.RUNNING


def test_reaper_fails_a_gallery_build_whose_worker_died(
    settings: Settings, factory: sessionmaker[Session], clock: FakeClock
) -> None:
    dispatcher = _dispatcher(settings, factory, clock, FakeBroker())
    building = make_gallery(
        factory, state=G.BUILDING, worker_id="w1:1", heartbeat_at=clock(), updated_at=clock()
    )
    waiting = make_gallery(factory, updated_at=clock())  # QUEUED: no worker to lose yet
    ready = make_gallery(factory, state=G.READY, updated_at=clock())
    clock.advance(30)  # fresh (timeout 60 s): left alone
    assert dispatcher.run_once().failed_galleries == []

    clock.advance(31)
    report = dispatcher.run_once()
    assert report.failed_galleries == [building]
    assert report.reaped == {}
    with factory() as session:
        gallery = session.get(Gallery, building)
        assert gallery is not None
        assert gallery.state is G.FAILED and gallery.finished_at is not None
        assert (gallery.reason or "").startswith(
            "the build stopped: worker w1:1 sent no heartbeat since "
        )
        assert f"retry it (POST /v1/galleries/{building}/retry)" in (gallery.reason or "")
        assert [(e.from_state, e.to_state) for e in gallery.events][-1] == (G.BUILDING, G.FAILED)
        assert gallery.events[-1].reason == gallery.reason
        others = [session.get(Gallery, g) for g in (waiting, ready)]
        assert [g.state for g in others if g is not None] == [G.QUEUED, G.READY]
    assert dispatcher.run_once().failed_galleries == []  # FAILED is final: reaped once


def test_gallery_reaping_waits_after_a_database_outage(
    settings: Settings, factory: sessionmaker[Session], clock: FakeClock
) -> None:
    database = FlakyDatabase(factory)
    dispatcher = Dispatcher(
        settings, cast(sessionmaker[Session], database), clock=clock, send=FakeBroker()
    )
    building = make_gallery(
        factory, state=G.BUILDING, worker_id="w1:1", heartbeat_at=clock(), updated_at=clock()
    )
    database.down = True
    clock.advance(120)
    with pytest.raises(OperationalError):
        dispatcher.run_once()
    database.down = False
    clock.advance(30)
    assert dispatcher.run_once().failed_galleries == []  # its builder had no way to heartbeat
    clock.advance(61)
    assert dispatcher.run_once().failed_galleries == [building]
