"""One staleness rule: :func:`is_stale` on a row and :func:`stale_clause` in the database agree,
for a row that heartbeated and for one that never did (its last change counts)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.core.heartbeat import is_stale, last_sign_of_life, stale_clause
from service.core.models import Job
from tests.service.conftest import queued_job

TIMEOUT = timedelta(seconds=60)
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _job(session: Session, heartbeat_at: datetime | None, updated_at: datetime) -> Job:
    job = queued_job(session)
    # updated_at is set on every change: write both columns as they would be at that moment.
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(heartbeat_at=heartbeat_at, updated_at=updated_at)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(job)
    return job


@pytest.mark.parametrize(
    ("heartbeat_at", "updated_at", "seconds_later", "stale"),
    [
        (T0, T0, 59, False),  # heartbeated 59 s ago
        (T0, T0, 60, False),  # exactly the timeout: not yet
        (T0, T0, 61, True),  # more than the timeout: gone
        (T0, T0 + timedelta(seconds=50), 61, True),  # a later change is not a heartbeat
        (None, T0, 59, False),  # claimed 59 s ago, no heartbeat yet: not judged gone
        (None, T0, 61, True),  # claimed and never heard of
    ],
)
def test_the_row_rule_and_the_query_agree(
    session: Session,
    heartbeat_at: datetime | None,
    updated_at: datetime,
    seconds_later: int,
    stale: bool,
) -> None:
    job = _job(session, heartbeat_at, updated_at)
    now = T0 + timedelta(seconds=seconds_later)

    assert last_sign_of_life(job) == (heartbeat_at or updated_at)
    assert is_stale(job, TIMEOUT, now) is stale
    found = session.execute(
        select(Job.id).where(Job.id == job.id, stale_clause(Job, now - TIMEOUT))
    ).scalar_one_or_none()
    assert (found == job.id) is stale
