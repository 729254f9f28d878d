"""The API while its PostgreSQL database is away: a 503 with a JSON error that says to retry (never
a 500, never a hang), /readyz naming the database, and recovery by itself once the database is
back, without restarting the API."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import service.core.db
from service.api.errors import DATABASE_RETRY_AFTER_S
from service.app import create_app
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.settings import WorkerSettings
from tests.reliability.servers import PostgresServer
from tests.service.conftest import TestClient, make_settings, write_image_folder

pytestmark = pytest.mark.integration

#: Longer than any answer should take; a request still running then is a hang.
HANG_S = 30.0


def _answer(send: Callable[[], httpx.Response]) -> httpx.Response:
    """``send()``'s response; fails the test if it does not come within ``HANG_S``."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(send).result(timeout=HANG_S)
    except FutureTimeout:
        pytest.fail(f"the API did not answer within {HANG_S:.0f} s: it hangs")
    finally:
        pool.shutdown(wait=False)  # a hung request must not hang the test too


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == str(DATABASE_RETRY_AFTER_S)
    error = response.json()["error"]
    assert error["code"] == "database_unavailable"
    assert "database is unavailable" in error["message"]
    assert "retry" in error["message"]
    assert "Traceback" not in response.text


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]
    dataset_id: str
    job_id: str

    def submit(self) -> httpx.Response:
        return self.client.post(
            "/v1/jobs", json={"dataset_id": self.dataset_id, "gpus": 0}, headers=self.headers
        )


@pytest.fixture
def api(own_database: str, tmp_path: Path) -> Iterator[Api]:
    settings = make_settings(tmp_path, own_database, worker=WorkerSettings(enqueue_on_submit=False))
    app = create_app(settings)
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "alice")
    headers = {"Authorization": f"Bearer {token}"}
    folder = write_image_folder(settings.dataset_roots[0] / "crops")
    with TestClient(app) as client:
        dataset = client.post(
            "/v1/datasets", json={"name": "crops", "path": str(folder)}, headers=headers
        )
        assert dataset.status_code == 201, dataset.text
        api = Api(client, headers, dataset.json()["id"], "")
        job = api.submit()
        assert job.status_code == 201, job.text
        api.job_id = job.json()["id"]
        yield api


def test_database_down_is_503_then_the_api_recovers_by_itself(
    api: Api, own_postgres: PostgresServer
) -> None:
    client, headers = api.client, api.headers
    assert client.get("/readyz").status_code == 200

    own_postgres.stop()
    requests: list[Callable[[], httpx.Response]] = [
        lambda: client.get(f"/v1/jobs/{api.job_id}", headers=headers),
        lambda: client.get("/v1/jobs", headers=headers),
        lambda: client.get(f"/v1/jobs/{api.job_id}/events", headers=headers),
        lambda: client.post(f"/v1/jobs/{api.job_id}/cancel", headers=headers),
        lambda: client.get("/v1/datasets", headers=headers),
        api.submit,
    ]
    for send in requests:
        _assert_unavailable(_answer(send))
    ready = _answer(lambda: client.get("/readyz"))
    assert ready.status_code == 503
    assert ready.json()["status"] == "not ready"
    assert ready.json()["checks"]["database"].startswith("error: OperationalError")
    assert client.get("/healthz").status_code == 200  # the process itself is fine

    own_postgres.start()
    # Same app, same connection pool: the very first request after the outage succeeds.
    job = client.get(f"/v1/jobs/{api.job_id}", headers=headers)
    assert job.status_code == 200, job.text
    assert job.json()["state"] == "QUEUED"  # the cancel during the outage did nothing
    assert client.get("/readyz").json()["checks"]["database"] == "ok"
    assert api.submit().status_code == 201
    assert client.get("/v1/jobs", headers=headers).json()["total"] == 2


def test_a_database_that_never_answers_times_out_as_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.core.db, "PG_CONNECT_TIMEOUT_S", 1)
    # A port that accepts TCP connections (the kernel does) but never speaks: a hung server.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        settings = make_settings(tmp_path, f"postgresql+psycopg://reid@127.0.0.1:{port}/reid")
        with TestClient(create_app(settings)) as client:
            response: Any = _answer(lambda: client.get("/v1/jobs", headers={"X-API-Key": "k"}))
            ready = _answer(lambda: client.get("/readyz"))
    _assert_unavailable(response)
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("error: ")
