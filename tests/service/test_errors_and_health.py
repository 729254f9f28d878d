"""Errors are JSON everywhere, never a stack trace; the probes."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import Headers, make_settings


def test_unknown_route_and_method(client: TestClient) -> None:
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "code": "not_found",
        "message": "no route: GET /v2/nothing (see /docs for the API)",
    }
    wrong = client.delete("/healthz")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET"
    assert wrong.json()["error"] == {
        "code": "method_not_allowed",
        "message": "method not allowed: DELETE /healthz; this path takes GET "
        "(see /docs for the API)",
    }


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/datasets/00000000-0000-0000-0000-000000000000", "GET, DELETE"),
        ("PATCH", "/v1/galleries/00000000-0000-0000-0000-000000000000", "GET, DELETE"),
        ("DELETE", "/v1/jobs", "GET, POST"),
        ("OPTIONS", "/v1/datasets", "GET, POST"),
        ("GET", "/v1/jobs/preview", "POST"),
    ],
)
def test_405_allows_every_method_of_the_path(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    """One path, two routes (GET and DELETE): Starlette's 405 listed the first route's method."""
    response = client.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allowed
    assert response.json()["error"] == {
        "code": "method_not_allowed",
        "message": f"method not allowed: {method} {path}; this path takes {allowed} "
        "(see /docs for the API)",
    }


def test_validation_errors_name_field_and_value(client: TestClient, alice: Headers) -> None:
    response = client.post("/v1/jobs", json={"dataset_id": 42, "gpus": "two"}, headers=alice)
    assert response.status_code == 422
    error = response.json()["error"]
    fields = {d["field"]: d.get("value") for d in error["details"]}
    assert fields == {"body.dataset_id": 42, "body.gpus": "two"}
    assert "body.gpus" in error["message"]
    assert "'two'" in error["message"]
    bad_path = client.get(f"/v1/galleries/{uuid.uuid4()}/images/first", headers=alice)
    assert bad_path.status_code == 422
    assert bad_path.json()["error"]["details"][0] == {
        "field": "path.position",
        "message": "Input should be a valid integer, unable to parse string as an integer",
        "value": "first",
    }


def test_offsets_past_the_largest_bigint_are_422_on_sqlite(
    client: TestClient, alice: Headers
) -> None:
    """SQLite raised OverflowError (a 500) for OFFSET 2**63; the spec's maximum refuses it first."""
    assert client.get("/v1/jobs", params={"offset": 2**63 - 1}, headers=alice).json()["items"] == []
    past = client.get("/v1/jobs", params={"offset": 2**63}, headers=alice)
    assert past.status_code == 422, past.text
    assert past.json()["error"]["details"][0]["field"] == "query.offset"


def test_only_a_uuid_is_an_id_in_a_path(client: TestClient, alice: Headers) -> None:
    """/v1/jobs/preview is not a job: GET on it is a 405 (POST only), not a 422 for a job id."""
    not_an_id = client.get("/v1/jobs/not-a-uuid", headers=alice)
    assert not_an_id.status_code == 404
    assert not_an_id.json()["error"]["message"] == (
        "no route: GET /v1/jobs/not-a-uuid (see /docs for the API)"
    )
    preview = client.get("/v1/jobs/preview", headers=alice)
    assert (preview.status_code, preview.headers["allow"]) == (405, "POST")


def test_unexpected_errors_are_logged_not_shown(
    app: FastAPI, alice: Headers, caplog: pytest.LogCaptureFixture
) -> None:
    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /srv/db password=hunter2")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/boom", headers=alice)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "hunter2" not in response.text
    assert "Traceback" not in response.text
    assert any("hunter2" in str(r.exc_info) for r in caplog.records if r.levelno == logging.ERROR)


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "mlflow": "ok"},
    }


def test_readyz_reports_an_unreachable_mlflow_but_stays_ready(tmp_path: Path) -> None:
    from service.core.settings import TrackingSettings

    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'boot.db'}",
        migrate_on_startup=True,
        mlflow=TrackingSettings(tracking_uri="http://127.0.0.1:9", request_timeout_s=1),
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 200
    mlflow = response.json()["checks"]["mlflow"]
    assert mlflow.startswith("error: ") and "http://127.0.0.1:9" in mlflow


def test_readyz_reports_an_unreachable_broker_but_stays_ready(tmp_path: Path) -> None:
    from service.core.settings import WorkerSettings

    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'boot.db'}",
        migrate_on_startup=True,
        worker=WorkerSettings(broker_url="redis://127.0.0.1:9/0"),
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["broker"].startswith("error: ")


def test_readyz_reports_an_unmigrated_database(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert client.get("/healthz").status_code == 200
    assert response.status_code == 503
    assert "python -m service migrate" in response.json()["checks"]["database"]


def test_migrate_on_startup(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'boot.db'}", migrate_on_startup=True)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200


def test_readyz_when_the_database_is_gone(tmp_path: Path) -> None:
    unreachable = make_settings(
        tmp_path, "postgresql+psycopg://reid@127.0.0.1:9/none?connect_timeout=1"
    )
    with TestClient(create_app(unreachable)) as client:
        response = client.get("/readyz")
        assert client.get("/healthz").status_code == 200
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("error: ")
