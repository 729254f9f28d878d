"""The job state machine: :func:`change_state` is the one place a job's state changes.

::

    (new) -> QUEUED -> STARTING -> RUNNING -> SUCCEEDED
               |          |           |   \\-> FAILED
               |          |           |   \\-> RETRYING -> QUEUED | STARTING  (retry, resumes)
               |          |           \\-> CANCELLING -> CANCELLED (the trainer stopped)
               |          \\-> CANCELLING, FAILED, RETRYING
               \\-> CANCELLED (nothing runs yet), FAILED (could not be dispatched)

    FAILED | CANCELLED -> RETRYING   (retried by its owner: POST /v1/jobs/{id}/retry, resumes)

RETRYING from a running job is an automatic rerun, counted in one of the job's two budgets:
``restarts`` (bounded by ``max_restarts``) or ``retries`` (``max_retries``); which one is
:mod:`worker.outcome`'s decision. The owner's retry counts in neither and gives both back.

Every change writes a :class:`~service.core.models.JobEvent` row with the reason in the caller's
transaction, so the state and its history are committed (or rolled back) together
(:class:`service.core.state_machine.StateMachine`, shared with galleries). A worker uses::

    with session_scope(factory) as session:
        job = lock_job(session, job_id)          # FOR UPDATE; on SQLite, BEGIN IMMEDIATE
        change_state(session, job, JobState.RUNNING, "trainer started (pid 1234)")
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy.orm import Session

from service.core.models import Job, JobEvent, JobState
from service.core.state_machine import StateMachine

S = JobState

#: Allowed changes: from-state (None: a job being created) -> the states it may go to.
TRANSITIONS: Mapping[JobState | None, frozenset[JobState]] = {
    None: frozenset({S.QUEUED}),
    S.QUEUED: frozenset({S.STARTING, S.CANCELLED, S.FAILED}),
    S.STARTING: frozenset({S.RUNNING, S.CANCELLING, S.RETRYING, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLING, S.RETRYING}),
    # The trainer may finish (or crash) before it sees the cancel request.
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED}),
    S.RETRYING: frozenset({S.QUEUED, S.STARTING, S.CANCELLED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    # Final for the workers; the job's owner may ask for another attempt.
    S.FAILED: frozenset({S.RETRYING}),
    S.CANCELLED: frozenset({S.RETRYING}),
}

FINAL_STATES = frozenset(s for s in JobState if s.is_final)
#: States in which a worker owns the job and heartbeats.
ACTIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.CANCELLING})
#: States in which the job waits for a worker.
WAITING_STATES = frozenset({S.QUEUED, S.RETRYING})


#: The job machine: its transitions, and the table that records each change.
JOBS: StateMachine[Job, JobState, JobEvent] = StateMachine(
    "job", Job, JobState, TRANSITIONS, JobEvent, "job_id"
)


def change_state(
    session: Session,
    job: Job,
    to_state: JobState,
    reason: str,
    *,
    restart: bool = False,
    defer: bool = False,
) -> JobEvent:
    """Move ``job`` to ``to_state`` and record why; the caller commits (``defer``: see
    :meth:`service.core.state_machine.StateMachine.change`).

    Also keeps the fields that follow the state: ``reason`` (the last reason), ``cancel_requested``
    (set on CANCELLING), ``started_at`` (first RUNNING), ``finished_at`` (final states),
    ``updated_at`` and the two budgets of automatic reruns: RETRYING from a running job counts
    one ``restarts`` (``restart``: the trainer or its worker was killed from outside) or one
    ``retries`` (the trainer failed by itself). RETRYING from a final job is its owner's retry:
    it counts in neither, and the job gets both budgets afresh (``restarts`` and ``retries``
    back to 0), and loses ``finished_at``, its cancel request and its worker. Raises
    :class:`InvalidTransitionError` for a change :data:`TRANSITIONS` does not allow, before
    touching anything.
    """

    def follow(from_state: JobState | None, to_state: JobState, now: datetime) -> None:
        if to_state is S.CANCELLING:
            job.cancel_requested = True
        elif to_state is S.RUNNING and job.started_at is None:
            job.started_at = now
        elif to_state is S.RETRYING and from_state is not None and from_state.is_final:
            job.retries = job.restarts = 0
            job.finished_at = None
            job.cancel_requested = False
            job.worker_id = None
            job.heartbeat_at = None
        elif to_state is S.RETRYING and restart:
            job.restarts = (job.restarts or 0) + 1
        elif to_state is S.RETRYING:
            job.retries = (job.retries or 0) + 1
        if to_state.is_final:
            job.finished_at = now

    return JOBS.change(session, job, to_state, reason, follow, defer=defer)


#: Load a job for a state change, locked until the transaction ends (``FOR UPDATE``; on SQLite,
#: the write lock); ``owner`` restricts the lookup to that owner's jobs (the API), a worker passes none.
lock_job = JOBS.lock
