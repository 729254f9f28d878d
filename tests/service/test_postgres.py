"""The API against a real PostgreSQL database (a fresh one per session, dropped afterwards)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, create_engine, event, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from reid_core.run_dir import Progress
from service.app import create_app
from service.core import migrate
from service.core.api_keys import create_api_key
from service.core.db import make_engine, session_scope
from service.core.job_progress import progress_columns
from service.core.job_states import change_state, lock_job
from service.core.models import Job, JobState
from service.core.row_versions import RowVersionCache
from tests.service.conftest import TestClient, make_settings, write_image_folder

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg_url(pg_databases: Callable[[], str]) -> str:
    url = pg_databases()
    migrate.upgrade(url)
    return url


@pytest.fixture
def pg_app(tmp_path: Path, pg_url: str) -> Iterator[FastAPI]:
    app = create_app(make_settings(tmp_path, pg_url))
    yield app
    app.state.engine.dispose()


def _key(app: FastAPI, owner: str) -> dict[str, str]:
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, owner)
    return {"Authorization": f"Bearer {token}"}


def _dataset(client: TestClient, headers: dict[str, str], folder: Path, name: str) -> Any:
    response = client.post(
        "/v1/datasets", json={"name": name, "path": str(folder)}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_job_life_on_postgresql(pg_app: FastAPI) -> None:
    settings = pg_app.state.settings
    folder = write_image_folder(settings.dataset_roots[0] / "crops")
    with TestClient(pg_app) as client:
        alice, bob = _key(pg_app, "alice"), _key(pg_app, "bob")
        dataset = _dataset(client, alice, folder, "crops")
        created = client.post(
            "/v1/jobs",
            json={"dataset_id": dataset["id"], "config": {"schedule.epochs": 2, "name": "x"}},
            headers=alice,
        )
        job = created.json()
        assert job["state"] == "QUEUED"
        # JSONB returns the config's keys in its own order: the ETag does not depend on it
        fetched = client.get(f"/v1/jobs/{job['id']}", headers=alice)
        assert fetched.headers["ETag"] == created.headers["ETag"]
        assert job["resolved_config"]["schedule"]["epochs"] == 2
        assert client.get(f"/v1/jobs/{job['id']}", headers=bob).status_code == 404

        with session_scope(pg_app.state.session_factory) as session:
            row = lock_job(session, job["id"])
            assert row is not None
            change_state(session, row, JobState.STARTING, "worker picked it up")
            change_state(session, row, JobState.RUNNING, "trainer started")
        cancel = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
        assert (cancel.status_code, cancel.json()["state"]) == (202, "CANCELLING")
        assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 409
        with session_scope(pg_app.state.session_factory) as session:
            row = lock_job(session, job["id"])
            assert row is not None and row.cancel_requested
            change_state(session, row, JobState.CANCELLED, "trainer stopped")
        events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()
        assert [e["to_state"] for e in events] == [
            "QUEUED",
            "STARTING",
            "RUNNING",
            "CANCELLING",
            "CANCELLED",
        ]
        assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["dataset_id"] is None
        listed = client.get("/v1/jobs", params={"state": "CANCELLED"}, headers=alice).json()
        assert [j["id"] for j in listed["items"]] == [job["id"]]


def test_concurrent_requests_with_one_idempotency_key(pg_app: FastAPI) -> None:
    settings = pg_app.state.settings
    folder = write_image_folder(settings.dataset_roots[0] / "race")
    with TestClient(pg_app) as client:
        carol = _key(pg_app, "carol")
        dataset = _dataset(client, carol, folder, "race")
        body = {"dataset_id": dataset["id"], "idempotency_key": "same"}

        def submit(_: int) -> Any:
            return client.post("/v1/jobs", json=body, headers=carol)

        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(submit, range(4)))
        assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
        assert len({r.json()["id"] for r in responses}) == 1
        assert client.get("/v1/jobs", headers=carol).json()["total"] == 1


def test_a_diverged_loss_is_stored_and_served_as_null(pg_app: FastAPI) -> None:
    """A NaN loss (a diverged run) and an infinite ETA reach a job's JSONB metrics as null, and
    the job is still served (JSONB refuses NaN; the API's schema says null)."""
    settings = pg_app.state.settings
    folder = write_image_folder(settings.dataset_roots[0] / "diverged")
    progress = Progress(
        status="running",
        epoch=1,
        epochs=3,
        step_in_epoch=2,
        steps_per_epoch=4,
        global_step=6,
        progress=0.5,
        losses={"total": math.nan, "instance": 2.5},
        metrics={"mAP": math.inf, "epoch": 1.0},
        eta_seconds=math.inf,
    )
    with TestClient(pg_app) as client:
        alice = _key(pg_app, "alice")
        dataset = _dataset(client, alice, folder, "diverged")
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"]}, headers=alice).json()
        with session_scope(pg_app.state.session_factory) as session:
            row = lock_job(session, uuid.UUID(job["id"]))
            assert row is not None
            for name, value in progress_columns(progress).items():
                setattr(row, name, value)
        shown = client.get(f"/v1/jobs/{job['id']}", headers=alice)
        assert shown.status_code == 200, shown.text
        metrics = shown.json()["metrics"]
        assert metrics["losses"] == {"total": None, "instance": 2.5}
        assert metrics["eval"] == {"mAP": None, "epoch": 1.0}
        assert metrics["eta_seconds"] is None and shown.json()["progress"] == 0.5


def test_the_pool_keeps_the_configured_connections(tmp_path: Path, pg_url: str) -> None:
    """REID_DATABASE_POOL_SIZE connections stay open for a PostgreSQL server: requests served at
    once up to that many reuse them instead of connecting (a few ms each)."""
    for size in (10, 3):
        app = create_app(make_settings(tmp_path, pg_url, database_pool_size=size))
        try:
            pool = app.state.engine.pool
            assert pool.size() == size
            connections = [app.state.engine.connect() for _ in range(size + 2)]
            for connection in connections:
                connection.close()
            assert pool.checkedin() == size  # the overflow was closed, the pool kept
        finally:
            app.state.engine.dispose()


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(pg_url: str, pid: int) -> None:
    admin = create_engine(pg_url, poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        admin.dispose()


def _count_pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pings: list[int] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(1)
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return pings


@pytest.mark.parametrize("ping_idle_s", [0.2, 0.0])
def test_a_connection_idle_past_the_ping_time_is_pinged_and_a_dead_one_replaced(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, ping_idle_s: float
) -> None:
    engine = make_engine(pg_url, pool_size=1, ping_idle_s=ping_idle_s)
    try:
        pings = _count_pings(engine, monkeypatch)
        first = _backend_pid(engine)
        if ping_idle_s:
            assert _backend_pid(engine) == first and pings == []  # used a moment ago: no ping
        _terminate(pg_url, first)  # what a database restart does to an idle connection
        time.sleep(ping_idle_s * 1.5)
        pings.clear()
        second = _backend_pid(engine)  # pinged, found dead, replaced: no error
        assert pings == [1] and second != first
    finally:
        engine.dispose()


def test_a_connection_cut_while_in_steady_use_fails_one_request_then_the_pool_reconnects(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trade-off of pinging idle connections only (service.core.db): documented, tested."""
    engine = make_engine(pg_url, pool_size=2, ping_idle_s=60)
    try:
        pings = _count_pings(engine, monkeypatch)
        with engine.connect() as a, engine.connect() as b:  # two pooled connections
            pids = {int(c.execute(text("SELECT pg_backend_pid()")).scalar_one()) for c in (a, b)}
        for pid in pids:
            _terminate(pg_url, pid)
        with pytest.raises(OperationalError):
            _backend_pid(engine)
        assert _backend_pid(engine) not in pids  # the error invalidated the whole pool
        assert pings == []
    finally:
        engine.dispose()


def test_read_sessions_send_no_transaction_and_sessions_do(pg_app: FastAPI) -> None:
    """A read session's statement runs in autocommit (no BEGIN before it, nothing to roll
    back); the ordinary sessions keep their transaction."""
    for factory, status in (
        (pg_app.state.read_session_factory, TransactionStatus.IDLE),
        (pg_app.state.session_factory, TransactionStatus.INTRANS),
    ):
        with factory() as session:
            assert session.execute(select(func.count()).select_from(Job)).scalar_one() >= 0
            dbapi = session.connection().connection.dbapi_connection
            assert dbapi is not None and dbapi.info.transaction_status == status


def test_row_versions_on_postgresql(pg_app: FastAPI, pg_url: str) -> None:
    """A poll answered from the row-version cache sends no SQL; once the entry expired the
    version is read by primary key and a worker's write shows; the API's own write (a cancel)
    shows at once."""
    clock = [1000.0]
    versions = RowVersionCache(ttl_s=1.0, clock=lambda: clock[0])
    versions.watch(pg_app.state.session_factory)
    pg_app.state.row_versions = versions
    folder = write_image_folder(pg_app.state.settings.dataset_roots[0] / "polled")
    sent: list[str] = []
    with TestClient(pg_app) as client:
        alice = _key(pg_app, "alice")
        dataset = _dataset(client, alice, folder, "polled")
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"]}, headers=alice).json()
        url = f"/v1/jobs/{job['id']}"
        etag = client.get(url, headers=alice).headers["ETag"]  # kept, as is alice's key

        def poll(etag: str) -> Any:
            return client.get(url, headers={**alice, "If-None-Match": etag})

        event.listen(pg_app.state.engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
        assert poll(etag).status_code == 304 and sent == []
        worker = create_engine(pg_url)  # another process writes progress
        with worker.begin() as connection:
            connection.execute(update(Job).where(Job.id == uuid.UUID(job["id"])).values(step=7))
        worker.dispose()
        assert poll(etag).status_code == 304 and sent == []  # within the TTL
        clock[0] += 1.0
        seen = poll(etag)
        assert seen.status_code == 200 and seen.json()["step"] == 7
        assert any("jobs.version" in statement for statement in sent)
        assert client.post(f"{url}/cancel", headers=alice).json()["state"] == "CANCELLED"
        assert poll(seen.headers["ETag"]).json()["state"] == "CANCELLED"


def test_list_filters_and_cursor_on_postgresql(pg_app: FastAPI) -> None:
    """The list's statements, built once per shape and sent with bound values (a list of
    states, a dataset id, the cursor's time and id), page on PostgreSQL as on SQLite."""
    folder = write_image_folder(pg_app.state.settings.dataset_roots[0] / "listed")
    with TestClient(pg_app) as client:
        alice = _key(pg_app, "lister")
        dataset = _dataset(client, alice, folder, "listed")
        ids = [
            client.post("/v1/jobs", json={"dataset_id": dataset["id"]}, headers=alice).json()["id"]
            for _ in range(3)
        ]
        assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice).status_code == 200
        params: dict[str, Any] = {"limit": 1, "dataset_id": dataset["id"]}
        walked: list[str] = []
        after: str | None = None
        for _ in range(4):
            cursor = {"after": after} if after else {}
            page = client.get("/v1/jobs", params={**params, **cursor}, headers=alice).json()
            walked += [j["id"] for j in page["items"]]
            if (after := page["next_after"]) is None:
                break
        assert walked == ids[::-1]
        queued = client.get(
            "/v1/jobs", params={"state": ["QUEUED", "RUNNING"]}, headers=alice
        ).json()
        assert [j["id"] for j in queued["items"]] == ids[:0:-1] and queued["total"] == 2
