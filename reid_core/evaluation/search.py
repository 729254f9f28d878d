"""Exact k-nearest-neighbour search with faiss (flat indexes), CPU or GPU.

* ``metric="cosine"``: ``IndexFlatIP`` over L2-normalised features; scores are cosine
  similarities (larger = closer). :func:`knn_search` L2-normalises the queries of any
  inner-product index.
* ``metric="euclidean"``: ``IndexFlatL2``; scores are squared L2 distances (smaller = closer).

faiss is imported lazily, inside the functions, so that ``reid_core`` imports without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid_core.atomic_write import atomic_path
from reid_core.evaluation.distance import Metric, check_metric

logger = logging.getLogger(__name__)


def _faiss() -> Any:
    try:
        import faiss  # optional dependency: imported on use
    except ImportError as exc:
        raise ImportError(
            "faiss is required for k-NN search but is not installed: install the `cpu` extra "
            "(pip install 'reid-service[cpu]', faiss-cpu) or the `gpu` extra "
            "(pip install 'reid-service[gpu]', faiss-gpu), never both"
        ) from exc
    return faiss


def _num_gpus(faiss: Any) -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _as_float32_rows(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (num, dim) array, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def is_gpu_index(index: Any) -> bool:
    """Whether ``index`` lives on a GPU (a faiss ``GpuIndex``)."""
    faiss = _faiss()
    gpu_cls = getattr(faiss, "GpuIndex", None)
    return gpu_cls is not None and isinstance(index, gpu_cls)


def _to_gpu(faiss: Any, index: Any) -> Any:
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
    # the resources must outlive the index
    gpu_index.referenced_objects = [resources]
    return gpu_index


def build_index(
    features: np.ndarray | torch.Tensor,
    metric: Metric = "cosine",
    use_gpu: bool | None = None,
) -> Any:
    """A flat (exact) faiss index holding ``features`` (n, d), row i with id i.

    Args:
        features: (n, d) features, numpy or torch (copied to float32 on the host).
        metric: ``"cosine"`` (inner product of L2-normalised rows) or ``"euclidean"`` (L2).
        use_gpu: None or True: on GPU 0 when ``faiss.get_num_gpus() > 0``, else on the CPU
            (True without a GPU logs a warning); False: always on the CPU.

    Raises:
        ImportError: faiss is not installed (install the ``cpu`` or ``gpu`` extra).
    """
    faiss = _faiss()
    metric = check_metric(metric)
    x = _as_float32_rows(features, "features")
    if metric == "cosine":
        x = np.ascontiguousarray(_l2_normalise(x), dtype=np.float32)
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    if use_gpu is not False:
        if _num_gpus(faiss) > 0:
            index = _to_gpu(faiss, index)
        elif use_gpu:
            logger.warning("use_gpu=True but faiss sees no GPU; the index stays on the CPU")
    return index


def knn_search(
    index: Any, queries: np.ndarray | torch.Tensor, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest indexed rows of every query.

    Returns:
        ``(scores, ids)``, both (num_queries, k), best first: float32 cosine similarities
        (inner-product index, queries L2-normalised here) or squared L2 distances, and int64
        row ids of the indexed features.
    """
    faiss = _faiss()
    x = _as_float32_rows(queries, "queries")
    if x.shape[1] != index.d:
        raise ValueError(f"queries have dimension {x.shape[1]}, the index holds {index.d}")
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k must be in 1..{index.ntotal} (the indexed rows), got {k}")
    if index.metric_type == faiss.METRIC_INNER_PRODUCT:
        x = np.ascontiguousarray(_l2_normalise(x), dtype=np.float32)
    scores, ids = index.search(x, k)
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def save_index(index: Any, path: str | Path) -> Path:
    """Write ``index`` to ``path`` (a GPU index is copied to the CPU first); returns the path."""
    faiss = _faiss()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_index = faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index
    with atomic_path(path) as tmp:  # a gallery being rebuilt keeps its old index until then
        faiss.write_index(cpu_index, str(tmp))
    return path


def load_index(path: str | Path, use_gpu: bool | None = False) -> Any:
    """Read an index written by :func:`save_index`; ``use_gpu`` as in :func:`build_index`
    (default: stay on the CPU)."""
    faiss = _faiss()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no faiss index file at {path}")
    index = faiss.read_index(str(path))
    if use_gpu is not False:
        if _num_gpus(faiss) > 0:
            index = _to_gpu(faiss, index)
        elif use_gpu:
            logger.warning("use_gpu=True but faiss sees no GPU; the index stays on the CPU")
    return index
