"""Tests of reid_core.evaluation: metrics against a plain per-query reference, re-ranking,
faiss search, distances and feature extraction."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reid_core.evaluation import (
    RankResult,
    RerankMemoryError,
    compute_distance,
    estimate_rerank_memory,
    evaluate_features,
    evaluate_rank,
    extract_features,
    re_rank,
    re_rank_features,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.eval_reference import reference_evaluate_rank, reference_re_rank  # noqa: E402

# ---------------------------------------------------------------------------------------------
# evaluate_rank
# ---------------------------------------------------------------------------------------------


def _random_case(rng: np.random.Generator, ties: bool = False):
    num_q = int(rng.integers(1, 40))
    num_g = int(rng.integers(1, 120))
    num_ids = int(rng.integers(1, 8))  # few identities, so that matches exist
    num_cams = int(rng.integers(1, 4))
    if ties:
        distmat = rng.integers(0, 5, size=(num_q, num_g)).astype(np.float32)
    else:
        # distinct distances: a random permutation of 0..q*g-1, scaled
        distmat = (rng.permutation(num_q * num_g).reshape(num_q, num_g) / (num_q * num_g)).astype(
            np.float32
        )
    q_pids = rng.integers(0, num_ids, num_q)  # pid 0: distractor identity
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    max_rank = int(rng.integers(1, 60))
    return distmat, q_pids, g_pids, q_cams, g_cams, max_rank


def _assert_matches_reference(args) -> bool:
    try:
        ref = reference_evaluate_rank(*args)
    except ValueError:
        with pytest.raises(ValueError, match="no valid query"):
            evaluate_rank(*args)
        return False
    res = evaluate_rank(*args)
    assert res.num_valid_queries == ref["num_valid_queries"]
    assert res.num_valid_queries + res.num_skipped_queries == args[0].shape[0]
    assert res.mAP == pytest.approx(ref["mAP"], abs=1e-6)
    assert res.mINP == pytest.approx(ref["mINP"], abs=1e-6)
    np.testing.assert_allclose(res.cmc, ref["cmc"], atol=1e-6, rtol=0)
    assert res.cmc.shape == (args[-1],)
    return True


def test_evaluate_rank_matches_reference_on_random_cases():
    rng = np.random.default_rng(1234)
    compared = sum(_assert_matches_reference(_random_case(rng)) for _ in range(300))
    assert compared > 200  # most random cases have a valid query


def test_evaluate_rank_ties_follow_gallery_order_like_reference():
    rng = np.random.default_rng(99)
    compared = sum(_assert_matches_reference(_random_case(rng, ties=True)) for _ in range(100))
    assert compared > 50


def test_evaluate_rank_degenerate_ties_and_float64():
    rng = np.random.default_rng(7)
    q_pids, g_pids = rng.integers(0, 3, 6), rng.integers(0, 3, 40)
    q_cams, g_cams = rng.integers(0, 2, 6), rng.integers(0, 2, 40)
    # a collapsed model: every distance equal (ranking = gallery order), with -0.0 and 0.0 mixed
    const = np.zeros((6, 40), dtype=np.float32)
    const[:, ::3] = -0.0
    _assert_matches_reference((const, q_pids, g_pids, q_cams, g_cams, 10))
    # float64 distances that differ below float32 resolution are not merged into ties
    fine = 1.0 + rng.permutation(6 * 40).reshape(6, 40) * 1e-12
    _assert_matches_reference((fine, q_pids, g_pids, q_cams, g_cams, 10))


def test_evaluate_rank_chunked_rows_match_reference(monkeypatch):
    import reid_core.evaluation.metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "_CHUNK_ELEMENTS", 7)  # one query row per chunk
    rng = np.random.default_rng(5)
    for _ in range(20):
        _assert_matches_reference(_random_case(rng))


def test_evaluate_rank_hand_computed():
    # Gallery (index: pid, cam):
    #   g0: 2, 1   g1: 1, 1   g2: 1, 0   g3: 3, 1   g4: 1, 2   g5: 0, 1   g6: 1, 1
    g_pids = np.array([2, 1, 1, 3, 1, 0, 1])
    g_cams = np.array([1, 1, 0, 1, 2, 1, 1])
    q_pids = np.array([1, 2, 5])
    q_cams = np.array([0, 0, 0])
    distmat = np.array(
        [
            # query 0 (pid 1, cam 0): order g0 g1 g2 g3 g4 g6 g5. g2 is same pid & camera:
            # dropped, so the filtered list is g0 g1 g3 g4 g6 g5 with correct matches g1, g4,
            # g6 at ranks 2, 4, 5.
            #   AP  = (1/2 + 2/4 + 3/5) / 3 = 1.6 / 3 = 0.5333...
            #   INP = 3 / 5 = 0.6;  first match at rank 2
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.55],
            # query 1 (pid 2, cam 0): its only match g0 is the farthest of 7 (nothing dropped):
            #   AP = 1/7, INP = 1/7, first match at rank 7
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            # query 2 (pid 5): no match at all -> skipped
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        ]
    )
    res = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=8)
    assert res.num_valid_queries == 2
    assert res.num_skipped_queries == 1
    assert res.mAP == pytest.approx((1.6 / 3 + 1 / 7) / 2, abs=1e-12)
    assert res.mINP == pytest.approx((0.6 + 1 / 7) / 2, abs=1e-12)
    # CMC: query 0 hits from rank 2, query 1 from rank 7
    np.testing.assert_allclose(res.cmc, [0, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    assert res.r1 == 0.0
    assert res.r5 == 0.5
    with pytest.raises(ValueError, match="rank 10"):
        _ = res.r10
    d = res.as_dict(percent=True)
    assert d["mAP"] == pytest.approx(100 * res.mAP)
    assert d["r5"] == pytest.approx(50.0)
    assert "r10" not in d
    assert d["num_valid_queries"] == 2
    assert res.as_dict(percent=False)["r1"] == 0.0


def test_same_pid_same_camera_items_are_excluded():
    # query pid 1, cam 0. Nearest: same pid & camera (dropped), then a pid-0 distractor (a
    # negative), then the cross-camera match, which therefore sits at rank 2.
    distmat = np.array([[0.1, 0.2, 0.3]])
    res = evaluate_rank(distmat, np.array([1]), np.array([1, 0, 1]), np.array([0]), [0, 1, 1])
    assert res.r1 == 0.0
    assert res.cmc[1] == 1.0
    assert res.mAP == pytest.approx(0.5)
    assert res.mINP == pytest.approx(0.5)

    # the same matrix without the camera filter (other camera) counts g0 as a hit at rank 1
    res2 = evaluate_rank(distmat, np.array([1]), np.array([1, 0, 1]), np.array([0]), [1, 1, 1])
    assert res2.r1 == 1.0
    assert res2.mAP == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_queries_with_only_same_camera_matches_are_skipped():
    distmat = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 0, 0])
    g_pids, g_cams = np.array([1, 2]), np.array([0, 1])
    res = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=2)
    # query 0: only match same camera -> skipped; query 2: no match -> skipped
    assert res.num_valid_queries == 1
    assert res.num_skipped_queries == 2
    assert res.r1 == 0.0  # query 1: g0 (pid 1) ranks first
    assert res.mAP == pytest.approx(0.5)


def test_no_valid_query_raises():
    distmat = np.array([[0.1, 0.2]])
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank(distmat, np.array([1]), np.array([1, 2]), np.array([0]), np.array([0, 0]))


def test_evaluate_rank_rejects_bad_input():
    d = np.zeros((2, 3))
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_rank(d, np.zeros(2), np.zeros(4), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(d, np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(3), max_rank=0)
    d[1, 2] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        evaluate_rank(d, np.zeros(2), np.zeros(3), np.zeros(2), np.ones(3))


def test_rank_result_is_frozen():
    res = RankResult(mAP=0.5, mINP=0.25, cmc=np.array([0.5, 1.0]), num_valid_queries=2)
    with pytest.raises(AttributeError):
        res.mAP = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        res.cmc[0] = 1.0


# ---------------------------------------------------------------------------------------------
# re-ranking
# ---------------------------------------------------------------------------------------------


def _clustered(seed: int, ids: int = 20, per: int = 8, dim: int = 16, noise: float = 0.8):
    """Gaussian identity clusters; one query per identity, the rest gallery, 4 cameras."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, dim))
    pids = np.repeat(np.arange(1, ids + 1), per)
    cams = np.tile(np.arange(per) % 4, ids)
    feats = (centers[pids - 1] + noise * rng.normal(size=(len(pids), dim))).astype(np.float32)
    is_q = np.zeros(len(pids), dtype=bool)
    is_q[::per] = True
    return feats[is_q], feats[~is_q], pids[is_q], pids[~is_q], cams[is_q], cams[~is_q]


def _dists(qf, gf, metric="euclidean"):
    return (
        compute_distance(qf, gf, metric),
        compute_distance(qf, qf, metric),
        compute_distance(gf, gf, metric),
    )


@pytest.mark.parametrize(
    ("k1", "k2", "lam", "metric"),
    [
        (20, 6, 0.3, "euclidean"),
        (20, 6, 0.3, "cosine"),
        (5, 3, 0.0, "euclidean"),
        (7, 1, 1.0, "cosine"),
        (3, 4, 0.5, "euclidean"),
    ],
)
def test_re_rank_matches_dense_reference(k1, k2, lam, metric):
    qf, gf, *_ = _clustered(0, ids=8, per=6, noise=0.7)
    qg, qq, gg = _dists(qf, gf, metric)
    ours = re_rank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    ref = reference_re_rank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert ours.shape == qg.shape
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("metric", "k1", "k2"), [("cosine", 20, 6), ("euclidean", 5, 3)])
def test_re_rank_features_matches_the_dense_path_and_the_reference(metric, k1, k2):
    qf, gf, *_ = _clustered(1, ids=12, per=6, noise=0.7)
    qg, qq, gg = _dists(qf, gf, metric)
    ref = reference_re_rank(qg, qq, gg, k1=k1, k2=k2, lambda_value=0.3)
    from_features = re_rank_features(qf, gf, metric=metric, k1=k1, k2=k2)
    assert from_features.shape == qg.shape
    np.testing.assert_allclose(from_features, ref, atol=1e-5, rtol=0)
    dense = re_rank(qg, qq, gg, k1=k1, k2=k2)
    np.testing.assert_allclose(from_features, dense, atol=1e-6, rtol=0)


def test_re_rank_features_in_small_chunks_and_as_tensors(monkeypatch):
    import reid_core.evaluation.rerank as rerank_mod

    qf, gf, *_ = _clustered(4, ids=10, per=5)
    expected = re_rank_features(qf, gf, metric="cosine")
    # chunks of a few rows: the encoding's row blocks straddle the query/gallery boundary
    monkeypatch.setattr(rerank_mod, "_CHUNK_ELEMENTS", 50)
    got = re_rank_features(torch.from_numpy(qf), torch.from_numpy(gf), metric="cosine")
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_re_rank_features_rejects_bad_shapes():
    with pytest.raises(ValueError, match="dimensions differ: 4 vs 3"):
        re_rank_features(np.ones((2, 4), np.float32), np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="non-empty 2-D"):
        re_rank_features(np.ones((0, 4), np.float32), np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="unknown distance metric 'manhattan'"):
        re_rank_features(np.ones((2, 4)), np.ones((3, 4)), metric="manhattan")


def test_re_rank_small_chunks_give_same_result(monkeypatch):
    import reid_core.evaluation.rerank as rerank_mod

    qf, gf, *_ = _clustered(3, ids=10, per=5)
    qg, qq, gg = _dists(qf, gf)
    expected = re_rank(qg, qq, gg)
    monkeypatch.setattr(rerank_mod, "_CHUNK_ELEMENTS", 50)
    np.testing.assert_allclose(re_rank(qg, qq, gg), expected, atol=1e-6)


def test_re_rank_tiny_case_is_symmetric_and_bounded():
    qf, gf, *_ = _clustered(1, ids=4, per=4, dim=4)
    qg, qq, gg = _dists(qf, gf)
    out = re_rank(qg, qq, gg, k1=4, k2=2, lambda_value=0.0)
    assert out.shape == (4, 12)
    # the Jaccard distance is symmetric: swapping the roles of query and gallery transposes it
    swapped = re_rank(qg.T, gg, qq, k1=4, k2=2, lambda_value=0.0)
    np.testing.assert_allclose(swapped, out.T, atol=1e-6)
    # distances of a Jaccard / row-normalised combination lie in [0, 1]
    full = re_rank(qg, qq, gg, k1=4, k2=2, lambda_value=0.3)
    assert np.all(full >= -1e-6)
    assert np.all(full <= 1 + 1e-6)
    # lambda = 1 leaves the row-normalised original distance
    orig = re_rank(qg, qq, gg, k1=4, k2=2, lambda_value=1.0)
    row_max = np.maximum(qq.max(axis=1), qg.max(axis=1))
    np.testing.assert_allclose(orig, qg / row_max[:, None], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_re_rank_improves_map_on_clusters(seed):
    qf, gf, qp, gp, qc, gc = _clustered(seed, noise=0.8)
    base = evaluate_features(qf, gf, qp, gp, qc, gc, metric="euclidean")
    rr = evaluate_features(qf, gf, qp, gp, qc, gc, metric="euclidean", rerank=True)
    assert rr.mAP > base.mAP + 0.02


def test_re_rank_keeps_perfect_separation():
    qf, gf, qp, gp, qc, gc = _clustered(4, noise=0.05)
    for metric in ("euclidean", "cosine"):
        res = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, rerank=True)
        assert res.mAP == pytest.approx(1.0)
        assert res.mINP == pytest.approx(1.0)


def test_re_rank_memory_refusal():
    qf, gf, qp, gp, qc, gc = _clustered(0, ids=4, per=4)
    qg, qq, gg = _dists(qf, gf)
    with pytest.raises(RerankMemoryError, match="limit") as info:
        re_rank(qg, qq, gg, max_memory_bytes=1000)
    msg = str(info.value)
    assert "eval.rerank_max_memory_gb" in msg
    assert "4 queries x 12 gallery" in msg
    assert isinstance(info.value, ValueError)
    # checked before any distance is computed (features of a Market-sized case are not needed)
    with pytest.raises(RerankMemoryError, match="3368 queries x 15913 gallery"):
        re_rank_features(torch.zeros(3368, 2), torch.zeros(15913, 2), max_memory_bytes=2**28)
    with pytest.raises(RerankMemoryError):
        evaluate_features(qf, gf, qp, gp, qc, gc, rerank=True, max_rerank_memory_bytes=1000)
    # None disables the check
    assert re_rank(qg, qq, gg, max_memory_bytes=None).shape == (4, 12)


def test_estimate_rerank_memory_grows_quadratically():
    q, g = 3368, 15913
    est = estimate_rerank_memory(q, g)
    assert est >= 4 * (q * q + 2 * q * g + g * g)  # three dense inputs + output
    assert est < 4 * 1024**3  # Market-1501 fits the default 4 GiB limit
    assert estimate_rerank_memory(2 * q, 2 * g) > 3.5 * est - 4 * 1024**3


def test_estimate_rerank_memory_from_features_has_no_dense_inputs():
    # MSMT17's test split: the dense inputs alone are ~29 GiB; from 2048-d features they are not
    q, g, n, dim = 11659, 82161, 11659 + 82161, 2048
    dense = estimate_rerank_memory(q, g)
    features = estimate_rerank_memory(q, g, feature_dim=dim)
    assert dense - features == 4 * (q * q + q * g + g * g) - 8 * n * dim
    assert features < 8 * 1024**3
    with pytest.raises(ValueError, match="feature_dim must be >= 1, got 0"):
        estimate_rerank_memory(q, g, feature_dim=0)


def test_re_rank_rejects_bad_arguments():
    qg, qq, gg = np.ones((2, 3)), np.ones((2, 2)), np.ones((3, 3))
    with pytest.raises(ValueError, match="lambda_value"):
        re_rank(qg, qq, gg, lambda_value=1.5)
    with pytest.raises(ValueError, match="k1"):
        re_rank(qg, qq, gg, k1=0)
    with pytest.raises(ValueError, match="g_g_dist"):
        re_rank(qg, qq, np.ones((2, 2)))


# ---------------------------------------------------------------------------------------------
# faiss search
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_search_matches_brute_force(metric, tmp_path):
    pytest.importorskip("faiss")
    from reid_core.evaluation.search import build_index, knn_search, load_index, save_index

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(500, 32, generator=gen)
    queries = torch.randn(40, 32, generator=gen)
    k = 10
    index = build_index(base.numpy(), metric=metric, use_gpu=False)
    scores, ids = knn_search(index, queries, k)
    assert scores.shape == ids.shape == (40, k)
    assert ids.dtype == np.int64
    if metric == "cosine":
        sim = F.normalize(queries, dim=1) @ F.normalize(base, dim=1).T
        ref_scores, ref_ids = sim.topk(k, dim=1)
    else:
        d2 = torch.cdist(queries, base) ** 2
        ref_scores, ref_ids = d2.topk(k, dim=1, largest=False)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-4)

    path = save_index(index, tmp_path / "sub" / "gallery.faiss")
    loaded = load_index(path)
    assert loaded.ntotal == 500
    scores2, ids2 = knn_search(loaded, queries.numpy(), k)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_allclose(scores2, scores)


def test_a_failed_index_write_keeps_the_old_index(tmp_path, monkeypatch):
    """save_index replaces the file in one step: a write that fails half-way (a full disk)
    leaves the index that was there, and no temporary file."""
    faiss = pytest.importorskip("faiss")
    from reid_core.evaluation.search import build_index, load_index, save_index

    rng = np.random.default_rng(0)
    path = save_index(build_index(rng.normal(size=(7, 4)), metric="cosine"), tmp_path / "g.faiss")

    def half_write(index, name):
        with open(name, "wb") as f:
            f.write(b"IxF")  # a truncated header
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(faiss, "write_index", half_write)
    with pytest.raises(RuntimeError, match="No space"):
        save_index(build_index(rng.normal(size=(3, 4)), metric="cosine"), path)
    monkeypatch.undo()
    assert load_index(path).ntotal == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.faiss"]


def test_knn_search_errors(tmp_path):
    pytest.importorskip("faiss")
    from reid_core.evaluation.search import build_index, knn_search, load_index

    index = build_index(np.random.default_rng(0).normal(size=(5, 4)), metric="euclidean")
    with pytest.raises(ValueError, match=r"k must be in 1\.\.5"):
        knn_search(index, np.zeros((1, 4)), 6)
    with pytest.raises(ValueError, match="dimension 3"):
        knn_search(index, np.zeros((1, 3)), 1)
    with pytest.raises(FileNotFoundError):
        load_index(tmp_path / "missing.faiss")
    with pytest.raises(ValueError, match="unknown distance metric 'dot'"):
        build_index(np.zeros((2, 2)), metric="dot")  # type: ignore[arg-type]


def test_search_without_faiss_names_the_extras(monkeypatch):
    from reid_core.evaluation import search

    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="`cpu` extra"):
        search.build_index(np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------


def test_compute_distance_against_formulas():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(13, 7)).astype(np.float32)
    g = rng.normal(size=(29, 7)).astype(np.float32)
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    qn = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    gn = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
    cos = compute_distance(q, g, "cosine")
    assert cos.dtype == np.float32
    assert cos.shape == (13, 29)
    np.testing.assert_allclose(cos, 1.0 - qn @ gn.T, atol=1e-5)
    euc = compute_distance(torch.from_numpy(q), torch.from_numpy(g), "euclidean")
    np.testing.assert_allclose(euc, ((q64[:, None] - g64[None]) ** 2).sum(-1), atol=1e-4)
    # chunking does not change the result
    np.testing.assert_allclose(compute_distance(q, g, "euclidean", chunk_size=3), euc, atol=1e-5)
    np.testing.assert_allclose(compute_distance(q, g, "cosine", chunk_size=1), cos, atol=1e-6)
    # squared L2 of a row with itself is clamped at 0
    assert (compute_distance(q, q, "euclidean") >= 0).all()


def test_compute_distance_errors():
    with pytest.raises(ValueError, match="unknown distance metric 'l1'"):
        compute_distance(np.zeros((1, 2)), np.zeros((1, 2)), "l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimensions differ: 2 vs 3"):
        compute_distance(np.zeros((1, 2)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="2-D"):
        compute_distance(np.zeros(3), np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------
# feature extraction
# ---------------------------------------------------------------------------------------------


class _DummyModel(nn.Module):
    """extract(): a linear map of the flattened image, L2-normalised (not flip-invariant)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 6, 5)
        self.calls: list[tuple[bool, bool, str]] = []

    def extract(self, images: torch.Tensor, feature: str = "concat") -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled(), feature))
        return F.normalize(self.fc(images.flatten(1)), dim=1)


class _ListLoader:
    def __init__(self, batches, dataset_len: int) -> None:
        self.batches = batches
        self.dataset = list(range(dataset_len))

    def __iter__(self):
        return iter(self.batches)


def _shuffled_batches(images: torch.Tensor, perm: torch.Tensor, batch: int):
    return [(images[perm[i : i + batch]], perm[i : i + batch]) for i in range(0, len(perm), batch)]


def test_extract_features_dataset_order_and_flip():
    torch.manual_seed(0)
    model = _DummyModel()
    model.train()
    images = torch.randn(11, 3, 4, 6)
    perm = torch.randperm(11)
    loader = _ListLoader(_shuffled_batches(images, perm, 4), 11)
    with torch.no_grad():
        plain = F.normalize(model.fc(images.flatten(1)), dim=1)
        mirrored = F.normalize(model.fc(images.flip(-1).flatten(1)), dim=1)

    feats = extract_features(model, loader, "cpu", feature="global")
    assert feats.shape == (11, 5)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, plain)
    # eval mode + inference mode during extraction, previous mode restored afterwards
    assert all(not training and inference for training, inference, _ in model.calls)
    assert {kind for *_, kind in model.calls} == {"global"}
    assert model.training

    flipped = extract_features(model, loader, torch.device("cpu"), flip=True)
    expected = F.normalize((plain + mirrored) / 2, dim=1)
    torch.testing.assert_close(flipped, expected)
    torch.testing.assert_close(flipped.norm(dim=1), torch.ones(11))
    assert not torch.allclose(flipped, plain)


def test_extract_features_rejects_incomplete_or_repeated_indices():
    model = _DummyModel()
    images = torch.randn(4, 3, 4, 6)
    repeated = _ListLoader([(images, torch.tensor([0, 1, 1, 2]))], 4)
    with pytest.raises(ValueError, match=r"1 repeated \[1\], 1 missing \[3\]"):
        extract_features(model, repeated, "cpu")
    out_of_range = _ListLoader([(images, [0, 1, 2, 7])], 4)
    with pytest.raises(ValueError, match=r"outside 0..3: \[7\]"):
        extract_features(model, out_of_range, "cpu")
    with pytest.raises(TypeError, match="no extract"):
        extract_features(nn.Linear(2, 2), repeated, "cpu")


def test_evaluate_features_end_to_end():
    qf, gf, qp, gp, qc, gc = _clustered(2, noise=0.6)
    res = evaluate_features(torch.from_numpy(qf), torch.from_numpy(gf), qp, gp, qc, gc)
    direct = evaluate_rank(compute_distance(qf, gf, "cosine"), qp, gp, qc, gc)
    assert res.mAP == pytest.approx(direct.mAP)
    np.testing.assert_allclose(res.cmc, direct.cmc)
    assert 0.5 < res.mAP <= 1.0
