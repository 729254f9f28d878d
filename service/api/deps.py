"""Typed request dependencies shared by the routers: the settings, database sessions, the
JSON kept of jobs' versions (the lists' items), the job submissions' group commit, and the
paging parameters of the lists."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from service.api.body_cache import BodyCache
from service.api.errors import APIError
from service.core.group_commit import GroupCommitter
from service.core.jobs import Submission
from service.core.models import Job
from service.core.owned import Cursor
from service.core.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


#: Threads that do nothing but close sessions. A close gives a connection back to the pool, so it
#: must never queue behind the thread pool's requests: with every one of those threads waiting
#: for a connection (more requests at once than the pool has connections), a close queued there
#: would wait for them and they for it, until the pool's timeout (30 s) failed them all.
_CLOSERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="session-close")


def _session_dependency(factory_name: str, doc: str) -> Callable[[Request], AsyncIterator[Session]]:
    """A dependency that yields one session of ``request.app.state.<factory_name>`` per request.

    Opened in the event loop (a session connects on its first statement, not here) and closed
    there too unless it holds a connection, whose return to the pool is a round trip to the
    database: that close runs in a thread of its own (:data:`_CLOSERS`). A sync dependency
    would cost two thread-pool hops on every request, a poll's 304 included."""

    async def dependency(request: Request) -> AsyncIterator[Session]:
        factory: sessionmaker[Session] = getattr(request.app.state, factory_name)
        session = factory()
        try:
            yield session
        finally:
            if session.in_transaction():
                await asyncio.get_running_loop().run_in_executor(_CLOSERS, session.close)
            else:
                session.close()

    dependency.__doc__ = doc
    return dependency


get_session = _session_dependency(
    "session_factory",
    "One session per request; the router commits, anything left open is rolled back.",
)
get_read_session = _session_dependency(
    "read_session_factory",
    "A session for a route that only reads: autocommit, no transaction round trips "
    "(:func:`service.core.db.make_read_session_factory`).",
)


async def get_body_cache(request: Request) -> BodyCache:
    bodies: BodyCache = request.app.state.bodies
    return bodies


async def get_job_submissions(request: Request) -> GroupCommitter[Submission, tuple[Job, bool]]:
    """The process's submissions, committed in groups (:func:`service.core.jobs.job_submissions`)."""
    submissions: GroupCommitter[Submission, tuple[Job, bool]] = request.app.state.job_submissions
    return submissions


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
BodyCacheDep = Annotated[BodyCache, Depends(get_body_cache)]
JobSubmissionsDep = Annotated[
    GroupCommitter[Submission, tuple[Job, bool]], Depends(get_job_submissions)
]

#: The largest ``offset``: the largest 64-bit integer, what PostgreSQL and SQLite take as OFFSET
#: (a larger one is refused by the schema rather than by the database driver).
MAX_OFFSET = 2**63 - 1


@dataclass(frozen=True)
class PageParams:
    """Where a list page starts and how long it is (``?limit=&offset=&after=``)."""

    limit: int
    offset: int
    after: Cursor | None
    after_text: str | None

    def query(self) -> str:
        """The parameters as one string (a list page's ETag covers them)."""
        return f"limit={self.limit}&offset={self.offset}&after={self.after_text or ''}"


def page_params(
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[
        int, Query(ge=0, le=MAX_OFFSET, description="Items to skip (after `after`, if given)")
    ] = 0,
    after: Annotated[
        str | None,
        Query(max_length=200, description="Start after this cursor: a page's `next_after`."),
    ] = None,
) -> PageParams:
    cursor = None
    if after is not None:
        try:
            cursor = Cursor.decode(after)
        except ValueError:
            message = f"after={after!r} is not a cursor: pass a page's `next_after` unchanged"
            raise APIError(
                422,
                "validation_error",
                message,
                details=[{"field": "query.after", "message": message, "value": after}],
            ) from None
    return PageParams(limit=limit, offset=offset, after=cursor, after_text=after)


PageDep = Annotated[PageParams, Depends(page_params)]
