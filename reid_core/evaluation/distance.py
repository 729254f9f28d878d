"""Query x gallery distance matrices, computed in row chunks.

Two metrics are supported (``x`` a query row, ``y`` a gallery row):

* ``"cosine"``:    d(x, y) = 1 - <x / ||x||, y / ||y||>          (in [0, 2])
* ``"euclidean"``: d(x, y) = ||x - y||^2 = ||x||^2 + ||y||^2 - 2 <x, y>
  (the **squared** L2 distance, clamped at 0 against rounding; it ranks exactly as the L2
  distance and is what k-reciprocal re-ranking was formulated with).

The result is a float32 numpy array of shape (num_query, num_gallery). The only full-size
allocation is that result: the products are computed ``chunk_size`` query rows at a time, so a
Market-1501 sized case (3,368 x 15,913, ~214 MB of output) needs a few extra MB of workspace.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

Metric = Literal["cosine", "euclidean"]
METRICS: tuple[str, ...] = get_args(Metric)

ArrayLike = torch.Tensor | np.ndarray

#: Elements (rows x gallery) of one chunk of the product: 4M float32 = 16 MB of workspace.
_CHUNK_ELEMENTS = 1 << 22


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of float32 matrices; on the CPU through numpy's BLAS, which runs these
    products (a few thousand rows x 2048 x tens of thousands) about 1.5x faster than torch's
    CPU kernel on the machines measured (2-core x86_64, bench/results/cluster_scale.md)."""
    if a.device.type != "cpu" or a.requires_grad or b.requires_grad:
        return a @ b
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def check_metric(metric: str) -> Metric:
    """Return ``metric`` if it is supported, else raise a ValueError naming it."""
    if metric not in METRICS:
        raise ValueError(f"unknown distance metric {metric!r}; expected one of {list(METRICS)}")
    return metric  # type: ignore[return-value]


def as_float_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """A 2-D float32 tensor view/copy of ``x`` (kept on its device); raises on other ranks."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (num_samples, dim) array, got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        t = t.float()
    return t.to(torch.float32)


class DistanceRows:
    """Distances from any rows to fixed ``targets`` (n, D), the targets prepared once.

    ``distances(x)`` (r, D) -> (r, n) float32 tensor on the targets' device, with
    :data:`Metric`'s formulas (module docstring); ``distances(x, start)`` only to the targets
    ``start:``; ``distances.pairs(i, j)`` the distances between targets ``i[e]`` and ``j[e]``.
    Keeps the normalised targets (cosine) or the targets and their squared norms (euclidean).
    """

    def __init__(self, targets: ArrayLike, metric: Metric) -> None:
        self.metric = check_metric(metric)
        t = as_float_tensor(targets, "targets")
        with torch.no_grad():
            if self.metric == "cosine":
                self._t = F.normalize(t, p=2.0, dim=1)
                self._sq: torch.Tensor | None = None
            else:
                self._t = t
                self._sq = (t * t).sum(dim=1)

    @property
    def dim(self) -> int:
        return int(self._t.shape[1])

    def __call__(self, rows: ArrayLike, start: int = 0) -> torch.Tensor:
        x = as_float_tensor(rows, "rows").to(self._t.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {self.dim}")
        t = self._t[start:].T  # a transposed view: the product reads it without a copy
        with torch.no_grad():
            if self.metric == "cosine":
                # d = 1 - <x/|x|, y/|y|>
                return _matmul(F.normalize(x, p=2.0, dim=1), t).neg_().add_(1.0)
            # d = |x|^2 + |y|^2 - 2 <x, y>, clamped at 0 (rounding can make it slightly negative)
            assert self._sq is not None
            x_sq = (x * x).sum(dim=1, keepdim=True)
            return _matmul(x, t).mul_(-2.0).add_(x_sq).add_(self._sq[start:]).clamp_(min=0.0)

    def pairs(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """d(target i[e], target j[e]) for index tensors of equal shape, a float32 tensor."""
        with torch.no_grad():
            dot = (self._t[i] * self._t[j]).sum(dim=-1)
            if self.metric == "cosine":
                return 1.0 - dot
            assert self._sq is not None
            return (self._sq[i] + self._sq[j] - 2.0 * dot).clamp_(min=0.0)


def compute_distance(
    query: ArrayLike,
    gallery: ArrayLike,
    metric: Metric = "cosine",
    *,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Distance matrix between the rows of ``query`` (q, D) and ``gallery`` (g, D).

    Args:
        query: (q, D) features, a torch tensor (any device) or a numpy array.
        gallery: (g, D) features with the same D.
        metric: ``"cosine"`` (1 - cosine similarity of the L2-normalised rows) or
            ``"euclidean"`` (squared L2 distance); see the module docstring.
        chunk_size: query rows per product; by default chosen so that one chunk holds about
            4M elements.

    Returns:
        float32 numpy array of shape (q, g). Computation runs on the device of ``query``
        (``gallery`` is moved there) and each chunk is copied back to the host.
    """
    metric = check_metric(metric)
    q = as_float_tensor(query, "query")
    g = as_float_tensor(gallery, "gallery").to(q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query and gallery feature dimensions differ: {q.shape[1]} vs {g.shape[1]}"
        )
    num_q, num_g = q.shape[0], g.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(num_g, 1))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    out = np.empty((num_q, num_g), dtype=np.float32)
    if num_q == 0 or num_g == 0:
        return out
    distances = DistanceRows(g, metric)
    for start in range(0, num_q, chunk_size):
        block = distances(q[start : start + chunk_size])
        out[start : start + block.shape[0]] = block.cpu().numpy()
    return out
