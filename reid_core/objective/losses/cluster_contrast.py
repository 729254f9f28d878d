r"""Cluster contrast (Dai et al., ACCV 2022): an InfoNCE over pseudo-identity centroids.

Symbols: ``f`` (d,) the L2-normalised global feature of an image, ``y`` its pseudo label in
``{0..K-1}`` (a cluster of :func:`reid_core.clustering.cluster_features`), ``m_k`` (d,) the
centroid of cluster ``k``, ``tau`` the temperature (``ClusterLossConfig.temperature``, 0.05)::

    m_k  = n( mean_{x: y(x) = k} f(x) )                        at every clustering
    L_cc = -log( exp(f . m_y / tau) / sum_{k=1..K} exp(f . m_k / tau) )
    m_y <- n( mu m_y + (1 - mu) f )                             after each step, per image

``n`` is the L2 normalisation and ``mu`` the weight of the old centroid
(``ClusterLossConfig.momentum``, 0.1-0.2 in the paper: the new feature dominates). With ``update = "hard"`` the step's update of cluster ``k`` uses, instead
of every image of ``k`` in the batch, only the one least similar to ``m_k`` (the paper's "hard"
variant). Images without a cluster (outliers, ``y = -1``) contribute nothing and update nothing.

The memory is a buffer read without gradient: gradients reach ``f`` only. The loss is returned
unweighted, averaged over the images that have a cluster.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from reid_core.objective.losses.resizable import ResizableBuffers

__all__ = ["ClusterMemory", "cluster_centroids"]


def cluster_centroids(
    features: torch.Tensor, labels: torch.Tensor, num_clusters: int
) -> torch.Tensor:
    """(K, d) normalised mean feature of each cluster ``0..K-1`` of ``labels`` (-1 ignored)."""
    if labels.shape != (features.shape[0],):
        raise ValueError(f"{labels.numel()} labels for {features.shape[0]} features")
    keep = labels >= 0
    sums = torch.zeros(
        (num_clusters, features.shape[1]), dtype=torch.float32, device=features.device
    )
    sums.index_add_(0, labels[keep], F.normalize(features[keep].float(), dim=1))
    return F.normalize(sums, dim=1)


class ClusterMemory(ResizableBuffers):
    """The centroids ``m`` (K, d) and ``L_cc``; see the module docstring."""

    centroids: torch.Tensor

    def __init__(
        self,
        dim: int,
        temperature: float = 0.05,
        momentum: float = 0.2,
        update: Literal["mean", "hard"] = "mean",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.temperature = temperature
        self.momentum = momentum
        self.update_rule = update
        self.register_buffer("centroids", torch.zeros((0, dim)))

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    @torch.no_grad()
    def reset(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Centroids anew from ``features`` (N, d) of the training images and their labels."""
        num = int(labels.max()) + 1 if labels.numel() and int(labels.max()) >= 0 else 0
        self.centroids = cluster_centroids(
            features.to(self.centroids.device), labels.to(self.centroids.device), num
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``L_cc`` of the batch ``features`` (B, d) with pseudo labels ``labels`` (B,)."""
        keep = labels >= 0
        if self.num_clusters == 0 or not bool(keep.any()):
            return features.float().sum() * 0.0
        logits = features[keep].float() @ self.centroids.T / self.temperature
        return F.cross_entropy(logits, labels[keep])

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Momentum update of the batch's clusters (every rank passes the same gathered batch)."""
        keep = labels >= 0
        feats, labs = F.normalize(features[keep].float(), dim=1), labels[keep]
        if self.update_rule == "hard":
            feats, labs = _least_similar_per_cluster(feats, labs, self.centroids)
        for f, y in zip(feats, labs.tolist(), strict=True):
            self.centroids[y] = F.normalize(
                self.momentum * self.centroids[y] + (1.0 - self.momentum) * f, dim=0
            )


def _least_similar_per_cluster(
    feats: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cluster in ``labels``, the one feature least similar to its centroid."""
    sim = (feats * centroids[labels]).sum(dim=1)
    chosen = []
    for y in labels.unique():
        rows = (labels == y).nonzero().squeeze(1)
        chosen.append(rows[sim[rows].argmin()])
    index = torch.stack(chosen)
    return feats[index], labels[index]
