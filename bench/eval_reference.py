"""Plain, per-query reference implementations used to check the vectorised ones.

They are deliberately simple (one query / one sample at a time, written straight from the
definitions) and slow; :mod:`bench.eval_speed` times them and ``tests/unit/test_evaluation.py``
compares against them. They are not part of the library.
"""

from __future__ import annotations

import numpy as np


def reference_evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> dict[str, object]:
    """Market-1501 protocol, one query at a time.

    Returns a dict with ``mAP``, ``mINP`` (floats in [0, 1]), ``cmc`` (float64 array of length
    ``max_rank``) and ``num_valid_queries``; raises ValueError when no query is valid.
    """
    distmat = np.asarray(distmat)
    num_q = distmat.shape[0]
    cmc_sum = np.zeros(max_rank, dtype=np.float64)
    aps: list[float] = []
    inps: list[float] = []
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")  # ascending distance, ties by index
        # drop gallery items with the same pid AND the same camera as the query
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        kept = order[~junk]
        matches = g_pids[kept] == q_pids[i]
        if not matches.any():
            continue  # no correct match: query skipped
        hit_ranks = np.flatnonzero(matches) + 1  # 1-based ranks r_1 < ... < r_P
        num_pos = len(hit_ranks)
        # CMC: 1 from the rank of the first correct match on
        cmc = np.zeros(max_rank, dtype=np.float64)
        if hit_ranks[0] <= max_rank:
            cmc[hit_ranks[0] - 1 :] = 1.0
        cmc_sum += cmc
        # AP: mean over correct matches of the precision at their rank
        precisions = [(j + 1) / r for j, r in enumerate(hit_ranks)]
        aps.append(float(np.mean(precisions)))
        # INP: number of correct matches / rank of the last correct match
        inps.append(num_pos / hit_ranks[-1])
    if not aps:
        raise ValueError("no valid query")
    return {
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "cmc": cmc_sum / len(aps),
        "num_valid_queries": len(aps),
    }


def _k_reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): the j among the k+1 nearest of i (i itself included) that have i among theirs."""
    forward = initial_rank[i, : k + 1]
    return np.array([j for j in forward if i in initial_rank[j, : k + 1]], dtype=np.int64)


def reference_re_rank(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """Dense k-reciprocal re-ranking (Zhong et al., CVPR 2017), one sample at a time.

    O(N^2) memory and Python loops over samples: only for small N.
    """
    num_q = q_g_dist.shape[0]
    dist = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]).astype(np.float64)
    n = dist.shape[0]
    dist = dist / dist.max(axis=1, keepdims=True)  # each row scaled by its maximum
    initial_rank = np.argsort(dist, axis=1, kind="stable")
    half = round(k1 / 2)  # half to even: 20 -> 10
    v = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        r = _k_reciprocal(initial_rank, i, k1)
        r_star = set(r.tolist())
        for c in r:
            rc = _k_reciprocal(initial_rank, int(c), half)
            overlap = len(set(rc.tolist()) & set(r.tolist()))
            if overlap > 2.0 / 3.0 * len(rc):
                r_star |= set(rc.tolist())
        members = np.array(sorted(r_star), dtype=np.int64)
        w = np.exp(-dist[i, members])
        v[i, members] = w / w.sum()
    # local query expansion: average of the V rows of the k2 nearest neighbours
    v_qe = np.zeros_like(v)
    for i in range(n):
        v_qe[i] = v[initial_rank[i, :k2]].mean(axis=0)
    jaccard = np.zeros((num_q, n - num_q), dtype=np.float64)
    for i in range(num_q):
        for jj in range(n - num_q):
            a, b = v_qe[i], v_qe[num_q + jj]
            jaccard[i, jj] = 1.0 - np.minimum(a, b).sum() / np.maximum(a, b).sum()
    return (1 - lambda_value) * jaccard + lambda_value * dist[:num_q, num_q:]
