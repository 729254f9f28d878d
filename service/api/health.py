"""Liveness and readiness probes; no API key needed."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from service.core.errors import UnavailableError
from service.core.migrate import schema_revision

router = APIRouter(tags=["health"])
_LOG = logging.getLogger("service.health")


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def broker_status(url: str, timeout_s: float = 2.0) -> str:
    """``ok``, or why the Celery broker at ``url`` cannot be reached (one short attempt)."""
    try:
        from kombu import Connection
    except ImportError:
        return "not configured (the worker extra is not installed)"
    try:
        with Connection(url, connect_timeout=timeout_s) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


def mlflow_status(request: Request) -> str:
    """``ok``, or why MLflow (runs and the model registry) does not answer."""
    from service.core.registry import ModelRegistry

    try:
        ModelRegistry(request.app.state.settings).ping()
    except ImportError:
        return "not configured (mlflow is not installed)"
    except UnavailableError as exc:
        return f"error: {exc.message}"
    return "ok"


@router.get(
    "/readyz",
    summary="The database answers and its schema is current (the broker is reported too)",
    responses={503: {"description": "Not ready; `checks` says which dependency failed."}},
)
def readyz(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    head: str | None = request.app.state.schema_head
    # Broker and MLflow outages are reported but do not make the API unready: jobs are still
    # accepted (they stay QUEUED in the database and the dispatcher sends them when the broker is
    # back) and trainers catch MLflow up when it returns.
    checks: dict[str, Any] = {
        "broker": broker_status(request.app.state.settings.broker_url),
        "mlflow": mlflow_status(request),
    }
    ready = True
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            revision = schema_revision(conn)
    except SQLAlchemyError as exc:
        _LOG.warning("readiness: database unreachable: %s", exc)
        checks["database"] = f"error: {type(exc).__name__}"
        ready = False
    else:
        if revision != head:
            checks["database"] = (
                f"schema at revision {revision or 'none'}, expected {head}: "
                "run `python -m service migrate`"
            )
            ready = False
        else:
            checks["database"] = "ok"
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )
