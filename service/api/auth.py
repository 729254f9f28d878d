"""Who is asking: every ``/v1`` route takes an API key (:mod:`service.core.api_keys`) as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` and acts for the key's owner; the admin
routes take ``REID_ADMIN_TOKEN``.
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

__all__ = ["AdminDep", "CurrentOwner", "current_owner"]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <API key>`")


def _unauthorized(message: str) -> APIError:
    return APIError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


async def current_owner(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> str:
    """The owner of the presented API key; 401 when it is missing, unknown or revoked."""
    token = bearer.credentials if bearer is not None else header_key
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
