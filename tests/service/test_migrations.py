"""Alembic owns the schema: up to head, down to base and up again, on SQLite and PostgreSQL;
the models and the migrations describe the same schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.core import migrate
from service.core.db import make_engine
from service.core.models import Base

TABLES = {
    "api_keys",
    "datasets",
    "jobs",
    "job_events",
    "galleries",
    "gallery_events",
    "pair_checks",
    "pair_answers",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _drift(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == TABLES
    engine = make_engine(url)
    try:
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()
    assert _drift(url) == [], "service/core/models.py and migrations/ disagree: add a revision"
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == TABLES


def test_sqlite_up_down_up(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'fresh.db'}")


def test_one_head() -> None:
    assert migrate.head_revision() == "0008"


@pytest.mark.integration
def test_postgresql_up_down_up(pg_databases: Callable[[], str]) -> None:
    _round_trip(pg_databases())
