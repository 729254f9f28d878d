"""Cluster memory, camera proxies and the cluster sampler, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_core.data.samplers import ClusterSampler
from reid_core.objective.losses.camera_proxy import CameraProxyMemory
from reid_core.objective.losses.cluster_contrast import ClusterMemory, cluster_centroids


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_centroids_are_normalised_cluster_means_ignoring_outliers() -> None:
    f = unit([1, 0], [0, 1], [1, 1], [-1, 0])
    c = cluster_centroids(f, torch.tensor([0, 0, 1, -1]), 2)
    assert torch.allclose(c[0], unit([1, 1])[0])
    assert torch.allclose(c[1], unit([1, 1])[0])


def test_cluster_loss_hand_computed() -> None:
    memory = ClusterMemory(2, temperature=0.5)
    memory.reset(unit([1, 0], [0, 1]), torch.tensor([0, 1]))
    f = unit([1, 0])
    # logits f.m / tau = [2, 0]: -log(e^2 / (e^2 + 1))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert memory(f, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_cluster_loss_skips_outliers_and_memory_takes_no_gradient() -> None:
    memory = ClusterMemory(2, temperature=0.5)
    memory.reset(unit([1, 0], [0, 1]), torch.tensor([0, 1]))
    f = unit([1, 0], [0.3, 0.7]).requires_grad_(True)
    loss = memory(f, torch.tensor([0, -1]))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert f.grad is not None and torch.all(f.grad[1] == 0)
    assert not memory.centroids.requires_grad
    # only outliers: a zero still connected to the graph
    assert memory(f, torch.tensor([-1, -1])).item() == 0.0


def test_cluster_memory_momentum_update() -> None:
    memory = ClusterMemory(2, momentum=0.25)
    memory.reset(unit([1, 0], [0, 1]), torch.tensor([0, 1]))
    memory.update(unit([0, 1], [1, 0]), torch.tensor([0, -1]))
    # m_0 <- n(0.25 [1, 0] + 0.75 [0, 1]); m_1 untouched; the outlier updates nothing
    assert torch.allclose(memory.centroids[0], unit([0.25, 0.75])[0])
    assert torch.allclose(memory.centroids[1], torch.tensor([0.0, 1.0]))


def test_cluster_memory_hard_update_uses_the_least_similar_image() -> None:
    memory = ClusterMemory(2, momentum=0.0, update="hard")
    memory.reset(unit([1, 0]), torch.tensor([0]))
    memory.update(unit([1, 0.1], [0.2, 1]), torch.tensor([0, 0]))
    assert torch.allclose(memory.centroids[0], unit([0.2, 1])[0])


def test_resized_memory_loads_from_a_checkpoint_of_another_size() -> None:
    saved = ClusterMemory(2)
    saved.reset(unit([1, 0], [0, 1], [1, 1]), torch.tensor([0, 1, 2]))
    fresh = ClusterMemory(2)
    fresh.load_state_dict(saved.state_dict())
    assert torch.equal(fresh.centroids, saved.centroids)
    proxies = CameraProxyMemory(2)
    proxies.reset(unit([1, 0], [0, 1]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    other = CameraProxyMemory(2)
    other.load_state_dict(proxies.state_dict())
    assert torch.equal(other.lookup, proxies.lookup)


def camera_setup() -> CameraProxyMemory:
    # cluster 0 in cameras 0 and 1, cluster 1 in camera 0, cluster 2 in camera 1
    features = unit([1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1])
    labels = torch.tensor([0, 0, 1, 2])
    cameras = torch.tensor([0, 1, 0, 1])
    memory = CameraProxyMemory(3, temperature=1.0, hard_negatives=1)
    memory.reset(features, labels, cameras)
    return memory


def test_camera_proxies_one_per_cluster_and_camera() -> None:
    memory = camera_setup()
    assert memory.num_proxies == 4
    assert memory.proxy_cluster.tolist() == [0, 0, 1, 2]
    assert memory.proxy_camera.tolist() == [0, 1, 0, 1]
    assert memory.lookup.tolist() == [[0, 1], [2, -1], [-1, 3]]


def test_camera_proxy_losses_hand_computed() -> None:
    memory = camera_setup()
    f = unit([1, 0, 0])
    out = memory(f, torch.tensor([0]), torch.tensor([0]))
    p = memory.proxies
    s = (f @ p.T)[0]  # similarities to proxies (0,c0) (0,c1) (1,c0) (2,c1), temperature 1
    # intra: own camera 0's proxies are (0,c0) and (1,c0)
    intra = -(s[0] - torch.logsumexp(s[[0, 2]], 0))
    # inter: positives (0,c0), (0,c1); the one hardest negative of {(1,c0), (2,c1)}: both have
    # similarity 0 to f, topk picks one; the denominator is over positives + that negative
    denominator = torch.logsumexp(torch.stack([s[0], s[1], s[2]]), 0)
    inter = -((s[0] - denominator) + (s[1] - denominator)) / 2
    assert out["intra"].item() == pytest.approx(intra.item(), rel=1e-5)
    assert out["inter"].item() == pytest.approx(inter.item(), rel=1e-5)


def test_camera_proxy_update_moves_only_the_images_own_proxy() -> None:
    memory = camera_setup()
    before = memory.proxies.clone()
    memory.momentum = 0.5
    memory.update(unit([0, 1, 0]), torch.tensor([0]), torch.tensor([1]))
    assert torch.allclose(
        memory.proxies[1], F.normalize(0.5 * before[1] + 0.5 * unit([0, 1, 0])[0], dim=0)
    )
    assert torch.equal(memory.proxies[[0, 2, 3]], before[[0, 2, 3]])


def test_cluster_sampler_batches_of_whole_clusters_across_cameras() -> None:
    labels = np.array([0] * 6 + [1] * 3 + [2] * 5 + [-1] * 2)
    cameras = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1])
    sampler = ClusterSampler(len(labels), batch_size=4, instances=2, seed=3)
    sampler.set_labels(labels, cameras)
    sampler.set_epoch(0)
    order = sampler.indices()
    assert len(order) == sampler.batches_per_epoch * 4 == 16
    for a in range(0, len(order), 2):
        pair = order[a : a + 2]
        assert labels[pair[0]] == labels[pair[1]] >= 0  # K images of one cluster, no outlier
        if labels[pair[0]] in (0, 2):  # clusters seen by both cameras give one image of each
            assert {cameras[i] for i in pair} == {0, 1}
    # deterministic per (seed, epoch), resumable by whole batches
    again = ClusterSampler(len(labels), batch_size=4, instances=2, seed=3)
    again.set_labels(labels, cameras)
    again.set_epoch(0, start_batch=2)
    assert list(again) == list(sampler)[8:]


def test_cluster_sampler_refuses_missing_or_empty_labels() -> None:
    sampler = ClusterSampler(8, batch_size=4, instances=2)
    with pytest.raises(RuntimeError, match="set_labels"):
        sampler.indices()
    with pytest.raises(ValueError, match="no image has a pseudo label"):
        sampler.set_labels(np.full(8, -1), np.zeros(8))
    with pytest.raises(ValueError, match="multiple of K"):
        ClusterSampler(8, batch_size=4, instances=3)
