"""The k nearest neighbours of every training image, for the Jaccard distance of the clustering.

The Jaccard step needs two things of every row i: its nearest rows, self first, and the largest
cosine distance ``max_l d(i, l)`` that scales its Gaussian kernel
(:mod:`reid_core.evaluation.rerank`). ``backend``:

* ``"exact"``: one pass of the re-ranking code over row blocks of the cosine distances finds
  both at once (a top-k and a maximum of each block);
* ``"faiss"``: an exact flat index, on the GPU when faiss sees one: one search for the
  neighbours, one search of the negated rows for the farthest (``max_l d(i, l) = 1 +
  max_l <-x_i, x_l>``);
* ``"auto"``: faiss when it sees a GPU, else exact. On a CPU one exact pass costs about what
  faiss's search alone does, and faiss would need the second search for the farthest rows
  (measured in bench/results/cluster_scale.md).

A faiss GPU index that fails (out of memory, a driver or build without support for the device)
is never fatal: the search is redone on the CPU index and a warning says why. All backends
return the same neighbours up to ties.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from reid_core.evaluation.search import _num_gpus, build_index, knn_search

__all__ = ["KnnBackend", "Neighbours", "nearest_neighbours"]

log = logging.getLogger(__name__)

KnnBackend = Literal["auto", "faiss", "exact"]


@dataclass(frozen=True)
class Neighbours:
    """``ids`` (N, k): each row's nearest rows by cosine, itself first; ``row_max`` (N,): each
    row's largest cosine distance to any row."""

    ids: np.ndarray
    row_max: np.ndarray


def _faiss_or_none() -> Any:
    try:
        import faiss  # optional dependency
    except ImportError:
        return None
    return faiss


def faiss_sees_gpu() -> bool:
    faiss = _faiss_or_none()
    return faiss is not None and _num_gpus(faiss) > 0


def _self_first(ids: np.ndarray) -> np.ndarray:
    """Each row i with i itself in front (exact ties or duplicate images may rank it later)."""
    n, k = ids.shape
    own = np.arange(n)[:, None]
    others = ids[ids != own].reshape(n, -1) if (ids == own).sum(1).min() == 1 else None
    if others is None:  # some row lacks itself: keep its k - 1 best others
        rows = [row[row != i][: k - 1] for i, row in enumerate(ids)]
        others = np.stack(rows)
    return np.concatenate([own, others[:, : k - 1]], axis=1)


def _faiss_search(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the k nearest rows, cosine similarity to the farthest row)."""
    try:
        index = build_index(features, "cosine")
        _, ids = knn_search(index, features, k)
        far, _ = knn_search(index, -features, 1)
    except (RuntimeError, MemoryError) as exc:  # faiss raises RuntimeError for GPU failures
        log.warning("faiss k-NN on the GPU failed (%s); searching on the CPU instead", exc)
        index = build_index(features, "cosine", use_gpu=False)
        _, ids = knn_search(index, features, k)
        far, _ = knn_search(index, -features, 1)
    return ids, -far[:, 0]


def nearest_neighbours(
    features: torch.Tensor, k: int, backend: KnnBackend = "auto"
) -> Neighbours | None:
    """The ``k`` nearest rows of each row by cosine, self first, and each row's largest cosine
    distance; None for ``exact`` (the re-ranking code then finds both in its own pass)."""
    if backend == "auto":
        backend = "faiss" if faiss_sees_gpu() else "exact"
    if backend == "exact":
        return None
    x = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()
    ids, farthest_cosine = _faiss_search(x, min(k, len(x)))
    row_max = (1.0 - farthest_cosine).astype(np.float32)
    return Neighbours(_self_first(ids), row_max)
