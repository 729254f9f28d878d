"""Pseudo labels for cluster contrast: features -> k-reciprocal Jaccard distance -> DBSCAN.

At every clustering, with the training images' features ``f`` (N, d) and cameras:

1. optionally each camera's mean feature removed (:func:`reid_core.evaluation.centre_per_camera`,
   ``cluster.camera_centred``): what is left of a feature is how an image differs from the rest
   of its camera, so a camera's colour cast does not make its images each other's neighbours;
2. the sparse k-reciprocal Jaccard distance d_J (:func:`reid_core.evaluation.k_reciprocal_jaccard`,
   k1, k2): O(N k) memory, never N x N;
3. DBSCAN (scikit-learn) on d_J as a precomputed sparse graph, ``eps`` and ``min_samples``: a pair
   missing from the graph (no shared reciprocal neighbour) is never within ``eps``.

``scope="per_camera"`` runs steps 2-3 on each camera's images alone: every cluster is then one
camera's (a person's frames in that camera are far more alike than the person across cameras, so
these clusters are much purer), for the intra-camera term of the camera proxies.

``eps="auto"`` chooses it from the data without labels: the ``eps_quantile`` quantile of every
image's distance to its ``min_samples - 1``-th nearest other image (the k-distance that DBSCAN's
core condition reads), so that that share of images can be core points.

Outliers (label -1) are left out (``outliers="drop"``) or each becomes its own instance
(``outliers="instances"``, labels ``K..K+O-1``). What a clustering found is in
:class:`ClusteringStats`; when it found no cluster, or one cluster holds more than
``max_cluster_fraction`` of the images, :func:`cluster_features` says so (``degenerate``) and the
caller keeps its previous labels (see :class:`reid_core.cluster_method.PseudoLabelHook`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

from reid_core.clustering.knn import KnnBackend, Neighbours, nearest_neighbours
from reid_core.evaluation import centre_per_camera
from reid_core.evaluation.rerank import k_reciprocal_jaccard

__all__ = [
    "Clustering",
    "ClusteringStats",
    "choose_eps",
    "cluster_features",
    "fuse_features",
    "jaccard_graph",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusteringStats:
    """Label-free signals of one clustering (logged as ``cluster/<name>`` metrics)."""

    clusters: int
    outlier_fraction: float
    multi_camera_fraction: float  # clusters whose images come from more than one camera
    mean_size: float
    largest_fraction: float  # images in the largest cluster / all images
    eps: float
    seconds: float
    adjusted_rand: float | None = None  # against the previous clustering's labels

    def as_metrics(self) -> dict[str, float]:
        return {f"cluster/{k}": float(v) for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Clustering:
    """Labels (N,) in ``0..K-1`` for clustered images and -1 for outliers, and the stats."""

    labels: np.ndarray
    stats: ClusteringStats
    degenerate: str | None = None  # why these labels should not be trained on, or None

    @property
    def num_clusters(self) -> int:
        return self.stats.clusters


def fuse_features(
    parts: Sequence[tuple[torch.Tensor, float]],
    cameras: np.ndarray,
    camera_centred: bool = True,
) -> torch.Tensor:
    """``[w_1 u(f_1), ..., w_m u(f_m)]`` of (N, d_p) features ``f_p`` with weights ``w_p``:
    ``u`` removes each camera's mean (with ``camera_centred``) and scales rows to unit length,
    so the cosine of two fused rows is ``sum_p w_p^2 cos_p / sum_p w_p^2``, a weighted mean of
    each part's cosine."""
    kept = [(f.float(), float(w)) for f, w in parts if w > 0]
    if not kept:
        raise ValueError("fuse_features needs at least one part with a positive weight")
    unit = [
        (centre_per_camera(f, cameras) if camera_centred else F.normalize(f, dim=1)) * w
        for f, w in kept
    ]
    return torch.cat(unit, dim=1)


def jaccard_graph(
    features: torch.Tensor, k1: int, k2: int, neighbours: Neighbours | None = None
) -> sparse.csr_matrix:
    """The sparse Jaccard distances as an (N, N) CSR graph for DBSCAN (explicit entries only;
    self pairs are stored as a tiny positive distance so sparse zero handling never drops
    them). ``neighbours``: from :func:`nearest_neighbours`, or None to search here."""
    n = features.shape[0]
    rows, cols, dist = k_reciprocal_jaccard(
        features,
        metric="cosine",
        k1=k1,
        k2=k2,
        knn=None if neighbours is None else neighbours.ids,
        row_max=None if neighbours is None else neighbours.row_max,
    )
    dist = np.maximum(dist, 1e-6)
    return sparse.csr_matrix((dist, (rows, cols)), shape=(n, n))


def choose_eps(graph: sparse.csr_matrix, min_samples: int, quantile: float) -> float:
    """The ``quantile`` of every image's distance to its ``min_samples - 1``-th nearest other
    image in ``graph`` (1.0, the largest Jaccard distance, where a row has fewer)."""
    n = graph.shape[0]
    kth = np.ones(n, dtype=np.float64)
    rank = max(1, min_samples - 1)
    for i in range(n):
        a, b = graph.indptr[i], graph.indptr[i + 1]
        others = graph.data[a:b][graph.indices[a:b] != i]
        if len(others) >= rank:
            kth[i] = np.partition(others, rank - 1)[rank - 1]
    return float(np.quantile(kth, quantile))


def _adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labellings, every outlier (-1) its own singleton."""
    from sklearn.metrics import adjusted_rand_score

    def singletons(x: np.ndarray) -> np.ndarray:
        out = x.copy()
        out[x < 0] = x.max() + 1 + np.arange(int((x < 0).sum()))
        return out

    return float(adjusted_rand_score(singletons(a), singletons(b)))


def cluster_features(
    features: torch.Tensor,
    cameras: torch.Tensor | np.ndarray,
    *,
    k1: int = 30,
    k2: int = 6,
    eps: float | Literal["auto"] = 0.6,
    eps_quantile: float = 0.5,
    min_samples: int = 4,
    camera_centred: bool = True,
    outliers: Literal["drop", "instances"] = "drop",
    scope: Literal["global", "per_camera"] = "global",
    max_cluster_fraction: float = 0.5,
    previous: np.ndarray | None = None,
    knn: KnnBackend = "auto",
) -> Clustering:
    """Pseudo labels of the N images whose ``features`` (N, d) are given; see the module
    docstring. ``previous``: the last clustering's labels, for the adjusted Rand index;
    ``knn``: how the neighbours are searched (:mod:`reid_core.clustering.knn`)."""
    from sklearn.cluster import DBSCAN

    start = time.monotonic()
    cams = np.asarray(cameras, dtype=np.int64)
    x = features.float()
    x = centre_per_camera(x, cams) if camera_centred else torch.nn.functional.normalize(x, dim=1)
    groups = (
        [np.arange(len(cams))]
        if scope == "global"
        else [np.flatnonzero(cams == c) for c in np.unique(cams)]
    )
    labels = np.full(len(cams), -1, dtype=np.int64)
    chosen = []
    for rows in groups:
        if len(rows) < 2:
            continue
        part = x[torch.from_numpy(rows)]
        width = max(min(k1, len(rows) - 1) + 1, min(k2, len(rows)))
        graph = jaccard_graph(part, k1, k2, nearest_neighbours(part, width, knn))
        group_eps = choose_eps(graph, min_samples, eps_quantile) if eps == "auto" else float(eps)
        found = DBSCAN(eps=group_eps, min_samples=min_samples, metric="precomputed").fit_predict(
            graph
        )
        found = np.asarray(found, dtype=np.int64)
        found[found >= 0] += int(labels.max()) + 1
        labels[rows] = found
        chosen.append(group_eps)
    chosen_eps = float(np.mean(chosen)) if chosen else float("nan")
    n = len(labels)
    num_clusters = int(labels.max()) + 1 if n else 0
    sizes = np.bincount(labels[labels >= 0], minlength=num_clusters)
    multi = 0
    if num_clusters:
        pair = np.unique(labels[labels >= 0] * (int(cams.max()) + 2) + (cams[labels >= 0] + 1))
        multi = int((np.bincount(pair // (int(cams.max()) + 2), minlength=num_clusters) > 1).sum())
    stats = ClusteringStats(
        clusters=num_clusters,
        outlier_fraction=float((labels < 0).mean()) if n else 0.0,
        multi_camera_fraction=multi / num_clusters if num_clusters else 0.0,
        mean_size=float(sizes.mean()) if num_clusters else 0.0,
        largest_fraction=float(sizes.max()) / n if num_clusters else 0.0,
        eps=chosen_eps,
        seconds=time.monotonic() - start,
        adjusted_rand=_adjusted_rand(labels, previous) if previous is not None else None,
    )
    degenerate = None
    if num_clusters == 0:
        degenerate = f"DBSCAN found no cluster (eps={chosen_eps:.3f}, min_samples={min_samples})"
    elif stats.largest_fraction > max_cluster_fraction:
        degenerate = (
            f"one cluster holds {stats.largest_fraction:.0%} of the images (more than "
            f"cluster.max_cluster_fraction={max_cluster_fraction}; eps={chosen_eps:.3f})"
        )
    if outliers == "instances" and (labels < 0).any():
        out = labels < 0
        labels = labels.copy()
        labels[out] = num_clusters + np.arange(int(out.sum()))
    log.info(
        "clustering: %d clusters, %.1f%% outliers, %.1f%% across cameras, eps %.3f, %.1f s",
        stats.clusters,
        100 * stats.outlier_fraction,
        100 * stats.multi_camera_fraction,
        chosen_eps,
        stats.seconds,
    )
    return Clustering(labels, stats, degenerate)
