"""What the API process remembers of the database for a few seconds: a small thread-safe cache
of values read from it, each trusted for ``ttl_s`` seconds after its read began.

The rule every user of :class:`TtlCache` states in its own words (:class:`service.core.api_keys.
KeyCache`, :class:`service.core.row_versions.RowVersionCache`):

- a value is kept from the moment its read *began* (:meth:`TtlCache.begin_read`), so it is
  never trusted past ``ttl_s`` seconds after the database said it;
- a change made through this process drops what it changed (:meth:`TtlCache.discard`), and a
  read that was under way meanwhile is not kept: it may have seen the row before the change;
- a change made elsewhere is seen once the value expires, within ``ttl_s`` seconds;
- at most ``max_entries`` values, the least recently stored dropped first; ``ttl_s`` 0 keeps
  nothing (every lookup reads the database).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class ReadStamp:
    """When a read of the database began, and how many discards the cache had seen by then."""

    started: float
    discards: int


class TtlCache(Generic[K, V]):
    """Values by key, each trusted until ``ttl_s`` seconds after the read that stored it began,
    at most ``max_entries`` of them. Thread-safe: sync routes run in a thread pool."""

    def __init__(
        self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._discards = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value kept for ``key`` while it is trusted, else None."""
        with self._lock:
            entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[0] > self._clock() else None

    def begin_read(self) -> ReadStamp:
        """Take this before reading the database; :meth:`put` what the read found with it."""
        with self._lock:
            return ReadStamp(self._clock(), self._discards)

    def put(self, key: K, value: V, read: ReadStamp) -> None:
        """Keep ``value`` (read since ``read``) until ``ttl_s`` after that read began; nothing
        is kept when ``ttl_s`` is 0 or when a discard happened while it was read."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if self._discards != read.discards:
                return
            self._entries[key] = (read.started + self.ttl_s, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, keys: Iterable[K]) -> None:
        """Drop ``keys`` (this process changed what they stand for)."""
        with self._lock:
            self._discards += 1
            for key in keys:
                self._entries.pop(key, None)

    def discard_where(self, changed: Callable[[K, V], bool]) -> None:
        """Drop every entry for which ``changed(key, value)`` holds."""
        with self._lock:
            self._discards += 1
            for key in [k for k, (_, v) in self._entries.items() if changed(k, v)]:
                del self._entries[key]
