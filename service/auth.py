"""API keys: created by ``python -m service create-key`` (or the admin routes), stored hashed.

A key is ``reid_`` + 43 random URL-safe characters. The database keeps its SHA-256 and a short
prefix (to name it when revoking), never the key. Every ``/v1`` route takes it as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` and acts for the key's owner.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.deps import SessionDep, SettingsDep
from service.errors import APIError
from service.models import ApiKey, utcnow

__all__ = [
    "KEY_PREFIX",
    "AdminDep",
    "CurrentOwner",
    "create_api_key",
    "current_owner",
    "hash_key",
    "revoke_api_key",
]

KEY_PREFIX = "reid_"
_PREFIX_LENGTH = len(KEY_PREFIX) + 8

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <API key>`")


def hash_key(token: str) -> str:
    # A plain SHA-256 is enough: the token has 256 random bits, nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_api_key(session: Session, owner: str, name: str | None = None) -> tuple[ApiKey, str]:
    """Add a key for ``owner``; returns the row and the token (shown once, never stored)."""
    owner = owner.strip()
    if not owner or len(owner) > 128:
        raise ValueError(f"owner must be 1 to 128 characters, got {owner!r}")
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(owner=owner, prefix=token[:_PREFIX_LENGTH], key_hash=hash_key(token), name=name)
    session.add(key)
    session.flush()
    return key, token


def revoke_api_key(session: Session, prefix: str) -> ApiKey | None:
    """Revoke the key with this prefix (idempotent); ``None`` when there is none."""
    key = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def _unauthorized(message: str) -> APIError:
    return APIError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def current_owner(
    session: SessionDep,
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
    key = session.execute(
        select(ApiKey).where(ApiKey.key_hash == hash_key(token))
    ).scalar_one_or_none()
    if key is None:
        raise _unauthorized("invalid API key")
    if key.revoked_at is not None:
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
