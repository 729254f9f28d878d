"""API keys: created by ``python -m service create-key`` (or the admin routes), stored hashed.

A key is ``reid_`` + 43 random URL-safe characters. The database keeps its SHA-256 and a short
prefix (to name it when revoking), never the key. The API (:mod:`service.api.auth`) takes it from
the request and acts for the key's owner.

The API process remembers a verified key for ``REID_API_KEY_CACHE_SECONDS`` (:class:`KeyCache`),
so a poll does not read ``api_keys`` every time. A revocation made through this process (the
admin route) takes effect at once; one made elsewhere (``python -m service revoke-key``,
another API process) within that many seconds.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import ApiKey, utcnow
from service.core.ttl_cache import TtlCache

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


def list_api_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    """Every key, or ``owner``'s, oldest first."""
    query = select(ApiKey).order_by(ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.execute(query).scalars())


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


@dataclass(frozen=True)
class KnownKey:
    """What a request needs of a key: whose it is, and whether it was revoked."""

    owner: str
    prefix: str
    revoked: bool


class KeyCache:
    """Keys verified in the last ``ttl_s`` seconds, by hash, at most ``max_entries`` of them
    (the least recently verified are dropped first; the rule: :mod:`service.core.ttl_cache`).

    Only keys that exist are kept (revoked ones too, to answer why); a token that is no key is
    looked up every time, so random tokens cannot fill the cache. ``ttl_s`` 0 keeps nothing."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: TtlCache[str, KnownKey] = TtlCache(ttl_s, max_entries, clock)

    def peek(self, token: str) -> KnownKey | None:
        """The key ``token`` is if the cache still holds it (no database read), else None."""
        return self._entries.get(hash_key(token))

    def lookup(self, token: str, session_factory: Callable[[], Session]) -> KnownKey | None:
        """The key ``token`` is, from the cache or (opening a session) from the database."""
        cached = self.peek(token)
        if cached is not None:
            return cached
        read = self._entries.begin_read()
        with session_factory() as session:
            row = find_api_key(session, token)
            if row is None:
                return None
            known = KnownKey(row.owner, row.prefix, row.revoked_at is not None)
        self._entries.put(hash_key(token), known, read)
        return known

    def forget(self, prefix: str) -> None:
        """Drop the key with ``prefix`` (it was just revoked through this process)."""
        self._entries.discard_where(lambda _digest, key: key.prefix == prefix)
