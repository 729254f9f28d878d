"""Engine and sessions. The schema itself belongs to Alembic (``python -m service migrate``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

#: Seconds to wait for a new PostgreSQL connection (libpq waits forever by default, so an
#: unreachable host would hang requests); ``connect_timeout`` in the URL wins.
PG_CONNECT_TIMEOUT_S = 10


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # SQLite leaves foreign keys off unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        # The API and the embedded worker share the file: wait for a lock rather than fail.
        cursor.execute("PRAGMA busy_timeout=10000")
    finally:
        cursor.close()


def _ping_after_idle(engine: Engine, idle_s: float) -> None:
    """Ping (``SELECT 1``) a pooled connection on checkout when it was idle in the pool for more
    than ``idle_s`` seconds (0: on every checkout); one that fails the ping is replaced by a new
    connection, never handed out.

    A connection used a moment ago was alive then, and a ping on every checkout (SQLAlchemy's
    ``pool_pre_ping``) is one more round trip on every request. What this leaves: when the
    server restarts while connections are in steady use, the request that finds its
    connection cut fails (the API's 503 "retry"), and that error invalidates every connection
    the pool holds, so the requests after it connect anew."""
    dialect = engine.dialect

    def checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since <= idle_s:
            return  # a new connection, or one used within idle_s
        try:
            alive = dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"the idle connection failed its ping: {exc}") from exc
        if not alive:
            raise DisconnectionError("the idle connection failed its ping")

    event.listen(engine, "checkin", checkin)
    event.listen(engine, "checkout", checkout)


def make_engine(
    url: str, *, pool_size: int | None = None, ping_idle_s: float = 0.0, **kwargs: Any
) -> Engine:
    """An engine for ``url``; for a SQLite file, its folder is created and WAL mode set; for
    PostgreSQL, connections idle for more than ``ping_idle_s`` seconds are pinged before use
    (:func:`_ping_after_idle`; 0: every checkout), connecting times out, and ``pool_size``
    (SQLAlchemy's default: 5) connections are kept open."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    # Rows inserted together (a group of submitted jobs) go as one short INSERT run for every
    # row (psycopg pipelines them), not as one INSERT with a VALUES list per row: psycopg parses
    # such a statement anew each time (it keeps no statement over 4 KB or 50 parameters).
    kwargs.setdefault("use_insertmanyvalues", False)
    if backend != "sqlite":
        if pool_size is not None:
            kwargs["pool_size"] = pool_size
        if backend == "postgresql" and "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S} | dict(
                kwargs.get("connect_args", {})
            )
        engine = create_engine(url, **kwargs)
        _ping_after_idle(engine, ping_idle_s)
        return engine
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not in_memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("connect_args", {"check_same_thread": False})
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _sqlite_pragmas)
    if not in_memory:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: routers return objects after the commit without reloading them.
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for requests that only read, on ``engine``'s pool in autocommit: each statement
    sees the database as of its own start, and no ``BEGIN`` or ``ROLLBACK`` goes to the server
    (two round trips of three for a read of one row). Nothing may be written through them: a
    write would be committed at once, statement by statement."""
    return sessionmaker(
        bind=engine.execution_options(isolation_level="AUTOCOMMIT"),
        expire_on_commit=False,
        autoflush=False,
    )


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session in a transaction: committed on success, rolled back on any error."""
    with factory() as session, session.begin():
        yield session


def hold_write_lock(session: Session) -> None:
    """On SQLite, take the database's write lock now (``BEGIN IMMEDIATE``), unless the
    session's transaction holds it already; on other databases, nothing.

    SQLite has no row locks (SQLAlchemy drops ``FOR UPDATE`` there), and its driver begins a
    transaction only before the first write, so a row read for a change is read outside the
    transaction that changes it: a writer that commits in between would be overwritten. With the
    write lock taken before the read, writers to the file run one after the other (each waits
    up to ``busy_timeout``); readers are not held up (WAL)."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return
    raw = connection.connection.dbapi_connection
    if raw is not None and not raw.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
