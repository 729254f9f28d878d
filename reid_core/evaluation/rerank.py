"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017).

Notation: the N = q + g query and gallery samples are pooled; ``d(i, j)`` is their original
distance (as given: cosine distance or squared L2 from :func:`compute_distance`), each row scaled
by its maximum, ``d(i, j) <- d(i, j) / max_l d(i, l)``. ``N(i, k)`` is the list of the k+1
nearest samples of i, i itself first.

1. k-reciprocal set:  ``R(i, k) = {j in N(i, k) : i in N(j, k)}``.
2. Expansion:  ``R*(i, k1) = R(i, k1) U R(c, k1/2)`` for every ``c in R(i, k1)`` with
   ``|R(i, k1) & R(c, k1/2)| > 2/3 |R(c, k1/2)|``  (k1/2 rounded half to even).
3. Gaussian-kernel encoding, a sparse N x N matrix:
   ``V[i, j] = exp(-d(i, j)) / sum_{l in R*(i)} exp(-d(i, l))`` for ``j in R*(i)``, else 0
   (rows normalised to sum 1, as in the authors' code).
4. Local query expansion:  ``V[i] <- (1 / k2) * sum_{j in N(i, k2 - 1)} V[j]``  (the k2
   nearest samples, i included).
5. Jaccard distance:  ``d_J(i, j) = 1 - sum_l min(V[i, l], V[j, l]) / sum_l max(V[i, l], V[j, l])``
   with ``sum max = sum V[i] + sum V[j] - sum min``.
6. Final distance:  ``d*(i, j) = (1 - lambda) * d_J(i, j) + lambda * d(i, j)``, returned for the
   query rows and gallery columns.

Implementation: only the k nearest neighbours of each sample are kept (found with a top-k over
row chunks of the pooled distance matrix, never materialising the N x N matrix or its argsort),
V is held in CSR form (indices/values per row), and the Jaccard numerator is accumulated through
an inverted index (for every column l, the gallery rows with ``V[., l] != 0``), vectorised over
chunks of query rows. The pooled distances are read either from the three dense matrices
(:func:`re_rank`: O(N^2) memory) or computed from the features as they are needed
(:func:`re_rank_features`: O(N D) memory; one pass of row chunks finds the neighbours, the
encoding's distances d(i, j), j in R*(i), are dot products of the two samples' features, and
the final pass computes the query rows again). What grows as O(N^2) on that path is only the
q x g output; :func:`estimate_rerank_memory` counts it all, and ``max_memory_bytes`` refuses up
front.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from reid_core.evaluation.distance import (
    ArrayLike,
    DistanceRows,
    Metric,
    as_float_tensor,
    check_metric,
)

#: Default of ``max_memory_bytes``: 4 GiB, like the default of ``eval.rerank_max_memory_gb``.
DEFAULT_RERANK_MAX_MEMORY_BYTES = 4 * 1024**3

#: Elements per chunk of the temporary arrays (row blocks, membership tests, Jaccard scatter).
_CHUNK_ELEMENTS = 1 << 22
#: The passes over the pooled distances (neighbours, row maxima) read blocks this many times
#: larger: a matrix product of a few thousand rows runs near the BLAS peak, one of a hundred
#: rows does not (about 2x slower at 32k x 2048 on two cores).
_SEARCH_BLOCK_FACTOR = 16
#: Bytes of chunk workspace counted by the estimate: a few int64/float64 arrays of
#: _CHUNK_ELEMENTS, and a float32 search block with its finiteness mask.
_WORKSPACE_BYTES = (8 * 8 + 5 * _SEARCH_BLOCK_FACTOR) * _CHUNK_ELEMENTS

_GIB = float(1024**3)


class RerankMemoryError(ValueError):
    """Re-ranking was refused because its memory estimate exceeds the configured limit."""


def _half(k1: int) -> int:
    # round half to even, like numpy's around (k1 = 20 -> 10)
    return round(k1 / 2)


def estimate_rerank_memory(
    num_query: int,
    num_gallery: int,
    k1: int = 20,
    k2: int = 6,
    feature_dim: int | None = None,
) -> int:
    """Upper estimate, in bytes, of the memory of re-ranking ``num_query x num_gallery``.

    The inputs: ``4 (q^2 + q g + g^2)`` for the three float32 distance matrices of
    :func:`re_rank`, or, with ``feature_dim`` D (:func:`re_rank_features`), ``8 N D`` for the
    pooled features and their prepared copy. Then ``4 q g`` for the output, ``12 N m`` for V in
    CSR form (int64 index + float32 value) with ``m = (k1 + 1)(k1/2 + 2)`` the largest possible
    ``|R*|``, ``12 N min(N, k2 m)`` for V after query expansion, and a fixed chunk workspace.
    """
    if num_query < 0 or num_gallery < 0:
        raise ValueError(f"sizes must be >= 0, got num_query={num_query} num_gallery={num_gallery}")
    if feature_dim is not None and feature_dim < 1:
        raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
    q, g = int(num_query), int(num_gallery)
    n = q + g
    # the three distance matrices, or the pooled features and their prepared copy
    inputs = 4 * (q * q + q * g + g * g) if feature_dim is None else 8 * n * int(feature_dim)
    output = 4 * q * g
    members = min(n, (k1 + 1) * (_half(k1) + 2))
    sparse = 12 * n * members + 12 * n * min(n, max(k2, 1) * members)
    return inputs + output + sparse + _WORKSPACE_BYTES


def check_rerank_memory(
    num_query: int,
    num_gallery: int,
    max_memory_bytes: int | None,
    k1: int = 20,
    k2: int = 6,
    feature_dim: int | None = None,
) -> int:
    """Return the estimate; raise :class:`RerankMemoryError` when it exceeds the limit."""
    estimate = estimate_rerank_memory(num_query, num_gallery, k1=k1, k2=k2, feature_dim=feature_dim)
    if max_memory_bytes is not None and estimate > max_memory_bytes:
        raise RerankMemoryError(
            f"k-reciprocal re-ranking of {num_query} queries x {num_gallery} gallery images "
            f"(N = {num_query + num_gallery}) needs an estimated {estimate / _GIB:.2f} GiB, "
            f"above the limit of {max_memory_bytes / _GIB:.2f} GiB "
            f"(max_memory_bytes={max_memory_bytes}); raise the limit setting "
            "`eval.rerank_max_memory_gb` or disable re-ranking (`eval.rerank=false`)"
        )
    return estimate


def _as_matrix(x: ArrayLike, name: str, shape: tuple[int, int]) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr.astype(np.float32, copy=False)


def _expand_ranges(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the index ranges ``[starts[e], starts[e] + lens[e])``.

    Returns ``(owner, pos)``: for every produced position, the range it came from and the index.
    """
    owner = np.repeat(np.arange(len(lens)), lens)
    offsets = np.cumsum(lens) - lens
    pos = np.arange(int(lens.sum()), dtype=np.int64) - offsets[owner] + starts[owner]
    return owner, pos


class _Pool(ABC):
    """Row access to the pooled (q + g) x (q + g) distance matrix [[qq, qg], [qg^T, gg]]."""

    num_q: int
    num_g: int

    @property
    def n(self) -> int:
        return self.num_q + self.num_g

    def row_chunks(self, rows_per_chunk: int) -> list[tuple[int, int]]:
        """Chunks [a, b) of rows that do not straddle the query/gallery boundary."""
        chunks = []
        for lo, hi in ((0, self.num_q), (self.num_q, self.n)):
            chunks += [(a, min(a + rows_per_chunk, hi)) for a in range(lo, hi, rows_per_chunk)]
        return chunks

    @abstractmethod
    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of the pooled matrix, (b - a, N) float32."""

    @abstractmethod
    def query_gallery(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of qg (query rows, gallery columns), b <= q."""

    @abstractmethod
    def pairs(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """d(i[e], j[e]) for index arrays of equal shape, float32."""


class _DenseDistances(_Pool):
    """The pooled matrix from the three given distance matrices, never concatenated whole."""

    def __init__(self, qg: np.ndarray, qq: np.ndarray, gg: np.ndarray) -> None:
        self.qg, self.qq, self.gg = qg, qq, gg
        self.num_q, self.num_g = qg.shape

    def rows(self, a: int, b: int) -> np.ndarray:
        q = self.num_q
        if b <= q:
            return np.concatenate([self.qq[a:b], self.qg[a:b]], axis=1)
        return np.concatenate([self.qg[:, a - q : b - q].T, self.gg[a - q : b - q]], axis=1)

    def query_gallery(self, a: int, b: int) -> np.ndarray:
        return self.qg[a:b]

    def pairs(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        q = self.num_q
        out = np.empty(i.shape, dtype=np.float32)
        iq, jq = i < q, j < q
        m = iq & jq
        out[m] = self.qq[i[m], j[m]]
        m = iq & ~jq
        out[m] = self.qg[i[m], j[m] - q]
        m = ~iq & jq
        out[m] = self.qg[j[m], i[m] - q]
        m = ~iq & ~jq
        out[m] = self.gg[i[m] - q, j[m] - q]
        return out


class _FeatureDistances(_Pool):
    """The pooled matrix computed from the features, a chunk of rows at a time."""

    def __init__(self, query: ArrayLike, gallery: ArrayLike, metric: Metric) -> None:
        qf = as_float_tensor(query, "query_features").cpu()
        gf = as_float_tensor(gallery, "gallery_features").cpu()
        if qf.shape[1] != gf.shape[1]:
            raise ValueError(
                f"query and gallery feature dimensions differ: {qf.shape[1]} vs {gf.shape[1]}"
            )
        self.num_q, self.num_g = qf.shape[0], gf.shape[0]
        self.features = torch.cat([qf, gf])
        self.distances = DistanceRows(self.features, metric)

    def rows(self, a: int, b: int) -> np.ndarray:
        return self.distances(self.features[a:b]).numpy()

    def query_gallery(self, a: int, b: int) -> np.ndarray:
        return self.distances(self.features[a:b], start=self.num_q).numpy()

    def pairs(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        # each pair gathers two feature rows: chunked to keep that within the workspace
        out = np.empty(i.shape, dtype=np.float32)
        flat_i, flat_j, flat_out = i.reshape(-1), j.reshape(-1), out.reshape(-1)
        step = max(1, _CHUNK_ELEMENTS // self.distances.dim)
        for a in range(0, flat_i.size, step):
            pair_i = torch.from_numpy(flat_i[a : a + step])
            pair_j = torch.from_numpy(flat_j[a : a + step])
            flat_out[a : a + step] = self.distances.pairs(pair_i, pair_j).numpy()
        return out


def _search_rows(n: int) -> int:
    """Rows per block of a pass over the pooled (N x N) distances."""
    return max(1, _SEARCH_BLOCK_FACTOR * _CHUNK_ELEMENTS // n)


def _nearest_neighbours(pool: _Pool, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row maxima (N,), the ``width`` nearest samples of every row (N, width), self first)."""
    n = pool.n
    row_max = np.empty(n, dtype=np.float32)
    knn = np.empty((n, width), dtype=np.int64)
    for a, b in pool.row_chunks(_search_rows(n)):
        block = pool.rows(a, b)
        if not np.isfinite(block).all():
            bad = a + int(np.argwhere(~np.isfinite(block))[0, 0])
            raise ValueError(f"non-finite distance in row {bad} of the pooled distance matrix")
        row_max[a:b] = block.max(axis=1)
        # i itself is always the first of N(i, k), even with duplicate samples
        block[np.arange(b - a), np.arange(a, b)] = -np.inf
        _, idx = torch.topk(torch.from_numpy(block), width, dim=1, largest=False, sorted=True)
        knn[a:b] = idx.numpy()
    # a zero row (all samples identical) must not divide by zero
    row_max[row_max <= 0] = 1.0
    return row_max, knn


def _reciprocal_mask(knn: np.ndarray) -> np.ndarray:
    """mask[i, s] = (i is among the neighbours of knn[i, s]), i.e. knn[i, s] in R(i, k)."""
    n, width = knn.shape
    mask = np.empty((n, width), dtype=bool)
    step = max(1, _CHUNK_ELEMENTS // (width * width))
    for a in range(0, n, step):
        b = min(a + step, n)
        back = knn[knn[a:b]]  # (rows, width, width): the neighbour lists of the neighbours
        mask[a:b] = (back == np.arange(a, b)[:, None, None]).any(axis=2)
    return mask


def _encode(
    pool: _Pool, knn: np.ndarray, row_max: np.ndarray, k1: int, half: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-3: V in CSR form (indptr (N+1,), indices, float32 values)."""
    n = pool.n
    knn1 = knn[:, : k1 + 1]
    knnh = knn[:, : half + 1]
    recip1 = _reciprocal_mask(knn1)  # R(i, k1) = knn1[i][recip1[i]]
    reciph = _reciprocal_mask(knnh)  # R(c, k1/2) = knnh[c][reciph[c]]
    size_h = reciph.sum(axis=1)  # |R(c, k1/2)|
    s, t = k1 + 1, half + 1
    counts = np.zeros(n, dtype=np.int64)
    indices: list[np.ndarray] = []
    values: list[np.ndarray] = []
    step = max(1, _CHUNK_ELEMENTS // (s * t * s))
    for a in range(0, n, step):
        b = min(a + step, n)
        members, in_r = knn1[a:b], recip1[a:b]  # (rows, s): R(i, k1) as a masked list
        cand_sets = knnh[members]  # (rows, s, t): N(c, k1/2) of each candidate c in N(i, k1)
        cand_mask = reciph[members] & in_r[:, :, None]  # R(c, k1/2), only for c in R(i, k1)
        # overlap |R(i, k1) & R(c, k1/2)|: membership of every candidate element in R(i, k1)
        member_of_r = (
            (cand_sets[..., None] == members[:, None, None, :]) & in_r[:, None, None, :]
        ).any(axis=3)
        overlap = (member_of_r & cand_mask).sum(axis=2)
        # |overlap| > 2/3 |R(c, k1/2)|, in integers
        accept = in_r & (3 * overlap > 2 * size_h[members])
        ids = np.concatenate([members, cand_sets.reshape(b - a, s * t)], axis=1)
        keep = np.concatenate([in_r, (cand_mask & accept[:, :, None]).reshape(b - a, s * t)], 1)
        # R*(i) = union of the kept ids: sort each row, drop the sentinel n and repeats
        ids = np.sort(np.where(keep, ids, n), axis=1)
        first = np.ones_like(ids, dtype=bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        keep = first & (ids < n)
        rows = np.broadcast_to(np.arange(a, b)[:, None], ids.shape)[keep]
        cols = ids[keep]
        # V[i, j] = exp(-d(i, j)) / sum over R*(i)
        w = np.exp(-(pool.pairs(rows, cols) / row_max[rows])).astype(np.float32)
        w /= np.bincount(rows - a, weights=w, minlength=b - a).astype(np.float32)[rows - a]
        counts[a:b] = keep.sum(axis=1)
        indices.append(cols)
        values.append(w)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return indptr, np.concatenate(indices), np.concatenate(values)


def _query_expansion(
    csr: tuple[np.ndarray, np.ndarray, np.ndarray], knn: np.ndarray, k2: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 4: V[i] <- mean of V[j] over the k2 nearest j (CSR in, CSR out)."""
    indptr, indices, values = csr
    n = len(indptr) - 1
    if k2 == 1:
        return csr
    nbrs = knn[:, :k2]
    lens_all = np.diff(indptr)
    counts = np.zeros(n, dtype=np.int64)
    out_idx: list[np.ndarray] = []
    out_val: list[np.ndarray] = []
    mean_len = max(1.0, float(lens_all.mean()))
    step = max(1, int(_CHUNK_ELEMENTS // (k2 * mean_len)))
    for a in range(0, n, step):
        b = min(a + step, n)
        src = nbrs[a:b].reshape(-1)  # (c * k2,) rows to add up
        owner, pos = _expand_ranges(indptr[src], lens_all[src])
        local_row = owner // k2
        keys = local_row * n + indices[pos]
        uniq, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse, weights=values[pos], minlength=len(uniq)) / k2
        counts[a:b] = np.bincount(uniq // n, minlength=b - a)
        out_idx.append(uniq % n)
        out_val.append(sums.astype(np.float32))
    new_indptr = np.concatenate([[0], np.cumsum(counts)])
    return new_indptr, np.concatenate(out_idx), np.concatenate(out_val)


def _jaccard_final(
    pool: _Pool,
    csr: tuple[np.ndarray, np.ndarray, np.ndarray],
    row_max: np.ndarray,
    lambda_value: float,
) -> np.ndarray:
    """Steps 5-6 for the query rows and gallery columns, through an inverted index."""
    indptr, indices, values = csr
    q, g, n = pool.num_q, pool.num_g, pool.n
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    row_sum = np.bincount(row_of, weights=values, minlength=n)  # sum_l V[i, l]
    # inverted index: for every column l, the gallery rows j with V[j, l] != 0
    gal = row_of >= q
    g_cols = indices[gal]
    order = np.argsort(g_cols, kind="stable")
    inv_rows = row_of[gal][order] - q
    inv_vals = values[gal][order]
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(g_cols, minlength=n))])
    col_len = np.diff(col_ptr)

    out = np.empty((q, g), dtype=np.float32)
    # work of each query row = number of (l, j) pairs it touches; chunk rows by that work
    q_entries = indptr[q]
    work = np.bincount(row_of[:q_entries], weights=col_len[indices[:q_entries]], minlength=q)
    cum_work = np.concatenate([[0.0], np.cumsum(work)])
    max_rows = max(1, _CHUNK_ELEMENTS // max(g, 1))
    a = 0
    while a < q:
        b = int(np.searchsorted(cum_work, cum_work[a] + _CHUNK_ELEMENTS, side="right")) - 1
        b = min(max(b, a + 1), a + max_rows, q)
        e0, e1 = indptr[a], indptr[b]
        cols, vals = indices[e0:e1], values[e0:e1]
        owner, pos = _expand_ranges(col_ptr[cols], col_len[cols])
        # sum_l min(V[i, l], V[j, l]) scattered into a (b - a) x g block
        mins = np.minimum(vals[owner], inv_vals[pos])
        keys = (row_of[e0:e1][owner] - a) * g + inv_rows[pos]
        num = np.bincount(keys, weights=mins, minlength=(b - a) * g).reshape(b - a, g)
        # d_J = 1 - min / max, with sum max = sum V[i] + sum V[j] - sum min
        denom = row_sum[a:b, None] + row_sum[None, q:] - num
        jaccard = 1.0 - num / denom
        original = pool.query_gallery(a, b) / row_max[a:b, None]
        out[a:b] = (1.0 - lambda_value) * jaccard + lambda_value * original
        a = b
    return out


def re_rank(
    q_g_dist: ArrayLike,
    q_q_dist: ArrayLike,
    g_g_dist: ArrayLike,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_memory_bytes: int | None = DEFAULT_RERANK_MAX_MEMORY_BYTES,
) -> np.ndarray:
    """k-reciprocal re-ranking of a query x gallery distance matrix (formulas: module docstring).

    Args:
        q_g_dist: (q, g) query-gallery distances (smaller = closer, non-negative).
        q_q_dist: (q, q) query-query distances.
        g_g_dist: (g, g) gallery-gallery distances.
        k1: size of the k-reciprocal neighbourhoods (paper: 20).
        k2: size of the local query expansion (paper: 6; 1 disables it).
        lambda_value: weight of the original distance in the final one (paper: 0.3).
        max_memory_bytes: refuse (RerankMemoryError) when :func:`estimate_rerank_memory` is
            above it; None disables the check.

    Returns:
        (q, g) float32 re-ranked distances.
    """
    _check_parameters(k1, k2, lambda_value)
    qg_shape = tuple(q_g_dist.shape)
    if len(qg_shape) != 2 or min(qg_shape) < 1:
        raise ValueError(f"q_g_dist must be a non-empty 2-D (q, g) matrix, got shape {qg_shape}")
    q, g = int(qg_shape[0]), int(qg_shape[1])
    check_rerank_memory(q, g, max_memory_bytes, k1=k1, k2=k2)
    pool = _DenseDistances(
        _as_matrix(q_g_dist, "q_g_dist", (q, g)),
        _as_matrix(q_q_dist, "q_q_dist", (q, q)),
        _as_matrix(g_g_dist, "g_g_dist", (g, g)),
    )
    return _re_rank(pool, k1, k2, lambda_value)


def _check_parameters(k1: int, k2: int, lambda_value: float) -> None:
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1} k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")


#: V in CSR form: (indptr (N+1,), column indices, float32 values).
SparseRows = tuple[np.ndarray, np.ndarray, np.ndarray]


def _k_reciprocal_vectors(
    pool: _Pool,
    k1: int,
    k2: int,
    knn: np.ndarray | None = None,
    row_max: np.ndarray | None = None,
) -> tuple[np.ndarray, SparseRows]:
    """Steps 1-4: (row maxima, V after query expansion). ``knn``: the nearest samples of each
    row, self first, at least ``max(k1 + 1, k2)`` wide; ``row_max``: each row's largest
    distance, with ``knn`` only. One pass over the pooled distances finds what is not given
    (both at once when neither is)."""
    n = pool.n
    half = min(_half(k1), n - 1)  # k1/2 of the requested k1, both capped by the sample count
    k1 = min(k1, n - 1)
    k2 = min(k2, n)
    width = max(k1 + 1, k2)
    if knn is None:
        row_max, knn = _nearest_neighbours(pool, width)
    else:
        if knn.shape != (n, knn.shape[1]) or knn.shape[1] < width:
            raise ValueError(f"knn of shape {knn.shape}: expected ({n}, >= {width})")
        if row_max is None:
            row_max = _row_maxima(pool)
        elif row_max.shape != (n,):
            raise ValueError(f"row_max of shape {row_max.shape}: expected ({n},)")
        else:  # a zero row (all samples identical) must not divide by zero
            row_max = np.where(row_max > 0, row_max, 1.0).astype(np.float32)
    v = _encode(pool, knn, row_max, k1, half)
    return row_max, _query_expansion(v, knn, k2)


def _row_maxima(pool: _Pool) -> np.ndarray:
    """The largest distance of every row (1 where a row is all zeros)."""
    row_max = np.empty(pool.n, dtype=np.float32)
    for a, b in pool.row_chunks(_search_rows(pool.n)):
        row_max[a:b] = pool.rows(a, b).max(axis=1)
    row_max[row_max <= 0] = 1.0
    return row_max


def _re_rank(pool: _Pool, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    row_max, v = _k_reciprocal_vectors(pool, k1, k2)
    return _jaccard_final(pool, v, row_max, lambda_value)


def k_reciprocal_jaccard(
    features: ArrayLike,
    *,
    metric: Metric = "cosine",
    k1: int = 30,
    k2: int = 6,
    knn: np.ndarray | None = None,
    row_max: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse Jaccard distances d_J (step 5) among the N rows of ``features`` (N, D).

    Only pairs whose encodings V overlap (``sum_l min(V[i, l], V[j, l]) > 0``) have a distance
    below 1; they are returned as ``(rows, cols, d_J)``, self pairs (distance 0) included,
    every row's pairs in increasing column order. Memory is O(N D) for the features, O(N m)
    for V and the pairs (m the mean number of overlapping rows, a few hundred at k1 = 30),
    with row chunks of a fixed size in between: never N x N. ``knn`` as in the re-ranking:
    each row's nearest rows, self first (a faiss search, say), and ``row_max`` each row's
    largest distance; found here, in one pass, when not given.
    """
    check_metric(metric)
    _check_parameters(k1, k2, 0.0)
    pool = _FeatureDistances(features, as_float_tensor(features, "features")[:0], metric)
    _, (indptr, indices, values) = _k_reciprocal_vectors(pool, k1, k2, knn, row_max)
    n = pool.n
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    row_sum = np.bincount(row_of, weights=values, minlength=n)
    # inverted index: for every column l, the rows j with V[j, l] != 0
    order = np.argsort(indices, kind="stable")
    inv_rows, inv_vals = row_of[order], values[order]
    col_len = np.bincount(indices, minlength=n)
    col_ptr = np.concatenate([[0], np.cumsum(col_len)])
    out_rows: list[np.ndarray] = []
    out_cols: list[np.ndarray] = []
    out_dist: list[np.ndarray] = []
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    for a in range(0, n, rows_per_chunk):
        b = min(a + rows_per_chunk, n)
        e0, e1 = indptr[a], indptr[b]
        cols, vals = indices[e0:e1], values[e0:e1]
        owner, pos = _expand_ranges(col_ptr[cols], col_len[cols])
        keys = (row_of[e0:e1][owner] - a) * n + inv_rows[pos]
        mins = np.minimum(vals[owner], inv_vals[pos])
        num = np.bincount(keys, weights=mins, minlength=(b - a) * n).reshape(b - a, n)
        r, c = np.nonzero(num)
        overlap = num[r, c]
        r += a
        out_rows.append(r)
        out_cols.append(c)
        out_dist.append(
            np.clip(1.0 - overlap / (row_sum[r] + row_sum[c] - overlap), 0.0, 1.0).astype(
                np.float32
            )
        )
    return np.concatenate(out_rows), np.concatenate(out_cols), np.concatenate(out_dist)


def re_rank_features(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    *,
    metric: Metric = "euclidean",
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_memory_bytes: int | None = DEFAULT_RERANK_MAX_MEMORY_BYTES,
) -> np.ndarray:
    """:func:`re_rank` from features (q, D) and (g, D), distances by ``metric`` as
    :func:`reid_core.evaluation.compute_distance` computes them.

    No N x N matrix is formed: the distances are computed from the features a chunk of rows
    at a time (module docstring), so the memory is O(N D) plus the (q, g) output. The estimate
    is checked before anything is computed.
    """
    check_metric(metric)
    _check_parameters(k1, k2, lambda_value)
    shapes = (tuple(query_features.shape), tuple(gallery_features.shape))
    if any(len(shape) != 2 or shape[0] < 1 for shape in shapes):
        raise ValueError(
            "query and gallery features must be non-empty 2-D (num_samples, dim) arrays, got "
            f"shapes {shapes[0]} and {shapes[1]}"
        )
    q, g, dim = shapes[0][0], shapes[1][0], shapes[0][1]
    check_rerank_memory(q, g, max_memory_bytes, k1=k1, k2=k2, feature_dim=dim)
    return _re_rank(
        _FeatureDistances(query_features, gallery_features, metric), k1, k2, lambda_value
    )
