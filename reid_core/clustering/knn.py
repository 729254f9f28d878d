"""The k nearest neighbours of every training image, for the Jaccard distance of the clustering.

``backend``: ``"faiss"`` (an exact flat index, on the GPU when faiss sees one), ``"exact"``
(torch top-k over row chunks of the cosine distances, the re-ranking code's own search), or
``"auto"``: faiss when it is installed, else exact. A faiss GPU index that fails (out of
memory, a driver or build without support for the device) is never fatal: the search is redone
on the CPU index and a warning says why. Both return the same neighbours up to ties.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

from reid_core.evaluation.search import build_index, knn_search

__all__ = ["KnnBackend", "nearest_neighbours"]

log = logging.getLogger(__name__)

KnnBackend = Literal["auto", "faiss", "exact"]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401  (optional dependency)
    except ImportError:
        return False
    return True


def _self_first(ids: np.ndarray) -> np.ndarray:
    """Each row i with i itself in front (exact ties or duplicate images may rank it later)."""
    n, k = ids.shape
    own = np.arange(n)[:, None]
    others = ids[ids != own].reshape(n, -1) if (ids == own).sum(1).min() == 1 else None
    if others is None:  # some row lacks itself: keep its k - 1 best others
        rows = [row[row != i][: k - 1] for i, row in enumerate(ids)]
        others = np.stack(rows)
    return np.concatenate([own, others[:, : k - 1]], axis=1)


def _faiss_search(features: np.ndarray, k: int) -> np.ndarray:
    try:
        index = build_index(features, "cosine")
        _, ids = knn_search(index, features, k)
    except (RuntimeError, MemoryError) as exc:  # faiss raises RuntimeError for GPU failures
        log.warning("faiss k-NN on the GPU failed (%s); searching on the CPU instead", exc)
        index = build_index(features, "cosine", use_gpu=False)
        _, ids = knn_search(index, features, k)
    return ids


def nearest_neighbours(
    features: torch.Tensor, k: int, backend: KnnBackend = "auto"
) -> np.ndarray | None:
    """(N, k) nearest rows of each row by cosine, self first; None for ``exact`` (the
    re-ranking code then finds them itself)."""
    if backend == "auto":
        backend = "faiss" if faiss_available() else "exact"
    if backend == "exact":
        return None
    x = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()
    k = min(k, len(x))
    return _self_first(_faiss_search(x, k))
