"""The row versions of jobs and galleries, kept in the API process for a fraction of a second, so
that a poll whose ETag still matches is answered without a database round trip.

A dashboard asks for each unfinished job every 2 s with ``If-None-Match``
(:mod:`service.api.conditional`); most answers are 304. Each would read the row's owner and
version (one primary-key read, :func:`read_owner_and_version`); :class:`RowVersionCache` keeps
that pair for ``REID_VERSION_CACHE_SECONDS`` (default 0.5). The rule:

- An entry is (kind, id) -> (owner, version), trusted until that many seconds after the read
  that stored it began; the next conditional read after that goes to the database and stores
  it again. A full read of the row (the 200 answer, :meth:`RowVersionCache.read_row`) always
  reads the database and stores it too.
- A commit of this process's sessions (:meth:`RowVersionCache.watch`) that updated or deleted a
  job or gallery drops its entry at once: rows the ORM flushed by their instances, UPDATE and
  DELETE statements by the ids their WHERE names (every entry of that kind when it names none).
  A read under way meanwhile is not stored (:mod:`service.core.ttl_cache`). Cancel, retry,
  dispatch marking, a gallery's delete or retry: all go through these sessions. A statement
  run on ``session.connection()`` bypasses the session's events: write through the session.
- A change made by another process (the worker's supervisor writing progress, the dispatcher,
  another API process) is seen once the entry expires: a poll may answer 304 for up to
  ``REID_VERSION_CACHE_SECONDS`` after the row changed. That is the staleness this cache adds
  to a dashboard, on top of its polling period.
- Ownership is checked against the stored owner: another owner's row is not found, the answer
  the database read gives. A row that does not exist is never stored.
- 0 seconds keeps nothing: every conditional read goes to the database.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Delete, Update, event, select
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList

from service.core.errors import not_found
from service.core.models import Gallery, Job
from service.core.owned import owned
from service.core.ttl_cache import TtlCache

R = TypeVar("R", Job, Gallery)

#: The versioned tables, and what a client calls their rows (the kind in "not found" answers).
_KINDS = {Job.__tablename__: "job", Gallery.__tablename__: "gallery"}

#: Most entries an API process keeps (a few hundred bytes each): more rows than dashboards poll.
MAX_ENTRIES = 20_000

_Key = tuple[str, uuid.UUID]


@dataclass(frozen=True)
class OwnedRow(Generic[R]):
    """A job or gallery as a request names it: its table, its id, and the owner asking."""

    model: type[R]
    id: uuid.UUID
    owner: str

    @property
    def kind(self) -> str:
        return _KINDS[self.model.__tablename__]

    @property
    def key(self) -> _Key:
        return (self.kind, self.id)


@dataclass(frozen=True)
class _Entry:
    owner: str
    version: int


@dataclass
class _Changes:
    """What a session's transaction changed so far: rows by key, and the kinds of which a
    statement may have changed any row."""

    rows: set[_Key] = field(default_factory=set)
    every_row_of: set[str] = field(default_factory=set)


def read_owner_and_version(
    session: Session, model: type[Job] | type[Gallery], ident: uuid.UUID
) -> tuple[str, int] | None:
    """The owner and row version of ``model`` row ``ident``, whoever owns it (one read by
    primary key); None when there is no such row."""
    # A Core statement on the session's connection: the ORM's machinery (entities, identity
    # map) would cost more than the query for two values, on every poll.
    query = select(model.owner, model.version).where(model.id == ident)
    found = session.connection().execute(query).one_or_none()
    return None if found is None else (found.owner, found.version)


class RowVersionCache:
    """(kind, id) -> (owner, version) of jobs and galleries, each trusted for ``ttl_s`` seconds,
    dropped at once when this process changes the row (the rule: the module's docstring)."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: TtlCache[_Key, _Entry] = TtlCache(ttl_s, max_entries, clock)

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, row: OwnedRow[Any]) -> int | None:
        """The row's version if the cache holds it (no database read), else None; not found
        when the cache knows the row as another owner's."""
        entry = self._entries.get(row.key)
        if entry is None:
            return None
        if entry.owner != row.owner:
            raise not_found(row.kind, row.id)
        return entry.version

    def read_entry(self, session: Session, row: OwnedRow[Any]) -> tuple[str, int] | None:
        """The row's owner and version read from the database, and kept, whoever asks; None
        when there is no such row. :meth:`owned_version` judges it for the asker."""
        read = self._entries.begin_read()
        found = read_owner_and_version(session, row.model, row.id)
        if found is not None:
            self._entries.put(row.key, _Entry(*found), read)
        return found

    @staticmethod
    def owned_version(row: OwnedRow[Any], found: tuple[str, int] | None) -> int:
        """The version of ``found`` (:meth:`read_entry`) for ``row``'s owner; not found when
        there is no such row or it is another owner's, as in :func:`service.core.owned.owned`."""
        if found is None or found[0] != row.owner:
            raise not_found(row.kind, row.id)
        return found[1]

    def read_row(self, session: Session, row: OwnedRow[R]) -> R:
        """The whole row read from the database (the full answer), its version kept; not
        found as in :func:`service.core.owned.owned`."""
        read = self._entries.begin_read()
        found = owned(session, row.model, row.owner, row.id, row.kind)
        self._entries.put(row.key, _Entry(found.owner, found.version), read)
        return found

    def watch(self, sessions: sessionmaker[Session]) -> None:
        """Drop the entry of every job or gallery that a session of ``sessions`` updates or
        deletes, once its transaction commits (before the commit, a concurrent poll could read
        the old version again and keep it)."""
        event.listen(sessions, "after_flush", self._note_flushed)
        event.listen(sessions, "do_orm_execute", self._note_statement)
        event.listen(sessions, "after_commit", self._forget_committed)

    # -- the session events ---------------------------------------------------------------------

    def _changes(self, session: Session) -> _Changes:
        changes: _Changes = session.info.setdefault(self, _Changes())
        return changes

    def _note_flushed(self, session: Session, _context: Any) -> None:
        # In after_flush, `dirty` and `deleted` still list what the flush just wrote. An object
        # set to the values it had is listed too: one read more, never a stale answer.
        for instance in (*session.dirty, *session.deleted):
            if isinstance(instance, Job | Gallery):
                self._changes(session).rows.add((_KINDS[instance.__tablename__], instance.id))

    def _note_statement(self, state: ORMExecuteState) -> None:
        statement = state.statement
        if not isinstance(statement, Update | Delete):
            return
        table = getattr(statement.table, "name", None)  # an ORM statement's is an annotated copy
        if table not in _KINDS:
            return
        kind = _KINDS[table]
        ids = _ids_named(statement, table)
        changes = self._changes(state.session)
        if ids is None:
            changes.every_row_of.add(kind)
        else:
            changes.rows.update((kind, ident) for ident in ids)

    def _forget_committed(self, session: Session) -> None:
        # A change rolled back stays noted until the session's next commit or its end: one
        # read more, never a stale answer.
        changes = session.info.pop(self, None)
        if changes is None:
            return
        if changes.every_row_of:
            self._entries.discard_where(lambda key, _entry: key[0] in changes.every_row_of)
        if changes.rows:
            self._entries.discard(changes.rows)


def _ids_named(statement: Update | Delete, table: str) -> set[uuid.UUID] | None:
    """The ids an UPDATE or DELETE of ``table`` is restricted to: a term ``id = :x`` or ``id IN
    (:xs)`` of its WHERE (alone or AND-ed with others); None when it names none."""
    where = statement.whereclause
    if isinstance(where, BooleanClauseList) and where.operator is operators.and_:
        terms = list(where.clauses)
    elif where is not None:
        terms = [where]
    else:
        return None
    for term in terms:
        if not isinstance(term, BinaryExpression) or not isinstance(term.right, BindParameter):
            continue
        column = term.left
        on_table = getattr(getattr(column, "table", None), "name", None)
        if getattr(column, "key", None) != "id" or on_table != table:
            continue
        value = term.right.effective_value
        values: list[Any]
        if term.operator is operators.eq:
            values = [value]
        elif term.operator is operators.in_op and isinstance(value, list | tuple):
            values = list(value)
        else:
            continue
        # an id given as text (or anything else) is not a key of the cache: drop every row
        ids = [v for v in values if isinstance(v, uuid.UUID)]
        return set(ids) if len(ids) == len(values) else None
    return None
