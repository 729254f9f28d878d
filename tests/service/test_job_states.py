"""The state machine: every change validated and recorded, in the caller's transaction."""

from __future__ import annotations

import itertools
import threading

import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.db import session_scope
from service.core.job_states import (
    FINAL_STATES,
    TRANSITIONS,
    change_state,
    lock_job,
)
from service.core.models import Job, JobEvent, JobState
from service.core.state_machine import InvalidTransitionError
from tests.service.conftest import queued_job

S = JobState


def _events(session: Session, job: Job) -> list[tuple[JobState | None, JobState, str]]:
    rows = session.execute(
        select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
    ).scalars()
    return [(e.from_state, e.to_state, e.reason) for e in rows]


def test_creation_is_the_first_event(session: Session) -> None:
    job = queued_job(session)
    assert job.state is S.QUEUED
    assert _events(session, job) == [(None, S.QUEUED, "submitted")]


def test_a_whole_life_with_a_retry(session: Session) -> None:
    job = queued_job(session)
    path = [S.STARTING, S.RUNNING, S.RETRYING, S.QUEUED, S.STARTING, S.RUNNING, S.SUCCEEDED]
    for i, state in enumerate(path):
        change_state(session, job, state, f"step {i}")
        session.commit()
    assert job.state is S.SUCCEEDED
    assert job.retries == 1
    assert job.started_at is not None
    assert job.finished_at is not None
    assert job.reason == f"step {len(path) - 1}"
    events = _events(session, job)
    assert [e[1] for e in events] == [S.QUEUED, *path]
    assert all(e[0] is prev for e, prev in zip(events[1:], [S.QUEUED, *path], strict=False))


def test_restarts_and_retries_are_counted_apart_and_the_owner_s_retry_resets_them(
    session: Session,
) -> None:
    job = queued_job(session)
    change_state(session, job, S.STARTING, "picked up")
    change_state(session, job, S.RETRYING, "killed by SIGKILL", restart=True)
    change_state(session, job, S.STARTING, "picked up")
    change_state(session, job, S.RETRYING, "crashed")
    assert (job.restarts, job.retries) == (1, 1)
    change_state(session, job, S.STARTING, "picked up")
    change_state(session, job, S.FAILED, "crashed again")
    change_state(session, job, S.RETRYING, "retry requested by alice")
    session.commit()
    assert (job.restarts, job.retries, job.finished_at) == (0, 0, None)


def test_cancelling_sets_the_flag_workers_poll(session: Session) -> None:
    job = queued_job(session)
    change_state(session, job, S.STARTING, "picked up")
    change_state(session, job, S.CANCELLING, "cancel requested")
    assert job.cancel_requested is True
    change_state(session, job, S.CANCELLED, "trainer stopped (exit 75)")
    session.commit()
    assert job.state is S.CANCELLED
    assert job.finished_at is not None


def test_every_refused_change_writes_nothing(session: Session) -> None:
    job = queued_job(session)
    before = _events(session, job)
    refused = [(a, b) for a, b in itertools.product(S, S) if b not in TRANSITIONS[a]]
    assert (S.QUEUED, S.RUNNING) in refused and (S.SUCCEEDED, S.QUEUED) in refused
    for from_state, to_state in refused:
        job.state = from_state  # set directly: only the refusal is under test
        with pytest.raises(InvalidTransitionError, match=f"from {from_state} to {to_state}"):
            change_state(session, job, to_state, "nope")
        assert job.state is from_state
    session.commit()
    assert _events(session, job) == before


def test_final_states_are_final() -> None:
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED} == FINAL_STATES
    # Only the job's owner reopens a finished job (a retry); SUCCEEDED stays.
    assert TRANSITIONS[S.SUCCEEDED] == frozenset()
    for state in FINAL_STATES - {S.SUCCEEDED}:
        assert TRANSITIONS[state] == frozenset({S.RETRYING})
    for state in set(S) - FINAL_STATES:
        assert TRANSITIONS[state], f"{state} has no way out"


def test_state_and_event_roll_back_together(app: FastAPI, session: Session) -> None:
    job = queued_job(session)
    change_state(session, job, S.STARTING, "picked up")
    session.rollback()
    with app.state.session_factory() as other:
        fresh = other.get(Job, job.id)
        assert fresh is not None
        assert fresh.state is S.QUEUED
        assert [e[1] for e in _events(other, fresh)] == [S.QUEUED]


def test_a_reason_is_required(session: Session) -> None:
    job = queued_job(session)
    with pytest.raises(ValueError, match="reason"):
        change_state(session, job, S.STARTING, "  ")


def test_worker_pattern_lock_then_change(app: FastAPI, session: Session) -> None:
    job = queued_job(session)
    with session_scope(app.state.session_factory) as worker:
        locked = lock_job(worker, job.id)
        assert locked is not None
        change_state(worker, locked, S.STARTING, "worker w1 picked it up")
        locked.worker_id = "w1"
    session.expire_all()
    assert session.get(Job, job.id).state is S.STARTING  # type: ignore[union-attr]
    with session_scope(app.state.session_factory) as worker:
        assert lock_job(worker, job.id, owner="bob") is None


def test_a_locked_job_is_not_changed_by_another_writer_until_the_lock_ends(
    app: FastAPI, session: Session
) -> None:
    """The supervisor's "trainer started" and the owner's cancel, racing on SQLite (no row
    locks): the cancel waits for the lock (the write lock, as ``FOR UPDATE`` would), then sees
    RUNNING and moves on from it; without the wait, RUNNING would be written over CANCELLING."""
    job = queued_job(session)
    change_state(session, job, S.STARTING, "picked up")
    session.commit()
    cancelled = threading.Event()

    def cancel() -> None:
        with session_scope(app.state.session_factory) as api:
            locked = lock_job(api, job.id, owner="alice")
            assert locked is not None
            change_state(api, locked, S.CANCELLING, "cancel requested by alice")
        cancelled.set()

    with session_scope(app.state.session_factory) as worker:
        locked = lock_job(worker, job.id)
        assert locked is not None and locked.state is S.STARTING
        other = threading.Thread(target=cancel)
        other.start()
        assert not cancelled.wait(1.0)  # held up by the lock, not done beside it
        change_state(worker, locked, S.RUNNING, "trainer started")
    other.join(10)
    assert cancelled.is_set()
    session.expire_all()
    fresh = session.get(Job, job.id)
    assert fresh is not None and fresh.state is S.CANCELLING and fresh.cancel_requested
    assert [e[1] for e in _events(session, fresh)] == [
        S.QUEUED,
        S.STARTING,
        S.RUNNING,
        S.CANCELLING,
    ]
