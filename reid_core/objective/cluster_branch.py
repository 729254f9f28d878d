"""The global branch of ``loss.objective=cluster_contrast``: pseudo labels and the memories over
them, beside the patch branch of :class:`reid_core.objective.dual_branch.DualBranchObjective`.

    L_global = w_cc L_cc  [+ w_intra L_intra + lambda L_inter   with loss.camera.enabled]

``L_cc``: :mod:`reid_core.objective.losses.cluster_contrast`; ``L_intra``, ``L_inter``:
:mod:`reid_core.objective.losses.camera_proxy` (``L_inter`` is 0 before ``loss.camera.inter_from_epoch``).
Both views' global features enter the loss and, after the step, the memory updates. The labels
(one per training image, -1 outside every cluster) are a checkpointed buffer; they and the
memories are replaced at every clustering by :meth:`ClusterContrastBranch.relabel`
(:class:`reid_core.engine.hooks.PseudoLabelHook`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from reid_core.config import LossConfig
from reid_core.objective.losses.camera_proxy import CameraProxyMemory
from reid_core.objective.losses.cluster_contrast import ClusterMemory

__all__ = ["ClusterContrastBranch"]


class ClusterContrastBranch(nn.Module):
    """Pseudo labels, the cluster memory and (optionally) the camera proxies."""

    labels: torch.Tensor  # (N,) pseudo label of each training image, -1 none
    slot_cameras: torch.Tensor  # (N,) camera of each training image

    def __init__(self, cfg: LossConfig, num_images: int, dim: int, cameras: Sequence[int]) -> None:
        super().__init__()
        self.cfg = cfg
        if len(cameras) != num_images:
            raise ValueError(f"{len(cameras)} cameras given for {num_images} training images")
        self.register_buffer("labels", torch.full((num_images,), -1, dtype=torch.long))
        self.register_buffer(
            "slot_cameras", torch.as_tensor(list(cameras), dtype=torch.long), persistent=False
        )
        c = cfg.cluster
        self.memory = ClusterMemory(dim, c.temperature, c.momentum, c.update)
        self.proxies: CameraProxyMemory | None = None
        if cfg.camera.enabled:
            p = cfg.camera
            self.proxies = CameraProxyMemory(dim, p.temperature, p.momentum, p.hard_negatives)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    @torch.no_grad()
    def relabel(self, features: torch.Tensor, labels: np.ndarray | torch.Tensor) -> None:
        """New pseudo ``labels`` (N,) and memories rebuilt from ``features`` (N, d)."""
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.labels.device)
        if labels.shape != self.labels.shape:
            raise ValueError(f"{labels.numel()} labels for {self.labels.numel()} training images")
        features = features.to(self.labels.device).float()
        self.labels = labels
        self.memory.reset(features, labels)
        if self.proxies is not None:
            self.proxies.reset(features, labels, self.slot_cameras)

    def forward(
        self, features: torch.Tensor, indices: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        """Unweighted-by-config terms, already weighted: ``cluster`` [, ``intra``, ``inter``]."""
        labels = self.labels[indices]
        terms = {"cluster": self.cfg.cluster.weight * self.memory(features, labels)}
        if self.proxies is not None:
            cams = self.slot_cameras[indices]
            camera_terms = self.proxies(features, labels, cams)
            terms["intra"] = self.cfg.camera.intra_weight * camera_terms["intra"]
            inter_on = epoch >= self.cfg.camera.inter_from_epoch
            terms["inter"] = camera_terms["inter"] * (
                self.cfg.camera.inter_weight if inter_on else 0.0
            )
        return terms

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        """The memories' momentum update with a step's (gathered) features."""
        labels = self.labels[indices]
        self.memory.update(features, labels)
        if self.proxies is not None:
            self.proxies.update(features, labels, self.slot_cameras[indices])
