"""What the job and gallery state machines share: :class:`StateMachine`.

A machine is data: the kind of row it moves, its transitions (from-state, None for a row being
created, -> the states it may go to) and the table its changes are recorded in.
:meth:`StateMachine.change` checks a change before touching anything, sets ``state``, ``reason``
and ``updated_at``, lets the machine set what goes with the state (``follow``: ``started_at``,
``finished_at``, a job's counters) and writes the event row in the caller's transaction, so the
state and its history are committed (or rolled back) together. The two machines:
:mod:`service.core.job_states`, :mod:`service.core.gallery_states`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from service.core.db import hold_write_lock
from service.core.errors import not_found
from service.core.models import utcnow


class InvalidTransitionError(ValueError):
    """A state change the machine does not allow (someone else moved the row first)."""


class _Row(Protocol):
    """A job or a gallery, as a state change sees it."""

    id: Any
    owner: Any
    state: Any
    reason: Any
    updated_at: Any


R = TypeVar("R", bound=_Row)
S = TypeVar("S", bound=StrEnum)
E = TypeVar("E")


@dataclass(frozen=True)
class StateMachine(Generic[R, S, E]):
    """The states of one kind of row (see the module)."""

    kind: str  # how errors name a row: "job", "gallery"
    model: type[R]
    states: type[S]
    transitions: Mapping[S | None, frozenset[S]]
    event: type[E]  # the event table
    event_key: str  # its column naming the row: "job_id", "gallery_id"

    def change(
        self,
        session: Session,
        row: R,
        to_state: S,
        reason: str,
        follow: Callable[[S | None, S, datetime], None],
        *,
        defer: bool = False,
    ) -> E:
        """Move ``row`` to ``to_state`` for ``reason`` and record it; the caller commits.

        ``follow(from_state, to_state, now)`` sets the fields that go with the state. With
        ``defer``, nothing is flushed and the event is only returned: rows changed together are
        written by one flush, then their events by :meth:`write_events`.
        """
        # A row being created has no state yet (None), whatever the type annotation says.
        from_state = self.states(row.state) if row.state is not None else None
        to_state = self.states(to_state)
        allowed = self.transitions[from_state]
        if to_state not in allowed:
            start, names = from_state or "(new)", ", ".join(sorted(allowed)) or "none (final state)"
            raise InvalidTransitionError(
                f"{self.kind} {row.id} cannot go from {start} to {to_state} (allowed from "
                f"{start}: {names})"
            )
        if not reason.strip():
            raise ValueError("a state change needs a reason")
        now = utcnow()
        if row.id is None:
            row.id = uuid.uuid4()
        row.state = to_state
        row.reason = reason
        row.updated_at = now
        follow(from_state, to_state, now)
        if from_state is None:
            session.add(row)
        fields = {"from_state": from_state, "to_state": to_state, "reason": reason, "at": now}
        event = self.event(**{self.event_key: row.id}, **fields)
        if not defer:
            session.add(event)
            session.flush()
        return event

    def write_events(self, session: Session, events: Sequence[E]) -> None:
        """Insert the events of :meth:`change` calls with ``defer``, in one statement run for
        all of them (their ids are not read back); their rows must be flushed first."""
        if not events:
            return
        keys = (self.event_key, "from_state", "to_state", "reason", "at")
        rows = [{key: getattr(event, key) for key in keys} for event in events]
        session.execute(insert(self.event), rows)

    def lock(self, session: Session, row_id: uuid.UUID, owner: str | None = None) -> R | None:
        """Load a row for a change, locked until the caller's transaction ends: ``FOR UPDATE``,
        or on SQLite the database's write lock (:func:`~service.core.db.hold_write_lock`);
        ``owner`` restricts the lookup to that owner's rows (the API), a worker passes none."""
        hold_write_lock(session)
        model: Any = self.model
        query = select(model).where(model.id == row_id).with_for_update()
        if owner is not None:
            query = query.where(model.owner == owner)
        # populate_existing: a row already in the session is refreshed from the locked read.
        row: R | None = session.execute(
            query.execution_options(populate_existing=True)
        ).scalar_one_or_none()
        return row

    def lock_owned(self, session: Session, row_id: uuid.UUID, owner: str) -> R:
        """:meth:`lock` of ``owner``'s row (the API): not found when it is missing or another
        owner's."""
        row = self.lock(session, row_id, owner)
        if row is None:
            raise not_found(self.kind, row_id)
        return row
