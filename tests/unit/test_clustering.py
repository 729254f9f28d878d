"""Sparse k-reciprocal Jaccard distance against a brute-force reference, DBSCAN pseudo labels,
eps from the data, the clustering's signals and the k-NN backends."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_core.clustering import (
    Clustering,
    choose_eps,
    cluster_features,
    fuse_features,
    jaccard_graph,
)
from reid_core.clustering import knn as knn_module
from reid_core.clustering.knn import nearest_neighbours
from reid_core.evaluation.rerank import k_reciprocal_jaccard


def dense_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """The re-ranking module's steps 1-5, written out with Python sets on a dense matrix."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    d = 1.0 - x @ x.T
    d = d / d.max(axis=1, keepdims=True)
    ranked = []
    for i in range(n):
        row = d[i].copy()
        row[i] = -np.inf
        ranked.append(np.argsort(row, kind="stable"))

    def near(i: int, k: int) -> list[int]:
        return list(ranked[i][: k + 1])

    def recip(i: int, k: int) -> set[int]:
        return {j for j in near(i, k) if i in near(j, k)}

    half = round(k1 / 2)
    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        expanded = set(r)
        for c in r:
            rc = recip(c, half)
            if 3 * len(r & rc) > 2 * len(rc):
                expanded |= rc
        cols = sorted(expanded)
        w = np.exp(-d[i, cols])
        v[i, cols] = w / w.sum()
    v = np.stack([v[near(i, k2 - 1)[:k2]].mean(axis=0) for i in range(n)])
    mins = np.minimum(v[:, None, :], v[None, :, :]).sum(axis=2)
    maxs = np.maximum(v[:, None, :], v[None, :, :]).sum(axis=2)
    return 1.0 - mins / maxs


def blobs(seed: int = 0, centres: int = 4, per: int = 6, dim: int = 8, spread: float = 0.15):
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centres, dim, generator=g), dim=1)
    x = c.repeat_interleave(per, 0) + spread * torch.randn(centres * per, dim, generator=g)
    return x, np.repeat(np.arange(centres), per)


@pytest.mark.parametrize(("k1", "k2"), [(5, 3), (8, 1), (12, 6)])
def test_sparse_jaccard_equals_the_brute_force_reference(k1: int, k2: int) -> None:
    x, _ = blobs(seed=k1)
    rows, cols, dist = k_reciprocal_jaccard(x, k1=k1, k2=k2)
    reference = dense_jaccard(x.numpy().astype(np.float64), k1, k2)
    sparse = np.ones_like(reference)
    sparse[rows, cols] = dist
    np.testing.assert_allclose(sparse, np.minimum(reference, 1.0), atol=1e-5)
    assert (dist[rows == cols] <= 1e-6).all()  # self pairs kept, at distance 0


def test_precomputed_knn_gives_the_same_jaccard() -> None:
    x, _ = blobs(seed=3)
    found = nearest_neighbours(x, 11, "faiss")
    assert found is not None and (found.ids[:, 0] == np.arange(len(x))).all()
    unit = torch.nn.functional.normalize(x, dim=1)
    farthest = (1.0 - unit @ unit.T).max(dim=1).values.numpy()
    np.testing.assert_allclose(found.row_max, farthest, atol=1e-5)
    a = jaccard_graph(x, 8, 3).toarray()
    b = jaccard_graph(x, 8, 3, found).toarray()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert nearest_neighbours(x, 11, "exact") is None  # the re-ranking code searches itself


def test_faiss_gpu_failure_falls_back_to_the_cpu_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = knn_module.build_index

    def gpu_fails(features, metric, use_gpu=None):  # type: ignore[no-untyped-def]
        if use_gpu is not False:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return real(features, metric, use_gpu=False)

    monkeypatch.setattr(knn_module, "build_index", gpu_fails)
    x, _ = blobs()
    with caplog.at_level(logging.WARNING, logger="reid_core.clustering.knn"):
        found = nearest_neighbours(x, 5, "faiss")
    assert found is not None and found.ids.shape == (len(x), 5)
    assert "searching on the CPU instead" in caplog.text and "simulated" in caplog.text


def test_dbscan_recovers_separated_blobs_and_reports_the_signals() -> None:
    x, truth = blobs(spread=0.05)
    cameras = np.tile([0, 1], len(truth) // 2)
    c = cluster_features(x, cameras, k1=6, k2=2, eps=0.5, min_samples=3, camera_centred=False)
    assert c.degenerate is None
    assert c.num_clusters == 4
    for k in range(4):  # each blob is one cluster
        assert len(set(c.labels[truth == k].tolist())) == 1
    s = c.stats
    assert s.outlier_fraction == 0.0 and s.multi_camera_fraction == 1.0 and s.mean_size == 6
    assert s.largest_fraction == pytest.approx(0.25) and s.adjusted_rand is None
    again = cluster_features(
        x, cameras, k1=6, k2=2, eps=0.5, min_samples=3, camera_centred=False, previous=c.labels
    )
    assert again.stats.adjusted_rand == pytest.approx(1.0)
    assert c.stats.as_metrics()["cluster/clusters"] == 4.0


def test_per_camera_clusters_never_cross_cameras() -> None:
    x, truth = blobs(spread=0.05)
    cameras = np.tile([0, 1], len(truth) // 2)
    c = cluster_features(
        x, cameras, k1=3, k2=1, eps=0.6, min_samples=2, camera_centred=False, scope="per_camera"
    )
    assert c.num_clusters == 8  # each blob split into its two cameras
    for k in range(c.num_clusters):
        assert len(set(cameras[c.labels == k].tolist())) == 1
    assert c.stats.multi_camera_fraction == 0.0


def test_outliers_as_instances_and_degenerate_clusterings() -> None:
    x, _ = blobs(spread=0.05, dim=64)
    far = F.normalize(torch.randn(3, x.shape[1], generator=torch.Generator().manual_seed(9)), dim=1)
    x = torch.cat([x, far])  # three lone directions, nearly orthogonal to everything
    cameras = np.zeros(len(x), dtype=np.int64)
    kept = cluster_features(x, cameras, k1=6, k2=1, eps=0.2, min_samples=3, camera_centred=False)
    assert (kept.labels[-3:] == -1).all()
    own = cluster_features(
        x, cameras, k1=6, k2=1, eps=0.2, min_samples=3, camera_centred=False, outliers="instances"
    )
    assert sorted(own.labels[-3:].tolist()) == [4, 5, 6] and own.num_clusters == 4
    none = cluster_features(x, cameras, k1=6, k2=2, eps=1e-9, min_samples=3, camera_centred=False)
    assert none.num_clusters == 0 and "no cluster" in (none.degenerate or "")
    giant = cluster_features(
        x,
        cameras,
        k1=20,
        k2=2,
        eps=0.99,
        min_samples=2,
        camera_centred=False,
        max_cluster_fraction=0.5,
    )
    assert "one cluster holds" in (giant.degenerate or "")


def test_eps_from_the_data_is_the_quantile_of_the_k_distance() -> None:
    x, _ = blobs(spread=0.05)
    graph = jaccard_graph(x, 6, 2)
    kth = []
    for i in range(graph.shape[0]):
        row = graph.getrow(i)
        others = np.sort(row.data[row.indices != i])
        kth.append(others[2] if len(others) >= 3 else 1.0)
    assert choose_eps(graph, 4, 0.5) == pytest.approx(float(np.quantile(kth, 0.5)))
    c = cluster_features(
        x, np.zeros(len(x)), k1=6, k2=2, eps="auto", min_samples=4, camera_centred=False
    )
    assert c.stats.eps == pytest.approx(
        choose_eps(jaccard_graph(F.normalize(x, dim=1), 6, 2), 4, 0.5)
    )


def test_auto_backend_uses_faiss_only_where_it_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = blobs(seed=4)
    monkeypatch.setattr(knn_module, "faiss_sees_gpu", lambda: False)
    assert nearest_neighbours(x, 6, "auto") is None  # one exact pass finds ids and maxima
    monkeypatch.setattr(knn_module, "faiss_sees_gpu", lambda: True)  # a CPU index stands in
    found = nearest_neighbours(x, 6, "auto")
    assert found is not None and found.ids.shape == (len(x), 6)


def test_fused_features_weigh_each_part_cosine() -> None:
    rng = np.random.default_rng(0)
    a, b = (
        torch.from_numpy(rng.standard_normal((12, 5))),
        torch.from_numpy(rng.standard_normal((12, 3))),
    )
    cams = np.tile([0, 1, 2], 4)
    fused = fuse_features([(a, 1.0), (b, 2.0), (b, 0.0)], cams, camera_centred=False)
    assert fused.shape == (12, 8)  # a part of weight 0 is left out
    cos = F.normalize(fused, dim=1) @ F.normalize(fused, dim=1).T
    ca, cb = (F.normalize(x.float(), dim=1) @ F.normalize(x.float(), dim=1).T for x in (a, b))
    torch.testing.assert_close(cos, (ca + 4 * cb) / 5, atol=1e-5, rtol=0)
    centred = fuse_features([(a, 1.0), (b, 1.0)], cams)
    for c in range(3):  # each part's camera mean removed before the weighting
        assert centred[cams == c, :5].mean(0).abs().max() < 0.2
    with pytest.raises(ValueError, match="positive weight"):
        fuse_features([(a, 0.0)], cams)


def test_colour_weight_clusters_the_model_with_the_colour_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Uninformative network features beside informative colour: the fused clustering finds
    the colour's groups, the network's alone finds none of them."""
    from sklearn.metrics import adjusted_rand_score

    from reid_core.clustering import labeller as labeller_module
    from reid_core.config import load_config

    x, truth = blobs(spread=0.05)
    noise = torch.from_numpy(np.random.default_rng(1).standard_normal((len(truth), 16)))
    cams = np.tile([0, 1], len(truth) // 2)
    seen: dict[str, torch.Tensor] = {}
    real = labeller_module.cluster_features

    def spy(basis: torch.Tensor, cameras: np.ndarray, **kwargs: object) -> Clustering:
        seen["basis"] = basis
        return real(basis, cameras, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(labeller_module, "cluster_features", spy)
    labeller = labeller_module.PseudoLabeller.__new__(labeller_module.PseudoLabeller)
    labeller.cameras = cams
    labeller._colour = x.float()
    labeller.features = lambda model, step=None: noise.float()  # type: ignore[method-assign]
    settings = "cluster.k1=6 cluster.k2=2 cluster.eps=0.5 cluster.min_samples=3"
    for weight, groups in ((0.0, None), (3.0, 4)):
        labeller.cfg = load_config(
            None,
            [*settings.split(), "cluster.camera_centred=false", f"cluster.colour_weight={weight}"],
        )
        _, clustering = labeller(torch.nn.Identity(), epoch=1)
        if groups is None:
            assert seen["basis"].shape[1] == 16
            assert adjusted_rand_score(truth, clustering.labels) < 0.5
        else:
            assert seen["basis"].shape[1] == 16 + x.shape[1]
            assert clustering.num_clusters == groups
            for k in range(groups):
                assert len(set(clustering.labels[truth == k].tolist())) == 1
