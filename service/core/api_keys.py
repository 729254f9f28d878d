"""API keys: created by ``python -m service create-key`` (or the admin routes), stored hashed.

A key is ``reid_`` + 43 random URL-safe characters. The database keeps its SHA-256 and a short
prefix (to name it when revoking), never the key. The API (:mod:`service.api.auth`) takes it from
the request and acts for the key's owner.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import ApiKey, utcnow

__all__ = ["KEY_PREFIX", "create_api_key", "find_api_key", "hash_key", "revoke_api_key"]

KEY_PREFIX = "reid_"
_PREFIX_LENGTH = len(KEY_PREFIX) + 8


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


def find_api_key(session: Session, token: str) -> ApiKey | None:
    """The key ``token`` is (revoked or not); None for a token that is no key."""
    return session.execute(
        select(ApiKey).where(ApiKey.key_hash == hash_key(token))
    ).scalar_one_or_none()
