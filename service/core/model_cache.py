"""The embedders and gallery indexes an API process keeps in memory (:class:`LoadingLRU`).

A registered model version never changes, nor does a READY index, so an entry is only dropped to
make room, or when its gallery is deleted. torch, faiss and reid_core's models are imported on
first use, never when the API starts.
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from reid_core.inference.embedder import Embedder
    from reid_core.inference.search import GalleryIndex
    from service.core.registry import ModelRegistry

#: Embedders and gallery indexes each API process keeps in memory.
EMBEDDER_CACHE_SIZE = 4
INDEX_CACHE_SIZE = 8

K = TypeVar("K")
V = TypeVar("V")


class LoadingLRU(Generic[K, V]):
    """A small least-recently-used cache that loads missing values, thread-safe.

    Two threads asking for the same missing key load it once (the second waits for the first);
    threads asking for different keys load in parallel. A load that raises caches nothing.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, threading.Lock] = {}
        self._lock = threading.Lock()

    def _get(self, key: K) -> tuple[bool, V | None]:
        if key in self._items:
            self._items.move_to_end(key)
            return True, self._items[key]
        return False, None

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        """The value of ``key``, calling ``load()`` (outside the cache's lock) when missing."""
        with self._lock:
            found, value = self._get(key)
            if found:
                return value  # type: ignore[return-value]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                found, value = self._get(key)
                if found:  # loaded by another thread while this one waited
                    return value  # type: ignore[return-value]
            try:
                loaded = load()
                with self._lock:
                    self._items[key] = loaded
                    while len(self._items) > self.capacity:
                        self._items.popitem(last=False)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            return loaded

    def discard(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


_EMBEDDERS: LoadingLRU[tuple[str, str, str], Embedder] = LoadingLRU(EMBEDDER_CACHE_SIZE)
_INDEXES: LoadingLRU[str, GalleryIndex] = LoadingLRU(INDEX_CACHE_SIZE)


def load_embedder(registry: ModelRegistry, owner: str, name: str, version: str) -> Embedder:
    """The embedder of model ``name`` version ``version`` (a number the caller resolved and
    checked ``owner`` may use), from ``model_final.pt`` (tensors and config, no pickle); on a
    GPU when torch sees one. The downloaded file is removed once read."""
    import torch

    from reid_core.inference.embedder import Embedder

    path, folder = registry.download_weights(owner, name, version)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Embedder.from_file(path).to(device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cached_embedder(registry: ModelRegistry, owner: str, name: str, version: str) -> Embedder:
    """:func:`load_embedder`, kept: keyed by the MLflow tracking URI, the name and the number (a
    registered version never changes)."""
    key = (registry.settings.mlflow_tracking_uri, name, version)
    return _EMBEDDERS.get_or_load(key, lambda: load_embedder(registry, owner, name, version))


def cached_index(folder: Path) -> GalleryIndex:
    """The gallery index saved in ``folder`` (read on first use, then kept)."""

    def load() -> GalleryIndex:
        from reid_core.inference.search import GalleryIndex

        return GalleryIndex.load(folder)

    return _INDEXES.get_or_load(str(folder), load)


def forget_index(folder: Path) -> None:
    """Drop a deleted gallery's index from this process's cache."""
    _INDEXES.discard(str(folder))
