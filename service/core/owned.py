"""Rows of one owner: one by its id, or a page of them, newest first. Another owner's row is
not found. (A row's version alone, for conditional GETs: :mod:`service.core.row_versions`.)

Pages are read by offset or by a cursor (``after``: the position of the last row of the page
before, keyset pagination: an index range scan wherever the page is). Their count stops at
:data:`COUNT_LIMIT`: counting every row of an owner with 100,000 jobs on each poll of the first
page would cost more than the page itself.
"""

from __future__ import annotations

import base64
import binascii
import functools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, bindparam, func, select, tuple_
from sqlalchemy.orm import Session

from service.core.errors import not_found
from service.core.models import Dataset, Gallery, Job, PairCheck

R = TypeVar("R", Dataset, Job, Gallery, PairCheck)
T = TypeVar("T")

#: A page's count is exact up to this many matching rows; beyond, it says "at least this many".
COUNT_LIMIT = 1000


def owned(session: Session, model: type[R], owner: str, ident: uuid.UUID, kind: str) -> R:
    """``owner``'s ``model`` row ``ident``; not found (as ``kind``) when it is missing or
    another owner's."""
    row = session.execute(
        select(model).where(model.id == ident, model.owner == owner)
    ).scalar_one_or_none()
    if row is None:
        raise not_found(kind, ident)
    return row


@dataclass(frozen=True)
class Cursor:
    """A position in a newest-first list: just after the row created at ``created_at`` with id
    ``id``. Sent to clients as an opaque URL-safe string (:meth:`encode`)."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor ``text`` stands for; ValueError when no page gave it out."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
            when, ident = raw.split("|")
            cursor = cls(datetime.fromisoformat(when), uuid.UUID(ident))
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{text!r} is not a cursor") from exc
        if cursor.created_at.tzinfo is None:
            raise ValueError(f"{text!r} is not a cursor")
        return cursor


@dataclass(frozen=True)
class OwnedPage(Generic[T]):
    """One page of rows and what a client needs to go on: how many match (exact when
    ``total_exact``; else at least :data:`COUNT_LIMIT`) and the cursor of the next page (None
    on the last)."""

    rows: list[T]
    total: int
    total_exact: bool
    next_after: str | None


def owned_page(
    session: Session,
    model: type[R],
    owner: str,
    *conditions: Any,
    limit: int,
    offset: int = 0,
    after: Cursor | None = None,
) -> OwnedPage[R]:
    """One page of ``owner``'s ``model`` rows matching ``conditions``, newest first (ties by
    id), from ``offset`` rows on or from just after ``after`` (or both)."""
    where = [model.owner == owner, *conditions]
    counted = _count(session, model, where)
    page = select(model).where(*where)
    if after is not None:
        page = page.where(tuple_(model.created_at, model.id) < (after.created_at, after.id))
    page = page.order_by(model.created_at.desc(), model.id.desc()).limit(limit).offset(offset)
    return _paged(list(session.execute(page).scalars()), counted, limit)


@dataclass(frozen=True)
class RowVersion:
    """A row of a page as a list's ETag and cursor need it: its id, version and creation."""

    id: uuid.UUID
    version: int
    created_at: datetime


def owned_page_versions(
    session: Session,
    model: type[Job] | type[Gallery],
    owner: str,
    *,
    filters: Mapping[str, Any] | None = None,
    limit: int,
    offset: int = 0,
    after: Cursor | None = None,
) -> OwnedPage[RowVersion]:
    """The page :func:`owned_page` reads, as each row's id, version and creation time alone
    (the page's ETag; the rows themselves are read by id when needed). ``filters``: column
    name -> the value it must have, or a list of values it may have.

    A list is polled, so its two statements are built once for each shape of request (which
    filters, with a cursor or not) and sent with the request's values as parameters: building
    and hashing a statement costs the API more than PostgreSQL takes to run it."""
    filters = dict(filters or {})
    shape = tuple(sorted((name, isinstance(value, list)) for name, value in filters.items()))
    count, page = _version_statements(model, shape, after is not None)
    values = {"owner": owner, "limit": limit, "offset": offset, **filters}
    if after is not None:
        values.update(after_created_at=after.created_at, after_id=after.id)
    connection = session.connection()
    counted = int(connection.execute(count, values).scalar_one())
    rows = [RowVersion(*row) for row in connection.execute(page, values)]
    return _paged(rows, counted, limit)


@functools.cache
def _version_statements(
    model: type[Job] | type[Gallery], filters: tuple[tuple[str, bool], ...], after: bool
) -> tuple[Select[Any], Select[Any]]:
    """The bounded count and the page of (id, version, created_at) of ``owner``'s rows with
    ``filters`` (name, whether a list of values), as statements with bound parameters."""
    columns = model.__table__.c
    where = [columns.owner == bindparam("owner")]
    for name, among in filters:
        column = columns[name]
        where.append(
            column.in_(bindparam(name, expanding=True)) if among else column == bindparam(name)
        )
    matching = select(columns.id).where(*where).limit(COUNT_LIMIT + 1).subquery()
    count = select(func.count()).select_from(matching)
    if after:
        position = (
            bindparam("after_created_at", type_=columns.created_at.type),
            bindparam("after_id", type_=columns.id.type),
        )
        where.append(tuple_(columns.created_at, columns.id) < tuple_(*position))
    page = (
        select(columns.id, columns.version, columns.created_at)
        .where(*where)
        .order_by(columns.created_at.desc(), columns.id.desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return count, page


def _count(session: Session, model: type[R], where: list[Any]) -> int:
    """Rows matching ``where``, counted up to one more than :data:`COUNT_LIMIT`."""
    matching = select(model.id).where(*where).limit(COUNT_LIMIT + 1).subquery()
    return int(session.execute(select(func.count()).select_from(matching)).scalar_one())


def _paged(rows: list[T], counted: int, limit: int) -> OwnedPage[T]:
    last: Any = rows[-1] if len(rows) == limit else None
    return OwnedPage(
        rows=rows,
        total=min(counted, COUNT_LIMIT),
        total_exact=counted <= COUNT_LIMIT,
        next_after=Cursor(last.created_at, last.id).encode() if last is not None else None,
    )
