"""Re-ID ranking metrics (CMC, mAP, mINP) under the Market-1501 protocol, vectorised.

Protocol, for each query ``i`` with identity ``p_i`` and camera ``c_i``:

1. Rank the whole gallery by increasing distance ``distmat[i]`` (a *stable* sort, so ties are
   broken by gallery index).
2. Drop the gallery items with the same identity *and* the same camera (``pid == p_i`` and
   ``camid == c_i``): they are trivially easy cross-frame matches. Everything else stays,
   including distractors (pid 0) which are plain negatives. Junk images (pid -1) are expected
   to have been removed when the dataset was loaded and get no special treatment here.
3. The remaining items with ``pid == p_i`` are the correct matches ("positives"). A query with
   no positive left is *invalid*: it is skipped and counted in ``num_skipped_queries``.

With ``r_1 < r_2 < ... < r_P`` the 1-based ranks of the P positives in the filtered list:

* CMC (first match):  ``cmc_i[k] = 1 if r_1 <= k + 1 else 0`` for k = 0 .. max_rank-1, and
  ``CMC[k] = mean_i cmc_i[k]`` over the valid queries; rank-k accuracy is ``CMC[k-1]``.
* AP (average precision): ``AP_i = (1/P) * sum_{j=1..P} j / r_j``, i.e. the mean over the
  correct matches of the precision at their rank; ``mAP = mean_i AP_i``.
* INP (inverse negative penalty, Ye et al. 2021): ``INP_i = P / r_P``, the precision at the
  rank of the hardest (last) correct match; ``mINP = mean_i INP_i``.

All values are fractions in [0, 1]. The implementation works on row chunks of the distance matrix
and replaces the per-query loop by boolean masks, cumulative sums and bincounts. It does not
even sort the rows: only the ranks of the gallery items sharing the query's pid matter, and
those come from one batched ``searchsorted`` of each row against the (few) sorted distances of
those items (:func:`_stable_ranks`), about twice as fast as a full argsort. Market-1501 sizes
(3,368 x 15,913) take about a second on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

#: pids / camera ids: a 1-D numpy array, torch tensor or sequence of ints.
LabelArray = np.ndarray | torch.Tensor | Sequence[int]

#: Elements (rows x gallery) of one chunk; the chunk temporaries are ~40 bytes per element.
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True, eq=False)
class RankResult:
    """Result of :func:`evaluate_rank`; metric values are fractions in [0, 1].

    Attributes:
        mAP: mean average precision over the valid queries.
        mINP: mean inverse negative penalty over the valid queries.
        cmc: (max_rank,) float64 array; ``cmc[k]`` is the rank-(k+1) accuracy (read-only).
        num_valid_queries: queries with at least one correct match after filtering.
        num_skipped_queries: queries without any, left out of every mean.
    """

    mAP: float  # noqa: N815 - the metric's usual spelling
    mINP: float  # noqa: N815
    cmc: np.ndarray = field(repr=False)
    num_valid_queries: int
    num_skipped_queries: int = 0

    def __post_init__(self) -> None:
        cmc = np.array(self.cmc, dtype=np.float64).reshape(-1)
        cmc.setflags(write=False)
        object.__setattr__(self, "cmc", cmc)

    @property
    def max_rank(self) -> int:
        return int(self.cmc.shape[0])

    def rank(self, k: int) -> float:
        """Rank-k accuracy (``cmc[k-1]``); raises ValueError when k is outside 1..max_rank."""
        if not 1 <= k <= self.max_rank:
            raise ValueError(f"rank {k} is outside 1..max_rank={self.max_rank}")
        return float(self.cmc[k - 1])

    @property
    def r1(self) -> float:
        return self.rank(1)

    @property
    def r5(self) -> float:
        return self.rank(5)

    @property
    def r10(self) -> float:
        return self.rank(10)

    def as_dict(self, percent: bool = True) -> dict[str, float | int]:
        """Flat dict for logging: mAP, mINP and rank-1/5/10 (those within max_rank), scaled by
        100 when ``percent``, plus the query counts (never scaled)."""
        scale = 100.0 if percent else 1.0
        out: dict[str, float | int] = {"mAP": self.mAP * scale, "mINP": self.mINP * scale}
        for k in (1, 5, 10):
            if k <= self.max_rank:
                out[f"r{k}"] = self.rank(k) * scale
        out["num_valid_queries"] = self.num_valid_queries
        out["num_skipped_queries"] = self.num_skipped_queries
        return out

    def __repr__(self) -> str:
        ranks = ", ".join(f"r{k}={self.rank(k):.4f}" for k in (1, 5, 10) if k <= self.max_rank)
        return (
            f"RankResult(mAP={self.mAP:.4f}, mINP={self.mINP:.4f}, {ranks}, "
            f"num_valid_queries={self.num_valid_queries}, "
            f"num_skipped_queries={self.num_skipped_queries})"
        )


def _as_1d(x: object, name: str, length: int) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D array of length {length}, got shape {arr.shape}")
    return arr


def evaluate_rank(
    distmat: np.ndarray | torch.Tensor,
    q_pids: LabelArray,
    g_pids: LabelArray,
    q_camids: LabelArray,
    g_camids: LabelArray,
    max_rank: int = 50,
) -> RankResult:
    """CMC, mAP and mINP of a (num_query, num_gallery) distance matrix (smaller = closer).

    See the module docstring for the protocol and the formulas.

    Raises:
        ValueError: on mismatched shapes, a non-finite distance, ``max_rank < 1``, or when no
            query has a correct match in the gallery after the same-camera filtering.
    """
    dist = np.asarray(distmat.detach().cpu() if isinstance(distmat, torch.Tensor) else distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {dist.shape}")
    num_q, num_g = dist.shape
    qp = _as_1d(q_pids, "q_pids", num_q)
    gp = _as_1d(g_pids, "g_pids", num_g)
    qc = _as_1d(q_camids, "q_camids", num_q)
    gc = _as_1d(g_camids, "g_camids", num_g)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if num_q == 0 or num_g == 0:
        raise ValueError(f"no valid query: empty distance matrix of shape {dist.shape}")

    if dist.dtype not in (np.float32, np.float64):
        dist = dist.astype(np.float64)

    cmc_hits = np.zeros(max_rank, dtype=np.int64)  # number of valid queries with r_1 <= k+1
    ap_sum = 0.0
    inp_sum = 0.0
    num_valid = 0
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // num_g)

    for start in range(0, num_q, rows_per_chunk):
        block = np.ascontiguousarray(dist[start : start + rows_per_chunk])
        num_rows = block.shape[0]
        if not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block))[0, 0])
            raise ValueError(f"distmat has a non-finite value in query row {bad}")
        # Entries (row, gallery index) with the query's pid: the only items whose rank matters.
        # Each is either removed (same camera) or a correct match.
        rr, gi = np.nonzero(gp[None, :] == qp[start : start + num_rows, None])
        de = block[rr, gi]
        # 1. order them as the stable sort of each row would: by (row, distance, gallery index)
        order = np.lexsort((gi, de, rr))
        rr, gi, de = rr[order], gi[order], de[order]
        row_start = np.searchsorted(rr, np.arange(num_rows))  # first entry of every row
        first_of_row = row_start[rr]
        rank_all = _stable_ranks(block, rr, gi, de, first_of_row)
        # 2. drop same pid & same camera; running counts within each row over the entry list
        removed = gc[gi] == qc[start + rr]
        is_pos = ~removed
        removed_excl = np.cumsum(removed) - removed  # removed entries strictly before
        pos_incl = np.cumsum(is_pos)  # correct matches up to and including
        pos_excl = pos_incl - is_pos
        # 1-based rank in the filtered list: rank among all - removed items ranked before it
        rank = rank_all - (removed_excl - removed_excl[first_of_row])
        # j: 1-based index of a correct match among the correct matches of its row
        j = pos_incl - pos_excl[first_of_row]
        r_pos, rank_pos, j_pos = rr[is_pos], rank[is_pos], j[is_pos]
        num_pos = np.bincount(r_pos, minlength=num_rows)  # P per query row
        valid = num_pos > 0
        if not valid.any():
            continue
        num_valid += int(valid.sum())
        # 3. CMC: r_1 = rank of the match with j == 1; query hits at rank k iff r_1 <= k
        r_first = rank_pos[j_pos == 1]
        hist = np.bincount(r_first[r_first <= max_rank] - 1, minlength=max_rank)
        cmc_hits += np.cumsum(hist)
        # AP_i = (1/P) * sum_j j / r_j   (mean precision at the correct matches)
        precision_sum = np.bincount(r_pos, weights=j_pos / rank_pos, minlength=num_rows)
        ap_sum += float((precision_sum[valid] / num_pos[valid]).sum())
        # INP_i = P / r_P   (r_P: rank of the last, hardest correct match, where j == P)
        last = j_pos == num_pos[r_pos]
        inp_sum += float((j_pos[last] / rank_pos[last]).sum())

    if num_valid == 0:
        raise ValueError(
            f"no valid query: none of the {num_q} queries has a correct match in the gallery "
            f"({num_g} items) once gallery items with the same pid and camera are dropped; "
            "check that query and gallery share identities seen from other cameras"
        )
    return RankResult(
        mAP=ap_sum / num_valid,
        mINP=inp_sum / num_valid,
        cmc=cmc_hits / num_valid,
        num_valid_queries=num_valid,
        num_skipped_queries=num_q - num_valid,
    )


def _stable_ranks(
    block: np.ndarray, rr: np.ndarray, gi: np.ndarray, de: np.ndarray, first_of_row: np.ndarray
) -> np.ndarray:
    """1-based rank of the entries ``(rr[e], gi[e])`` of a (rows, gallery) distance block in
    the *stable* ascending sort of their row (ties broken by gallery index), without sorting:

    ``rank(e) = #{k : d_k < d_e} + #{k : d_k == d_e, k < gi_e} + 1``.

    The entries must be ordered by (row, distance ``de``, gallery index). Per row, their
    distances form a sorted table ``s_0 <= s_1 <= ...``; one batched ``searchsorted`` gives
    every gallery item ``x`` the bucket ``b(x) = #{t : s_t < x}``, so that
    ``#{x <= s_t} = #{x : b(x) <= t}`` (a cumulative histogram of buckets), and the items equal
    to ``s_t`` are those with ``x == s_{b(x)}``. An entry without an equal distance in its row
    therefore has ``rank = #{x <= s_t}``; the rare tied entries are counted directly.
    """
    num_rows, num_g = block.shape
    num_e = len(rr)
    if num_e == 0:
        return np.zeros(0, dtype=np.int64)
    slot = np.arange(num_e) - first_of_row  # position t of the entry in its row's table
    width = int(slot.max()) + 1
    table = np.full((num_rows, width), np.inf, dtype=block.dtype)
    table[rr, slot] = de
    # b(x) = #{t : s_t < x}, in 0..width (torch: numpy has no batched searchsorted)
    bucket = torch.searchsorted(torch.from_numpy(table), torch.from_numpy(block)).numpy()
    equal = block == np.take_along_axis(table, np.minimum(bucket, width - 1), axis=1)
    key = bucket + (np.arange(num_rows) * (width + 1))[:, None]  # (row, bucket) -> flat bin
    bins = num_rows * (width + 1)
    hist = np.bincount(key.reshape(-1), minlength=bins).reshape(num_rows, width + 1)
    hist_eq = np.bincount(key[equal], minlength=bins).reshape(num_rows, width + 1)
    count_le = np.cumsum(hist, axis=1)[rr, slot]  # #{x <= s_t}
    # items equal to s_t are counted at the first slot t0 of its group of equal distances
    new_group = np.ones(num_e, dtype=bool)
    new_group[1:] = (rr[1:] != rr[:-1]) | (de[1:] != de[:-1])
    t0 = slot[np.maximum.accumulate(np.where(new_group, np.arange(num_e), 0))]
    num_equal = hist_eq[rr, t0]  # >= 1: the entry itself
    rank = count_le - num_equal + 1  # #{x < s_t} + 1
    tied = np.flatnonzero(num_equal > 1)
    g_index = np.arange(num_g)
    step = max(1, _CHUNK_ELEMENTS // num_g)
    for a in range(0, len(tied), step):
        t = tied[a : a + step]
        # + #{k : d_k == d_e, k < gi_e}
        rank[t] += ((block[rr[t]] == de[t, None]) & (g_index[None, :] < gi[t, None])).sum(axis=1)
    return rank
