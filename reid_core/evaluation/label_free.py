"""Label-free quality signals of a model: what its features of the training images say without
a single label, so that a user without a labelled test set sees whether training helps.

With ``x_i`` the L2-normalised feature of training image i (i = 1..N), ``c_i`` its camera and
``s_ij = x_i . x_j`` the cosine similarity:

* ``O(i) = {j : c_j != c_i}``, the images of the other cameras, and ``o_i^(r)`` the r-th most
  similar image of ``O(i)``;
* ``K_i``, the ``k`` most similar images ``j != i`` of any camera.

Three signals (:class:`LabelFreeSignals`, logged as ``label_free/<name>``):

``mutual_nn_rate``
    ``M = (1/N) sum_i [o^(1)(o_i^(1)) = i]``: the share of images whose nearest image from
    another camera has them as its own nearest image from another camera. A person's two views
    that find each other across cameras are what re-ID is about; random features pair up rarely.
``similarity_margin``
    ``D = (1/N) sum_i (s_{i, o_i^(1)} - s_{i, o_i^(k)})``: how far the nearest other-camera image
    stands out from the k-th (``k`` capped at ``min_i |O(i)|``, the images outside the largest
    camera).
``neighbour_stability``
    ``J = (1/N) sum_i |K_i^t n K_i^(t-1)| / |K_i^t u K_i^(t-1)|``: the mean Jaccard overlap of
    each image's k nearest images at this evaluation t and at the previous one (``k`` capped at
    N - 1); absent at the first. It measures change, not quality: neighbourhoods that keep
    reshuffling have not settled.

With one camera only (``O(i)`` empty; images whose camera is unknown, -1, count as one camera),
``O(i)`` falls back to every other image ``{j : j != i}``: the first two signals are then about
the nearest images of any camera, and the caller says so (:func:`cameras_fall_back`). None of
them reads an identity label; which of them rank models the way mAP does is measured in
``bench/results/label_free.md`` (``bench/label_free.py``).

The neighbours are found exactly in one pass over row blocks of the similarities (a block of B
rows holds B x N numbers, B chosen so that is at most :data:`BLOCK_ELEMENTS`), on the device the
features are given on or ``device``: memory O(N (d + k)) besides the block, never N x N.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BLOCK_ELEMENTS",
    "LabelFreeSignals",
    "NeighbourLists",
    "cameras_fall_back",
    "label_free_signals",
    "mutual_nn_rate",
    "neighbour_lists",
    "neighbour_stability",
    "similarity_margin",
]

#: Similarities held at once by :func:`neighbour_lists` (a block of rows x N; 64 MiB in float32).
BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LabelFreeSignals:
    """The signals of one model (see the module); ``neighbour_stability`` is None at the first
    evaluation."""

    mutual_nn_rate: float
    similarity_margin: float
    neighbour_stability: float | None = None

    def as_metrics(self) -> dict[str, float]:
        return {f"label_free/{k}": float(v) for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class NeighbourLists:
    """Each image's neighbours, most similar first: ``nearest`` (N, k) of any camera (itself
    left out); ``other_camera`` (N, k') from other cameras (every other image with one camera),
    with their similarities ``other_camera_similarity`` (N, k')."""

    nearest: np.ndarray
    other_camera: np.ndarray
    other_camera_similarity: np.ndarray


def cameras_fall_back(cameras: np.ndarray | torch.Tensor) -> bool:
    """Whether ``cameras`` name a single camera, so that the cross-camera signals fall back to
    the nearest images of any camera."""
    return len(np.unique(np.asarray(cameras))) < 2


def neighbour_lists(
    features: torch.Tensor,
    cameras: np.ndarray | torch.Tensor,
    k: int,
    device: torch.device | str | None = None,
) -> NeighbourLists:
    """The ``k`` nearest images of every image, of any camera and of other cameras, by cosine
    similarity of ``features`` (N, d; normalised here), in row blocks (see the module)."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"label-free signals need at least 2 images, got {n}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    x = F.normalize(features.float().to(device or features.device), dim=1)
    cams = torch.as_tensor(np.asarray(cameras), dtype=torch.long, device=x.device)
    if cams.shape != (n,):
        raise ValueError(f"{cams.numel()} camera ids given for {n} feature rows")
    across = not cameras_fall_back(cameras)
    largest_camera = int(torch.unique(cams, return_counts=True)[1].max()) if across else 1
    k_any, k_other = min(k, n - 1), min(k, n - largest_camera)
    nearest = np.empty((n, k_any), dtype=np.int64)
    other = np.empty((n, k_other), dtype=np.int64)
    other_sim = np.empty((n, k_other), dtype=np.float32)
    rows = max(1, BLOCK_ELEMENTS // n)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        sim = x[a:b] @ x.T
        rows_here = torch.arange(b - a, device=x.device)
        sim[rows_here, rows_here + a] = -torch.inf  # an image is not its own neighbour
        nearest[a:b] = sim.topk(k_any, dim=1).indices.cpu().numpy()
        if across:
            sim[cams[a:b, None] == cams[None, :]] = -torch.inf
        top = sim.topk(k_other, dim=1)
        other[a:b] = top.indices.cpu().numpy()
        other_sim[a:b] = top.values.cpu().numpy()
    return NeighbourLists(nearest, other, other_sim)


def mutual_nn_rate(best_other: np.ndarray) -> float:
    """``M``: the share of images i with ``best_other[best_other[i]] == i`` (``best_other``
    (N,): each image's nearest other-camera image)."""
    return float((best_other[best_other] == np.arange(len(best_other))).mean())


def similarity_margin(similarity: np.ndarray) -> float:
    """``D``: the mean of each row's first minus its last similarity (``similarity`` (N, k):
    each image's k most similar other-camera images, best first)."""
    return float((similarity[:, 0] - similarity[:, -1]).mean())


def neighbour_stability(current: np.ndarray, previous: np.ndarray) -> float:
    """``J``: the mean Jaccard overlap of row i of ``current`` and row i of ``previous`` (each
    (N, k), the k nearest images of image i at two evaluations, no id twice in a row)."""
    if current.shape != previous.shape:
        raise ValueError(
            f"neighbour lists of shape {current.shape} and {previous.shape}: the stability "
            "compares the same images' lists of the same length"
        )
    both = np.sort(np.concatenate([current, previous], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)  # an id in both lists sorts twice in a row
    return float((shared / (2 * current.shape[1] - shared)).mean())


def label_free_signals(
    features: torch.Tensor,
    cameras: np.ndarray | torch.Tensor,
    k: int = 10,
    previous: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> tuple[LabelFreeSignals, np.ndarray]:
    """The signals of the N images' ``features`` (N, d) with their ``cameras`` (N,), and the
    neighbour lists (N, min(k, N - 1)) that the next evaluation's stability compares with.

    ``previous``: those lists from the previous evaluation of the same images, or None (the
    first evaluation): no ``neighbour_stability`` then, nor when their shape differs (a run
    resumed with another ``k``).
    """
    lists = neighbour_lists(features, cameras, k, device)
    stability = None
    if previous is not None and previous.shape == lists.nearest.shape:
        stability = neighbour_stability(lists.nearest, previous)
    signals = LabelFreeSignals(
        mutual_nn_rate=mutual_nn_rate(lists.other_camera[:, 0]),
        similarity_margin=similarity_margin(lists.other_camera_similarity),
        neighbour_stability=stability,
    )
    return signals, lists.nearest
