"""Errors as JSON, everywhere: ``{"error": {"code": ..., "message": ..., "details": [...]}}``.

Routers raise :class:`APIError`; validation errors name the field and the value; anything
unexpected is logged with its traceback and answered with a plain 500, never the traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_body", "install_error_handlers", "not_found", "validation_details"]

_LOG = logging.getLogger("service.errors")
_MAX_VALUE_CHARS = 200


class APIError(Exception):
    """An error answered as JSON with ``status_code``; ``code`` is stable, ``message`` is for
    people and says what was wrong and what to do."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        details: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = list(details) if details else None
        self.headers = headers


def not_found(kind: str, ident: object) -> APIError:
    """404 for a resource that does not exist *or belongs to another owner* (no difference)."""
    return APIError(404, f"{kind}_not_found", f"{kind} {ident} not found")


def error_body(
    code: str, message: str, details: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = list(details)
    return {"error": error}


def _short(value: Any) -> Any:
    """A JSON-safe, bounded rendering of an offending input value."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + "..."


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI error dicts -> ``[{"field": "body.gpus", "message": ..., "value": ...}]``."""
    details = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "request"
        item: dict[str, Any] = {"field": loc, "message": err.get("msg", "invalid")}
        if "input" in err and err.get("type") != "missing":
            item["value"] = _short(err["input"])
        details.append(item)
    return details


def _describe(details: list[dict[str, Any]]) -> str:
    parts = []
    for d in details:
        value = f" (got {d['value']!r})" if "value" in d else ""
        parts.append(f"{d['field']}: {d['message']}{value}")
    return "; ".join(parts)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(
        error_body(exc.code, exc.message, exc.details),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = validation_details(exc.errors())
    return JSONResponse(
        error_body("validation_error", _describe(details) or "invalid request", details),
        status_code=422,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if isinstance(exc.detail, str) else phrase
    if message == phrase and exc.status_code in (404, 405):
        what = "no route" if exc.status_code == 404 else "method not allowed"
        message = f"{what}: {request.method} {request.url.path} (see /docs for the API)"
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    _LOG.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body(
            "internal_error",
            "internal server error; it was logged, retry later or report it to the operators",
        ),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
