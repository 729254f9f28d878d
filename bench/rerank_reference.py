"""Dense k-reciprocal re-ranking, written plainly from the paper, as a reference for
:func:`reid_core.evaluation.re_rank` at scale (``bench/rerank_scale.py``).

Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017.
The N = q + g query and gallery samples are pooled into one N x N distance matrix ``D``; every
step below holds a full N x N matrix, which is what makes this formulation O(N^2) in memory:

1. ``D[i, j] <- d(i, j) / max_l d(i, l)``                         (N x N float32)
2. ``ranks[i] = argsort(D[i])`` with i itself first: ``N(i, k) = ranks[i, :k + 1]``
                                                                   (N x N int32)
3. ``R(i, k) = {j in N(i, k) : i in N(j, k)}``                     (k-reciprocal set, eq. 4)
4. ``R*(i) = R(i, k1) U R(c, k1/2)`` for each ``c in R(i, k1)`` with
   ``|R(i, k1) & R(c, k1/2)| > 2/3 |R(c, k1/2)|``                 (expansion, eq. 6)
5. ``V[i, j] = exp(-D[i, j]) / sum_{l in R*(i)} exp(-D[i, l])`` for j in R*(i), else 0
                                                                   (N x N float32, eq. 7)
6. ``V_qe[i] = (1 / k2) sum_{j in N(i, k2 - 1)} V[j]``             (local query expansion, eq. 11)
7. ``d_J(i, j) = 1 - sum_l min(V_qe[i, l], V_qe[j, l]) / sum_l max(V_qe[i, l], V_qe[j, l])``
   (eq. 10), with ``sum max = sum V_qe[i] + sum V_qe[j] - sum min``
8. ``d*(i, j) = (1 - lambda) d_J(i, j) + lambda D[i, j]``          (eq. 12), query rows x
   gallery columns.

Conventions shared with the library (so the two can be compared number for number): the row-max
scaling of step 1, the row normalisation of step 5 and the strict ``>`` of step 4 are those of the
authors' released code; ``k1/2`` is rounded half to even (20 -> 10). ``V_qe`` of the gallery rows
is stored transposed (N x g), so that step 7 reads the columns it needs contiguously; ``V_qe`` of
the query rows is q x N. Nothing here is chunked or sparse: it is the formulation, not an
implementation to use.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dense_re_rank", "dense_rerank_memory_bytes"]

#: Rows argsorted at a time (the temporary int64 argsort of one block).
_ROWS_PER_BLOCK = 256


def dense_rerank_memory_bytes(num_query: int, num_gallery: int) -> dict[str, int]:
    """Bytes of the matrices :func:`dense_re_rank` allocates, by name, plus ``total``.

    ``D``, ``ranks`` (int32) and ``V`` are N x N with 4-byte elements; ``V_qe`` is q x N + N x g;
    the output q x g: ``16 N^2 + 4 q g`` in all. The caller's three input matrices
    (``4 (q^2 + q g + g^2)``) come on top and are given as ``inputs``, outside ``total``.
    """
    q, g = int(num_query), int(num_gallery)
    n = q + g
    parts = {
        "D (N x N float32)": 4 * n * n,
        "ranks (N x N int32)": 4 * n * n,
        "V (N x N float32)": 4 * n * n,
        "V_qe (q x N + N x g float32)": 4 * q * n + 4 * n * g,
        "output (q x g float32)": 4 * q * g,
    }
    parts["total"] = sum(parts.values())
    parts["inputs"] = 4 * (q * q + q * g + g * g)
    return parts


def _reciprocal_sets(ranks: np.ndarray, k: int) -> list[np.ndarray]:
    """R(i, k) for every i: the j in N(i, k) that have i in N(j, k) (step 3)."""
    sets = []
    for i in range(ranks.shape[0]):
        forward = ranks[i, : k + 1]
        backward = ranks[forward, : k + 1]  # N(j, k) of every j in N(i, k)
        sets.append(forward[(backward == i).any(axis=1)])
    return sets


def dense_re_rank(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """Re-ranked (q, g) float32 distances, by the steps of the module docstring.

    Args:
        q_g_dist: (q, g) query-gallery distances (non-negative, smaller = closer).
        q_q_dist: (q, q) query-query distances.
        g_g_dist: (g, g) gallery-gallery distances.
        k1, k2, lambda_value: as in the paper (20, 6, 0.3).
    """
    num_q, num_g = q_g_dist.shape
    n = num_q + num_g

    # 1. the pooled matrix, each row scaled by its maximum
    dist = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]).astype(np.float32, copy=False)
    row_max = dist.max(axis=1, keepdims=True)
    row_max[row_max <= 0] = 1.0
    dist /= row_max

    # 2. every row fully sorted, the sample itself first
    ranks = np.empty((n, n), dtype=np.int32)
    for a in range(0, n, _ROWS_PER_BLOCK):
        b = min(a + _ROWS_PER_BLOCK, n)
        block = dist[a:b].copy()
        block[np.arange(b - a), np.arange(a, b)] = -1.0
        ranks[a:b] = np.argsort(block, axis=1, kind="stable")
    del block

    # 3. k-reciprocal sets; 4. their expansion; 5. the Gaussian-kernel encoding
    half = round(k1 / 2)
    r_k1 = _reciprocal_sets(ranks, k1)
    r_half = [set(r.tolist()) for r in _reciprocal_sets(ranks, half)]
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        r = set(r_k1[i].tolist())
        expanded = set(r)
        for c in r_k1[i].tolist():
            rc = r_half[c]
            if len(r & rc) > 2.0 / 3.0 * len(rc):
                expanded |= rc
        members = np.fromiter(sorted(expanded), dtype=np.int64)
        weights = np.exp(-dist[i, members])
        v[i, members] = weights / weights.sum()

    # 6. local query expansion: query rows as they are, gallery rows transposed
    v_qe_query = np.empty((num_q, n), dtype=np.float32)
    for i in range(num_q):
        v_qe_query[i] = v[ranks[i, :k2]].mean(axis=0)
    v_qe_gallery_t = np.empty((n, num_g), dtype=np.float32)
    for a in range(num_q, n, _ROWS_PER_BLOCK):
        b = min(a + _ROWS_PER_BLOCK, n)
        rows = np.stack([v[ranks[i, :k2]].mean(axis=0) for i in range(a, b)])
        v_qe_gallery_t[:, a - num_q : b - num_q] = rows.T
    del v, ranks

    # 7. Jaccard distance, one query at a time over the columns where V_qe[i] is not zero;
    # 8. blended with the original distance
    gallery_sums = v_qe_gallery_t.sum(axis=0)
    out = np.empty((num_q, num_g), dtype=np.float32)
    for i in range(num_q):
        cols = np.flatnonzero(v_qe_query[i])
        mins = np.minimum(v_qe_query[i, cols, None], v_qe_gallery_t[cols]).sum(axis=0)
        maxs = v_qe_query[i].sum() + gallery_sums - mins
        jaccard = 1.0 - mins / maxs
        out[i] = (1.0 - lambda_value) * jaccard + lambda_value * dist[i, num_q:]
    return out
