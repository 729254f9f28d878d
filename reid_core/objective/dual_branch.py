"""The method's objective: memories plus the four loss terms, combined as

    L = w_E L_E + w_GSL L_GSL + w_PEDAL L_PEDAL + w_IPFL L_IPFL      (defaults 1, 1, 2, 1)

Memories (one slot per training image, identical on every rank):
  * global memory M (N, d):         after each step, M_i <- a M_i + (1 - a) f_i, renormalised,
                                    f_i = normalised mean of the two views' global features;
                                    a = momentum_at(epoch) grows with the epoch;
  * patch memory m (N, P, D):       before the loss, from view 0, momentum 0.1 (new-value weight);
  * agents A (N, E):                before the loss, mean of the two views' IPFL embeddings,
                                    momentum 0.1 (new-value weight).

Global losses apply to both views' features; PEDAL to view 0's patch features (as PAUL does);
IPFL to both views' embeddings. GSL starts after ``loss.gsl.warmup_epochs`` (or at once with a
neighbour prior, ``loss.prior``, which gives the credible sets of its first ``loss.gsl.prior_epochs``
epochs; the same for PEDAL's neighbours with ``loss.pedal.prior_epochs``), PEDAL after
``loss.pedal.warmup_epochs`` and IPFL after ``loss.ipfl.warmup_epochs`` (before that a term is a 0
still connected to the graph, and its memory is updated all the same).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from reid_core.config import ExperimentConfig
from reid_core.distributed import all_gather_cat, get_world_size, is_main_process
from reid_core.evaluation import centre_per_camera
from reid_core.models.reid_model import ReIDModel, ReIDOutput
from reid_core.objective.cluster_branch import ClusterContrastBranch
from reid_core.objective.losses import (
    IPFLLoss,
    MemoryClassifierLoss,
    PEDALLoss,
    credible_neighbour_lists,
    nearest_other_rows,
)
from reid_core.objective.memory import FeatureMemory, momentum_at

__all__ = ["DualBranchObjective", "split_views"]

log = logging.getLogger(__name__)


def split_views(out: ReIDOutput) -> tuple[ReIDOutput, ReIDOutput]:
    """Split a forward pass over ``cat([view0, view1])`` into the two views' outputs."""

    def halves(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if t is None:
            return None, None
        a, b = t.chunk(2, dim=0)
        return a, b

    g0, g1 = out.global_features.chunk(2, dim=0)
    p0, p1 = halves(out.patch_features)
    e0, e1 = halves(out.embeddings)
    return ReIDOutput(g0, p0, e0), ReIDOutput(g1, p1, e1)


class DualBranchObjective(nn.Module):
    """Holds the memories and computes the weighted loss terms; see the module docstring."""

    slot_cameras: torch.Tensor  # (N,) camera of each training image, -1 unknown
    prior_neighbours: torch.Tensor  # (N, k) GSL's credible sets from the prior, -1 padded
    prior_similarities: torch.Tensor  # (N, k) their prior similarities
    prior_patch_neighbours: torch.Tensor  # (N, P, k) PEDAL's K_i^p from the prior, no padding

    def __init__(
        self,
        cfg: ExperimentConfig,
        num_images: int,
        model: ReIDModel,
        cameras: Sequence[int] | None = None,
    ) -> None:
        """``cameras``: the camera of each training image (-1 unknown), in memory-slot order;
        read by the camera-aware options (``loss.instance.negatives``, ``loss.gsl.neighbours``)."""
        super().__init__()
        self.cfg = cfg
        if cameras is None:
            cameras = [-1] * num_images
        if len(cameras) != num_images:
            raise ValueError(f"{len(cameras)} cameras given for {num_images} training images")
        # derived from the data, so not part of a checkpoint
        self.register_buffer(
            "slot_cameras", torch.as_tensor(list(cameras), dtype=torch.long), persistent=False
        )
        # recomputed from the images by set_neighbour_prior when a run needs them
        self.register_buffer(
            "prior_neighbours", torch.empty((0, 0), dtype=torch.long), persistent=False
        )
        self.register_buffer("prior_similarities", torch.empty((0, 0)), persistent=False)
        self.register_buffer(
            "prior_patch_neighbours", torch.empty((0, 0, 0), dtype=torch.long), persistent=False
        )
        loss = cfg.loss
        self.global_memory: FeatureMemory | None = None
        self.patch_memory: FeatureMemory | None = None
        self.agents: FeatureMemory | None = None
        self.classifier: MemoryClassifierLoss | None = None
        self.pedal: PEDALLoss | None = None
        self.ipfl: IPFLLoss | None = None
        self.clusters: ClusterContrastBranch | None = None
        if loss.clusters:
            self.clusters = ClusterContrastBranch(loss, num_images, model.global_dim, cameras)
        elif loss.global_branch:
            self.global_memory = FeatureMemory(num_images, model.global_dim)
            self.classifier = MemoryClassifierLoss(loss.instance, loss.gsl)
        if loss.patch_branch and not model.with_patch_branch:
            raise ValueError("patch losses are enabled but the model was built without patches")
        if loss.pedal.enabled:
            self.patch_memory = FeatureMemory(
                num_images, (model.cfg.num_patches, model.cfg.patch_dim)
            )
            self.pedal = PEDALLoss(loss.pedal)
        if loss.ipfl.enabled:
            self.agents = FeatureMemory(
                num_images, model.cfg.num_patches * model.cfg.ipfl_dim, normalize=False
            )
            self.ipfl = IPFLLoss(loss.ipfl)

    @property
    def patch_branch_losses(self) -> bool:
        return self.pedal is not None or self.ipfl is not None

    # -- memory initialisation -------------------------------------------------------------

    @torch.no_grad()
    def initialise(self, model: ReIDModel, loader: DataLoader[Any], device: torch.device) -> None:
        """Fill every memory from one forward pass over the training images (``memory.init``).

        ``loader`` yields ``(images, indices)`` over this rank's share; results are gathered so
        every rank holds the full, identical memories. With ``memory.init=zeros`` the global
        memory stays zero (its slots take the first feature they see).
        """
        fills_global = self.global_memory is not None and self.cfg.memory.init == "forward"
        if not (fills_global or self.patch_memory is not None or self.agents is not None):
            return  # nothing to fill (cluster contrast without a patch branch)
        was_training = model.training
        model.eval()
        batches = tqdm(
            loader,
            desc="memory init",
            disable=not (self.cfg.runtime.progress_bar and is_main_process()),
            leave=False,
        )
        seen = 0
        for images, indices in batches:
            out = model(images.to(device))
            idx = all_gather_cat(indices.to(device))
            seen += len(idx)
            if fills_global:
                assert self.global_memory is not None
                self.global_memory.set(idx, all_gather_cat(out.global_features.float()))
            if self.patch_memory is not None and out.patch_features is not None:
                self.patch_memory.set(idx, all_gather_cat(out.patch_features.float()))
            if self.agents is not None and out.embeddings is not None:
                self.agents.set(idx, all_gather_cat(out.embeddings.float()))
        model.train(was_training)
        log.info("memories initialised from %d images (%d ranks)", seen, get_world_size())

    @torch.no_grad()
    def set_neighbour_prior(self, descriptors: torch.Tensor) -> None:
        """The prior's neighbours (``loss.prior``) from hand-crafted ``descriptors`` (N, P, D)
        of the training images, in memory-slot order, one row per horizontal stripe
        (P = ``model.num_patches``).

        * GSL: the stripes concatenated, each camera's mean removed
          (:func:`reid_core.evaluation.centre_per_camera`), then the mutual top-k rule of
          :func:`reid_core.objective.losses.credible_neighbour_lists` with ``loss.prior.topk`` and
          ``loss.prior.threshold`` (among other cameras only with
          ``loss.gsl.neighbours=other_cameras``).
        * PEDAL: for each stripe p, centred the same way, the ``loss.pedal.neighbours`` most
          similar other images (K_i^p, :func:`reid_core.objective.losses.nearest_other_rows`): always
          that many (at most N - 1), whatever their similarity, so no padding.
        """
        num_slots = len(self.slot_cameras)
        if descriptors.dim() != 3 or descriptors.shape[0] != num_slots:
            raise ValueError(
                f"descriptors of shape {tuple(descriptors.shape)} for {num_slots} training "
                "images: expected (N, stripes, D)"
            )
        loss = self.cfg.loss
        cams = self.slot_cameras
        descriptors = descriptors.to(cams.device).float()
        if loss.gsl_on and loss.gsl.prior_epochs > 0:
            centred = centre_per_camera(descriptors.flatten(1), cams)
            other_cameras = loss.gsl.neighbours == "other_cameras"
            neighbours, similarities = credible_neighbour_lists(
                centred,
                loss.prior.threshold,
                loss.prior.topk,
                mutual=True,
                slot_cameras=cams if other_cameras else None,
            )
            self.prior_neighbours, self.prior_similarities = neighbours, similarities
            sizes = (neighbours >= 0).sum(dim=1)
            log.info(
                "GSL prior (%s): %.2f credible neighbours per image, %.1f%% of images have one",
                loss.prior.kind,
                float(sizes.float().mean()),
                100.0 * float((sizes > 0).float().mean()),
            )
        if self.pedal is not None and loss.pedal.prior_epochs > 0:
            if (
                self.patch_memory is None
                or descriptors.shape[1] != self.patch_memory.feature_shape[0]
            ):
                raise ValueError(
                    f"PEDAL's prior needs one descriptor per patch, got {descriptors.shape[1]} "
                    f"stripes for {self.cfg.model.num_patches} patches"
                )
            per_stripe = [
                nearest_other_rows(
                    centre_per_camera(descriptors[:, p], cams), loss.pedal.neighbours
                )
                for p in range(descriptors.shape[1])
            ]
            self.prior_patch_neighbours = torch.stack(per_stripe, dim=1)  # (N, P, k)
            log.info(
                "PEDAL prior (%s): %d neighbours per patch", loss.prior.kind, per_stripe[0].shape[1]
            )

    def _prior_rows(self, table: torch.Tensor, indices: torch.Tensor, key: str) -> torch.Tensor:
        """Rows ``indices`` of a prior ``table`` (one row per slot) that the setting ``key``
        (e.g. ``loss.gsl.prior_epochs``) asks for; refused while the prior is not set."""
        if table.shape[0] != len(self.slot_cameras):
            value = functools.reduce(getattr, key.split("."), self.cfg)
            raise RuntimeError(
                f"{key}={value} with loss.prior.kind={self.cfg.loss.prior.kind!r}, but the "
                "prior's neighbours are not set: call set_neighbour_prior(descriptors) before "
                "the loss (NeighbourPriorHook does it in training)"
            )
        return table[indices.to(table.device)]

    # -- loss ------------------------------------------------------------------------------

    def forward(
        self, out0: ReIDOutput, out1: ReIDOutput, indices: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms and their sum under ``"total"``."""
        loss_cfg = self.cfg.loss
        terms: dict[str, torch.Tensor] = {}
        both = torch.cat([indices, indices])
        # every rank's indices, gathered once for the memory updates below
        all_indices = all_gather_cat(indices) if self.patch_branch_losses else None
        if self.classifier is not None and self.global_memory is not None:
            feats = torch.cat([out0.global_features, out1.global_features]).float()
            prior = None
            if loss_cfg.gsl_uses_prior(epoch):
                key = "loss.gsl.prior_epochs"
                prior = (
                    self._prior_rows(self.prior_neighbours, both, key),
                    self._prior_rows(self.prior_similarities, both, key),
                )
            g = self.classifier(
                feats,
                both,
                self.global_memory.bank,
                use_gsl=loss_cfg.gsl_active(epoch),
                slot_cameras=self.slot_cameras,
                prior=prior,
            )
            if loss_cfg.instance.enabled:
                terms["instance"] = loss_cfg.instance.weight * g["instance"]
            if loss_cfg.gsl.enabled:
                terms["gsl"] = loss_cfg.gsl.weight * g["gsl"]
        if self.clusters is not None:
            feats = torch.cat([out0.global_features, out1.global_features]).float()
            terms.update(self.clusters(feats, both, epoch))
        if self.pedal is not None and self.patch_memory is not None:
            assert out0.patch_features is not None and out1.patch_features is not None
            assert all_indices is not None
            self.patch_memory.update(
                all_indices,
                all_gather_cat(out0.patch_features.float()),
                keep=1.0 - loss_cfg.pedal.memory_momentum,
            )
            if loss_cfg.pedal_active(epoch):
                near = (
                    self._prior_rows(
                        self.prior_patch_neighbours, indices, "loss.pedal.prior_epochs"
                    )
                    if loss_cfg.pedal_uses_prior(epoch)
                    else None
                )
                terms["pedal"] = loss_cfg.pedal.weight * self.pedal(
                    out0.patch_features.float(), indices, self.patch_memory.bank, neighbours=near
                )
            else:
                terms["pedal"] = out0.patch_features.float().sum() * 0.0
        if self.ipfl is not None and self.agents is not None:
            assert out0.embeddings is not None and out1.embeddings is not None
            e0, e1 = out0.embeddings.float(), out1.embeddings.float()
            assert all_indices is not None
            self.agents.update(
                all_indices,
                all_gather_cat((e0 + e1) / 2),
                keep=1.0 - loss_cfg.ipfl.agent_momentum,
            )
            if epoch >= loss_cfg.ipfl.warmup_epochs:
                labels = None
                if loss_cfg.ipfl.negatives == "other_clusters":
                    assert self.clusters is not None
                    labels = self.clusters.labels[indices.to(self.clusters.labels.device)]
                terms["ipfl"] = loss_cfg.ipfl.weight * self.ipfl(
                    torch.stack([e0, e1]), indices, self.agents.bank, labels=labels
                )
            else:
                terms["ipfl"] = (e0.sum() + e1.sum()) * 0.0
        if not terms:
            raise ValueError("no loss term is enabled")
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    @torch.no_grad()
    def after_step(
        self, out0: ReIDOutput, out1: ReIDOutput, indices: torch.Tensor, epoch: int
    ) -> None:
        """Global memory update with this step's features (gathered from every rank)."""
        if self.clusters is not None:
            feats = torch.cat([out0.global_features, out1.global_features]).float()
            self.clusters.update(
                all_gather_cat(feats), all_gather_cat(torch.cat([indices, indices]))
            )
        if self.global_memory is None:
            return
        mean = F.normalize(out0.global_features.float() + out1.global_features.float(), dim=1)
        keep = momentum_at(epoch, self.cfg.schedule.epochs, self.cfg.memory)
        self.global_memory.update(all_gather_cat(indices), all_gather_cat(mean), keep=keep)
