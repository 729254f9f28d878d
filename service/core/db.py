"""Engine and sessions. The schema itself belongs to Alembic (``python -m service migrate``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["PG_CONNECT_TIMEOUT_S", "make_engine", "make_session_factory", "session_scope"]

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


def make_engine(url: str, *, pool_size: int | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url``; for a SQLite file, its folder is created and WAL mode set; for
    PostgreSQL, connections are pinged before use, connecting times out, and ``pool_size``
    (SQLAlchemy's default: 5) connections are kept open."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend != "sqlite":
        # A connection that died with its server is replaced on checkout, not handed out.
        kwargs.setdefault("pool_pre_ping", True)
        if pool_size is not None:
            kwargs["pool_size"] = pool_size
        if backend == "postgresql" and "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S} | dict(
                kwargs.get("connect_args", {})
            )
        return create_engine(url, **kwargs)
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


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session in a transaction: committed on success, rolled back on any error."""
    with factory() as session, session.begin():
        yield session
