"""Who is asking: every ``/v1`` route takes an API key (:mod:`service.core.api_keys`) as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` and acts for the key's owner; the admin
routes take ``REID_ADMIN_TOKEN``.

A request that sends both headers must name the same key in each, and an ``Authorization`` header
must read ``Bearer <key>``: a valid key in one header never vouches for whatever the other holds
(a proxy's credentials, a stale key, a typo), so the request is refused rather than half read.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.api.deps import SettingsDep
from service.api.errors import APIError
from service.core.api_keys import KeyCache

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <API key>`")


def _unauthorized(message: str) -> APIError:
    return APIError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def _presented_key(request: Request, bearer: str | None, header_key: str | None) -> str | None:
    """The one API key the request presents; 401 when its ``Authorization`` header is not
    ``Bearer <key>`` (HTTPBearer reads such a header as absent) or when both headers are sent
    and do not hold the same key (an empty ``X-API-Key`` is no key: APIKeyHeader reads it as
    absent, but it is not the bearer's)."""
    if bearer is None and request.headers.get("authorization") is not None:
        raise _unauthorized(
            "the Authorization header is malformed: send `Authorization: Bearer <key>`, "
            "or leave it out and send `X-API-Key: <key>`"
        )
    sent_key = request.headers.get("x-api-key")
    if bearer is not None and sent_key is not None and sent_key != bearer:
        raise _unauthorized("Authorization and X-API-Key name different keys; send one")
    return bearer if bearer is not None else header_key


async def current_owner(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> str:
    """The owner of the presented API key; 401 when it is missing, unknown or revoked, or when
    the request's two key headers disagree (:func:`_presented_key`)."""
    token = _presented_key(request, bearer.credentials if bearer is not None else None, header_key)
    if not token:
        raise _unauthorized(
            "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>` "
            "(create one with `python -m service create-key --owner <name>`)"
        )
    cache: KeyCache = request.app.state.key_cache
    # A key verified lately is answered here, in the event loop; only a miss reads the database
    # (in the thread pool, as sync routes do).
    key = cache.peek(token) or await run_in_threadpool(
        cache.lookup, token, request.app.state.session_factory
    )
    if key is None:
        raise _unauthorized("invalid API key")
    if key.revoked:
        raise _unauthorized(f"API key {key.prefix}... was revoked; ask for a new one")
    return key.owner


def require_admin(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """The admin routes: off (404) unless REID_ADMIN_TOKEN is set; then that token as Bearer."""
    if settings.admin_token is None:
        raise APIError(404, "not_found", "admin routes are off (REID_ADMIN_TOKEN is not set)")
    expected = settings.admin_token.get_secret_value().encode("utf-8")
    given = (bearer.credentials if bearer is not None else "").encode("utf-8")
    if not expected or not hmac.compare_digest(given, expected):
        raise _unauthorized("admin routes need `Authorization: Bearer <REID_ADMIN_TOKEN>`")


CurrentOwner = Annotated[str, Depends(current_owner)]
AdminDep = Depends(require_admin)
