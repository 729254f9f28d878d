"""Fixtures of the fault tests: private PostgreSQL and Redis servers the tests stop and restart
(see :mod:`tests.reliability.servers`), and settings pointing at them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.core import migrate
from tests.reliability.servers import PostgresServer, RedisServer


@pytest.fixture(autouse=True)
def _no_reid_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test alone, not from the developer's REID_* variables."""
    for name in list(os.environ):
        if name.startswith("REID_") and not name.startswith("REID_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL cluster of this test alone, removed afterwards."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def own_database(own_postgres: PostgresServer) -> str:
    """The URL of a migrated database on :func:`own_postgres`."""
    url = own_postgres.create_database()
    migrate.upgrade(url)
    return url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of this test alone (no persistence), stopped afterwards."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()
