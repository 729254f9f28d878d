"""Conditional GETs that cost almost nothing when nothing changed.

A job's or gallery's ETag is made of its row version (``version``: +1 in every UPDATE of the row,
:class:`service.core.models.Job`), so ``If-None-Match`` is answered from that integer alone: no
row, no JSON, no hash of a body. The API process keeps the versions it read for
``REID_VERSION_CACHE_SECONDS`` (:mod:`service.core.row_versions`, which says when an entry is
dropped): a poll whose version is kept is answered in the event loop without a database read;
otherwise the version (and owner) is read by primary key on the process's poll threads, one read
for the requests of that row that need it at once (:class:`SharedReads`). A full answer (200)
at a version served before is the JSON kept for it (:mod:`service.api.body_cache`): neither the
row nor its encoding again. The version alone does not say what the body looks like, so the
ETag also carries a *representation tag*: a short hash of the response model's JSON schema and
of the settings that enter the body (the MLflow UI address of ``mlflow_run_url``). A deployment
that changes either invalidates every ETag a client holds. A route answers one row's GET through
its ``ConditionalGetDep`` (:class:`ConditionalGet`).

A list page's ETag is weak (``W/``): a hash of the rows' ids and versions, the count and the query.

Dashboards send ``If-None-Match`` every 2 s per open job (``static/js/api.js``,
``ConditionalResource``); these answers are what they mostly get.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Header, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from service.api.body_cache import BodyCache
from service.core.models import Gallery, Job
from service.core.row_versions import OwnedRow, RowVersionCache
from service.core.settings import Settings

#: The request header, as a route parameter.
IfNoneMatch = Annotated[str | None, Header()]

#: The 304 of a route's documented responses.
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified since the ETag given"}
}


@functools.cache
def _schema_digest(model: type[BaseModel]) -> str:
    schema = json.dumps(model.model_json_schema(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(schema.encode("utf-8")).hexdigest()


def _representation(model: type[BaseModel], settings: Settings) -> str:
    text = f"{_schema_digest(model)}|{settings.mlflow.ui_url or ''}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def row_etag(model: type[BaseModel], settings: Settings, version: int) -> str:
    """The strong ETag of a row at ``version``, served as ``model``."""
    return f'"v{version}-{_representation(model, settings)}"'


def list_etag(
    model: type[BaseModel],
    settings: Settings,
    query: str,
    rows: Iterable[tuple[uuid.UUID, int]],
    total: int,
) -> str:
    """The weak ETag of a list page: its rows (id, version) in order, the count, the query
    (filters, limit, cursor) and the representation of its items."""
    digest = hashlib.sha256(f"{_representation(model, settings)}|{query}|{total}".encode())
    for ident, version in rows:
        digest.update(f"|{ident.hex}.{version}".encode())
    return f'W/"{digest.hexdigest()[:32]}"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` names ``etag`` (the weak comparison of RFC 9110 13.1.2: ``W/`` ignored)."""
    if if_none_match is None:
        return False
    bare = etag.removeprefix("W/")
    candidates = (c.strip() for c in if_none_match.split(","))
    return any(c == "*" or c.removeprefix("W/") == bare for c in candidates)


def not_modified(etag: str) -> Response:
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})


def tagged(
    body: BaseModel, etag: str, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``body`` as JSON with its ETag; clients revalidate before using what they kept."""
    return tagged_json(body.model_dump_json().encode("utf-8"), etag, status_code, headers)


def tagged_json(
    body: bytes, etag: str, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``body``, JSON already encoded, with its ETag (:func:`tagged`)."""
    return Response(
        content=body,
        status_code=status_code,
        media_type="application/json",
        headers={"ETag": etag, "Cache-Control": "no-cache", **(headers or {})},
    )


R = TypeVar("R", Job, Gallery)
T = TypeVar("T")


def poll_threads(count: int) -> ThreadPoolExecutor:
    """The threads that read the database for conditional GETs (``REID_POLL_THREADS``), apart
    from the thread pool of the sync routes: a poll never queues behind an upload being
    unpacked. :func:`start_threads` starts them before the first request."""
    return ThreadPoolExecutor(max_workers=count, thread_name_prefix="poll")


def start_threads(pool: ThreadPoolExecutor, count: int) -> None:
    """Start ``count`` threads of ``pool`` now. A pool starts a thread when a task finds none
    idle, and the event loop waits for each start (the new thread must get the GIL from the
    busy ones): started lazily, a burst of polls would stall every request for as long."""
    everyone = threading.Barrier(count)
    for started in [pool.submit(everyone.wait, 30) for _ in range(count)]:
        started.result()


class SharedReads(Generic[T]):
    """Reads of the database under way in this process, by key: a request that needs what
    another request is already reading waits for that read instead of starting its own.

    A job's kept version expires (``REID_VERSION_CACHE_SECONDS``) while every tab and client
    polling it asks again: without this, each of those polls is a thread of the pool reading
    the same integer at once. A request served by a read that began before it arrived gets an
    answer at most that read's duration older: within the row-version cache's rule (a version
    is trusted for the TTL after its read began). The read runs as a task of its own, so a
    client that goes away cancels its wait, never the others' read. Reads run on ``threads``."""

    def __init__(self, threads: Executor) -> None:
        self.threads = threads
        self._reads: dict[Hashable, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._reads)

    async def read(self, key: Hashable, read: Callable[[], T]) -> T:
        """``read()``'s result (run on the threads), or that of the read of ``key`` under way;
        its exception raised in every request that waited for it."""
        pending = self._reads.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(self.threads, read)
            self._reads[key] = pending
            pending.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(pending)

    def _done(self, key: Hashable, read: asyncio.Future[T]) -> None:
        del self._reads[key]
        if not read.cancelled():
            read.exception()  # retrieved here too: every waiter may have gone


@dataclass(frozen=True)
class ConditionalGet:
    """A ``GET`` of one job or gallery with its ETag (a route's ``ConditionalGetDep``)."""

    if_none_match: str | None
    settings: Settings
    versions: RowVersionCache
    bodies: BodyCache
    sessions: sessionmaker[Session]
    reads: SharedReads[tuple[str, int] | None]  # and the poll threads, ``reads.threads``

    async def answer(
        self, row: OwnedRow[R], model: type[BaseModel], serve: Callable[[R], BaseModel]
    ) -> Response:
        """The 304 when ``If-None-Match`` names the row's version, else the row, as ``serve``
        shapes it (``model``), with its ETag. The version from the cache (``versions``), else,
        for a conditional request, read alone (``reads``: shared with the requests of the row
        reading it already); a 304, or the JSON kept for that version (``bodies``), from there;
        else the row read and encoded on the poll threads (``reads.threads``: :meth:`_read`).
        Raises not found like the full read would (another owner's row, a missing one)."""
        version = self.versions.peek(row)
        if version is None and self.if_none_match is not None:
            found = await self.reads.read(row.key, functools.partial(self._read_entry, row))
            version = self.versions.owned_version(row, found)
        if version is not None and (kept := self._kept(row, model, version)) is not None:
            return kept
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.reads.threads, functools.partial(self._read, row, model, serve)
        )

    def _read_entry(self, row: OwnedRow[R]) -> tuple[str, int] | None:
        with self.sessions() as session:
            return self.versions.read_entry(session, row)

    def _kept(self, row: OwnedRow[R], model: type[BaseModel], version: int) -> Response | None:
        """The answer at ``version`` without the database: a 304, or the JSON kept for it."""
        etag = row_etag(model, self.settings, version)
        if matches(self.if_none_match, etag):
            return not_modified(etag)
        body = self.bodies.get(model, row.id, row.owner, version)
        return None if body is None else tagged_json(body, etag)

    def _read(
        self, row: OwnedRow[R], model: type[BaseModel], serve: Callable[[R], BaseModel]
    ) -> Response:
        """The answer from the row read in a session of its own that is closed here (its
        connection goes back to the pool in this thread, not in another hop), encoded unless
        its JSON is kept."""
        with self.sessions() as session:
            found = self.versions.read_row(session, row)
        body = self.bodies.get(model, row.id, row.owner, found.version)
        if body is None:
            body = self.bodies.encoded(model, row.id, row.owner, found.version, serve(found))
        return tagged_json(body, row_etag(model, self.settings, found.version))


async def _conditional_get(request: Request, if_none_match: IfNoneMatch = None) -> ConditionalGet:
    # Async, and what the app keeps read from its state rather than through a dependency each:
    # a poll answered from the caches never waits for the thread pool, and costs little else.
    state = request.app.state
    return ConditionalGet(
        if_none_match,
        state.settings,
        state.row_versions,
        state.bodies,
        state.read_session_factory,
        state.version_reads,
    )


ConditionalGetDep = Annotated[ConditionalGet, Depends(_conditional_get)]
