"""When the worker holding a job or a gallery build is gone: one rule, in Python and in SQL.

A worker heartbeats the row it holds (``heartbeat_at``) every ``worker.heartbeat_interval_s``.
The row is **stale** when its last sign of life, the last heartbeat or, before the first one, the
row's last change (``updated_at``: the claim itself), is more than ``timeout`` in the past::

    stale  <=>  now - (heartbeat_at or updated_at) > timeout

The reaper (``python -m worker dispatcher``) finds stale rows with :func:`stale_clause` and checks
each again with :func:`is_stale` under the row's lock; a worker that receives a message for a row
another worker holds takes it over only when :func:`is_stale` says so. Which states count as
held (a job's ACTIVE_STATES, a gallery's BUILDING) is the caller's part.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_

from service.core.models import Gallery, Job


def last_sign_of_life(row: Job | Gallery) -> datetime | None:
    """The last heartbeat, or the row's last change before the first heartbeat."""
    return row.heartbeat_at or row.updated_at


def is_stale(row: Job | Gallery, timeout: timedelta, now: datetime) -> bool:
    """True when nothing was heard of ``row``'s worker for more than ``timeout``."""
    last = last_sign_of_life(row)
    return last is not None and now - last > timeout


def stale_clause(model: type[Job] | type[Gallery], cutoff: datetime) -> ColumnElement[bool]:
    """:func:`is_stale` as a WHERE clause, with ``cutoff = now - timeout``."""
    return or_(
        model.heartbeat_at < cutoff,
        and_(model.heartbeat_at.is_(None), model.updated_at < cutoff),
    )
