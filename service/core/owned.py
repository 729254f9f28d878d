"""Rows of one owner: one by its id, or a page of them. Another owner's row is not found."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.errors import not_found
from service.core.models import Dataset, Gallery, Job

__all__ = ["owned", "owned_page"]

R = TypeVar("R", Dataset, Job, Gallery)


def owned(session: Session, model: type[R], owner: str, ident: uuid.UUID, kind: str) -> R:
    """``owner``'s ``model`` row ``ident``; not found (as ``kind``) when it is missing or
    another owner's."""
    row = session.execute(
        select(model).where(model.id == ident, model.owner == owner)
    ).scalar_one_or_none()
    if row is None:
        raise not_found(kind, ident)
    return row


def owned_page(
    session: Session,
    model: type[R],
    owner: str,
    *conditions: Any,
    order_by: tuple[Any, ...],
    limit: int,
    offset: int,
) -> tuple[list[R], int]:
    """One page of ``owner``'s ``model`` rows matching ``conditions``, and how many match."""
    where = [model.owner == owner, *conditions]
    total = session.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
    rows = session.execute(
        select(model).where(*where).order_by(*order_by).limit(limit).offset(offset)
    ).scalars()
    return list(rows), total
