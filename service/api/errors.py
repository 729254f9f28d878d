"""Errors as JSON, everywhere: ``{"error": {"code": ..., "message": ..., "details": [...]}}``.

The core's refusals (:mod:`service.core.errors`) get their HTTP status here, the only place that
knows it (:data:`STATUS_OF`); the API's own (authentication, a body it cannot parse) raise
:class:`APIError` with one. Validation errors name the field and the value; a database that
cannot be reached is a 503 (``database_unavailable``) the client may retry, a value it refuses (out
of range, a NUL character) a 422; anything unexpected is logged with its traceback and answered
with a plain 500, never the traceback. A 405 lists every method of its path in ``Allow``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from service.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    RejectedInputError,
    ServiceError,
    TooLargeError,
    UnavailableError,
)

_LOG = logging.getLogger("service.api.errors")
_MAX_VALUE_CHARS = 200
#: What FastAPI answers (400) for a body it cannot decode before validation, e.g. non-UTF-8 JSON.
_BODY_PARSE_ERROR = "There was an error parsing the body"
#: Seconds a client should wait before retrying while the database is away.
DATABASE_RETRY_AFTER_S = 5
#: The methods a 405's ``Allow`` header may list, in the order it lists them.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


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


#: The HTTP status of each kind of refusal of the core.
STATUS_OF: dict[type[ServiceError], int] = {
    RejectedInputError: 400,
    NotFoundError: 404,  # or another owner's: no difference
    ConflictError: 409,
    TooLargeError: 413,
    InvalidInputError: 422,
    UnavailableError: 503,
}


def _error(
    status: int,
    code: str,
    message: str,
    details: Sequence[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The answer to every error: ``{"error": {"code", "message", "details"?}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = list(details)
    return JSONResponse({"error": error}, status_code=status, headers=headers)


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
    return _error(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status = next((STATUS_OF[kind] for kind in type(exc).__mro__ if kind in STATUS_OF), 500)
    # the core names the input's fields; the input was the request's body
    details = [{**d, "field": f"body.{d['field']}"} for d in exc.details or []]
    return _error(status, exc.code, exc.message, details)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = validation_details(exc.errors())
    return _error(422, "validation_error", _describe(details) or "invalid request", details)


def _unparsable_body(exc: StarletteHTTPException) -> JSONResponse:
    """422 like any other invalid body (FastAPI answers a bare 400 for a body it cannot parse at
    all: bytes that are not UTF-8, JSON nested deeper than the parser goes)."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        why = f"it is not UTF-8 ({cause.reason} at byte {cause.start})"
    elif isinstance(cause, RecursionError):
        why = "it is nested too deeply"
    else:
        why = "it is not valid JSON"
    message = f"the request body cannot be parsed: {why}"
    return _error(
        422,
        "validation_error",
        f"body: {message}; send JSON encoded as UTF-8",
        [{"field": "body", "message": message}],
    )


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route answers on the request's path.

    Starlette's 405 lists the methods of the first route whose path matched, but one path is
    often several routes (``GET`` and ``DELETE /v1/datasets/{id}``); RFC 9110 wants them all. Each
    method is tried on a fresh scope of the same path, so the request's own is not touched."""
    allowed = []
    for method in _METHODS:
        probe: Scope = {
            "type": "http",
            "method": method,
            "path": request.scope["path"],
            "root_path": request.scope.get("root_path", ""),
            "headers": [],
            "query_string": b"",
        }
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
        return _unparsable_body(exc)
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if isinstance(exc.detail, str) else phrase
    headers = dict(exc.headers or {})
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
        if message == phrase:
            takes = f"; this path takes {', '.join(allowed)}" if allowed else ""
            message = f"method not allowed: {where}{takes} (see /docs for the API)"
    elif exc.status_code == 404 and message == phrase:
        message = f"no route: {where} (see /docs for the API)"
    return _error(exc.status_code, code, message, headers=headers)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The connection failed, broke mid-request or none was free in time (or the database gave
    # up on a transaction: a deadlock, a serialization failure). The request's transaction is
    # rolled back; the pool pings connections before use, so once the database is back the next
    # request gets a fresh one.
    _LOG.warning(
        "database unavailable on %s %s: %s: %s",
        request.method,
        request.url.path,
        type(exc).__name__,
        getattr(exc, "orig", None) or exc,
    )
    return _error(
        503,
        "database_unavailable",
        "the database is unavailable right now; retry in a few seconds "
        "(GET /readyz says when it is back)",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def _value_refused_by_database(_request: Request, exc: Exception) -> JSONResponse:
    # A value that passed validation but not the database (a number past BIGINT, a NUL
    # character in text): the request's fault, not the server's.
    problem = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return _error(
        422,
        "validation_error",
        f"a value in the request cannot be stored or compared by the database ({problem}); "
        "send smaller numbers and text without NUL characters",
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    _LOG.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(
        500,
        "internal_error",
        "internal server error; it was logged, retry later or report it to the operators",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for database_error in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(database_error, _database_unavailable)
    app.add_exception_handler(DataError, _value_refused_by_database)
    app.add_exception_handler(Exception, _unexpected)
