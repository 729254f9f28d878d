"""The JSON of jobs and galleries as the API last served them, by row version, so that a poll
of a row that did not change is answered without reading the row or encoding it again.

A job's or gallery's answer is a function of its row alone (every column it shows is the
row's; ``mlflow_run_url`` adds the process's MLflow UI address, fixed for the app) and the row
changes only with its version (:class:`service.core.models.Job`: +1 in every UPDATE). So the
bytes encoded for (schema, id, version) are the answer for that version for as long as the
process runs: an entry never goes stale, it is only made useless by a newer version. What
version a request is answered at comes from :class:`service.core.row_versions.RowVersionCache`
(kept ``REID_VERSION_CACHE_SECONDS``, dropped when this process changes the row), so a body
from this cache is exactly as fresh as a 304 is: the rule of the version cache is the rule of
the body too.

- An entry is (schema, id) -> (owner, version, JSON): the newest version encoded, so a job
  that changed takes no more room than one that did not.
- It is served only for its owner and its exact version; a version the cache does not hold is
  read and encoded again (and replaces it).
- At most :data:`MAX_BODIES` entries, the least recently used dropped first.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from service.core.models import Gallery, Job

R = TypeVar("R", Job, Gallery)

#: Most bodies an API process keeps: a job's is ~4 KB with its configuration, ~1 KB as a list's
#: summary, so at most a few tens of MB; more rows than dashboards poll.
MAX_BODIES = 8_192

_Key = tuple[type[BaseModel], uuid.UUID]


@dataclass(frozen=True)
class _Body:
    owner: str
    version: int
    json: bytes


class BodyCache:
    """(schema, id) -> the JSON of the row at its newest version served; thread-safe (sync
    routes run in the thread pool)."""

    def __init__(self, max_entries: int = MAX_BODIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[_Key, _Body] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, schema: type[BaseModel], ident: uuid.UUID, owner: str, version: int
    ) -> bytes | None:
        """The JSON of row ``ident`` at ``version`` as ``schema``, if kept for ``owner``."""
        key = (schema, ident)
        with self._lock:
            body = self._entries.get(key)
            if body is None or body.version != version or body.owner != owner:
                return None
            self._entries.move_to_end(key)
            return body.json

    def put(
        self, schema: type[BaseModel], ident: uuid.UUID, owner: str, version: int, json: bytes
    ) -> None:
        """Keep ``json``, the row at ``version``, unless a newer version is kept already (a
        read that raced a change must not put the older answer back)."""
        key = (schema, ident)
        with self._lock:
            kept = self._entries.get(key)
            if kept is not None and kept.version > version:
                return
            self._entries[key] = _Body(owner, version, json)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def encoded(
        self, schema: type[BaseModel], ident: uuid.UUID, owner: str, version: int, body: BaseModel
    ) -> bytes:
        """``body`` (row ``ident`` at ``version``, shaped as ``schema``) as JSON, kept."""
        json = body.model_dump_json().encode("utf-8")
        self.put(schema, ident, owner, version, json)
        return json

    def items(
        self,
        schema: type[BaseModel],
        owner: str,
        listed: list[tuple[uuid.UUID, int]],
        read: Callable[[list[uuid.UUID]], Iterable[R]],
        shape: Callable[[R], BaseModel],
    ) -> list[tuple[uuid.UUID, int, bytes]]:
        """A list page's items: each listed (id, version) as its kept JSON, or else read (all
        of those at once: ``read(ids)``), shaped as ``schema`` and kept. Returns (id, version,
        JSON) in the listed order; a row read at a newer version than listed (it changed since
        the page was read) shows that one, a row no longer there is left out."""
        found = {
            ident: (version, self.get(schema, ident, owner, version)) for ident, version in listed
        }
        for row in read([ident for ident, (_, json) in found.items() if json is None]):
            found[row.id] = (
                row.version,
                self.encoded(schema, row.id, owner, row.version, shape(row)),
            )
        return [
            (ident, version, json) for ident, (version, json) in found.items() if json is not None
        ]
