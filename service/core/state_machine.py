"""What the job and gallery state machines share: :class:`StateMachine`.

A machine is data: the kind of row it moves (``"job"``, ``"gallery"``), its transitions (from-state,
None for a row being created, -> the states it may go to) and the table its changes are recorded
in. :meth:`StateMachine.change` is the one way a row's state changes::

    check the change  ->  state, reason, updated_at  ->  follow(...)  ->  the event row

checked before anything is touched (:class:`InvalidTransitionError`, or a ``ValueError`` for an
empty reason), and written in the caller's transaction, so the state and its history are committed
(or rolled back) together. ``follow`` is the machine's own part: the fields that go with a state
(``started_at``, ``finished_at``, a job's counters). :mod:`service.core.job_states` and
:mod:`service.core.gallery_states` are the two machines.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.errors import not_found
from service.core.models import utcnow

__all__ = ["InvalidTransitionError", "StateMachine"]


class InvalidTransitionError(ValueError):
    """A state change the machine does not allow (someone else moved the row first);
    ``row_id``, ``from_state``, ``to_state`` say which."""

    def __init__(
        self,
        kind: str,
        row_id: uuid.UUID | None,
        from_state: StrEnum | None,
        to_state: StrEnum,
        allowed: Collection[StrEnum],
    ) -> None:
        start = from_state or "(new)"
        names = ", ".join(sorted(allowed)) or "none (final state)"
        super().__init__(
            f"{kind} {row_id} cannot go from {start} to {to_state} (allowed from {start}: {names})"
        )
        self.row_id = row_id
        self.from_state = from_state
        self.to_state = to_state


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
    event: Callable[..., E]  # the event table
    event_key: str  # its column naming the row: "job_id", "gallery_id"

    def change(
        self,
        session: Session,
        row: R,
        to_state: S,
        reason: str,
        follow: Callable[[S | None, S, datetime], None],
    ) -> E:
        """Move ``row`` to ``to_state`` for ``reason`` and record it; the caller commits.

        ``follow(from_state, to_state, now)`` sets the fields that go with the state.
        """
        # A row being created has no state yet (None), whatever the type annotation says.
        from_state = self.states(row.state) if row.state is not None else None
        to_state = self.states(to_state)
        allowed = self.transitions[from_state]
        if to_state not in allowed:
            raise InvalidTransitionError(self.kind, row.id, from_state, to_state, allowed)
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
        session.add(event)
        session.flush()
        return event

    def lock(self, session: Session, row_id: uuid.UUID, owner: str | None = None) -> R | None:
        """Load a row for a change, locking it (``FOR UPDATE``) where the database can;
        ``owner`` restricts the lookup to that owner's rows (the API), a worker passes none."""
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
