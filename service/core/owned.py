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
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.orm.interfaces import LoaderOption

from service.core.errors import not_found
from service.core.models import Dataset, Gallery, Job, PairCheck

__all__ = ["COUNT_LIMIT", "Cursor", "OwnedPage", "owned", "owned_page"]

R = TypeVar("R", Dataset, Job, Gallery, PairCheck)

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
class OwnedPage(Generic[R]):
    """One page of rows and what a client needs to go on: how many match (exact when
    ``total_exact``; else at least :data:`COUNT_LIMIT`) and the cursor of the next page (None
    on the last)."""

    rows: list[R]
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
    options: Sequence[LoaderOption] = (),
) -> OwnedPage[R]:
    """One page of ``owner``'s ``model`` rows matching ``conditions``, newest first (ties by
    id), from ``offset`` rows on or from just after ``after`` (or both). ``options``
    shape the load, e.g. ``load_only`` for list summaries."""
    where = [model.owner == owner, *conditions]
    matching = select(model.id).where(*where).limit(COUNT_LIMIT + 1).subquery()
    counted = session.execute(select(func.count()).select_from(matching)).scalar_one()
    page = select(model).where(*where)
    if after is not None:
        page = page.where(tuple_(model.created_at, model.id) < (after.created_at, after.id))
    page = page.order_by(model.created_at.desc(), model.id.desc()).limit(limit).offset(offset)
    rows = list(session.execute(page.options(*options)).scalars())
    last = rows[-1] if len(rows) == limit else None
    return OwnedPage(
        rows=rows,
        total=min(counted, COUNT_LIMIT),
        total_exact=counted <= COUNT_LIMIT,
        next_after=Cursor(last.created_at, last.id).encode() if last is not None else None,
    )
