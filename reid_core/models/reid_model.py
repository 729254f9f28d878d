"""The dual-branch re-ID network: a shared trunk, a global head and a PAUL-style patch branch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from reid_core.config import ModelConfig
from reid_core.models.backbones import build_backbone
from reid_core.models.camera_norm import (
    CameraBatchNorm,
    camera_context,
    convert_to_camera_norm,
)
from reid_core.models.heads import GlobalHead, PatchEmbedding, PatchHeads
from reid_core.models.patch_generation import PatchGenerationModule

__all__ = ["ReIDModel", "ReIDOutput"]

FeatureKind = Literal["concat", "global"]


@dataclass
class ReIDOutput:
    global_features: torch.Tensor  # (B, d), L2-normalised
    patch_features: torch.Tensor | None  # (B, P, D), each row L2-normalised
    embeddings: torch.Tensor | None  # (B, P * E) IPFL embedding


class ReIDModel(nn.Module):
    """Trunk -> {global head, PGM -> patch heads -> IPFL embedding}.

    ``with_patch_branch=False`` (a global-only ablation) skips the patch branch entirely.
    The test feature is ``concat(f, f^1..f^P)`` with every block L2-normalised, or ``f`` alone.

    After :meth:`use_camera_norm` (``model.camera_norm``) the BatchNorm layers also keep
    statistics per training camera (:mod:`reid_core.models.camera_norm`), estimated by
    :meth:`calibrate_camera_norm`, and ``forward``/``extract`` take each image's camera id: in
    evaluation an image from a training camera is normalised with that camera's statistics, any
    other (camera -1, a new camera, or ``cameras=None``) with the ordinary ones. Training ignores
    the cameras unless ``per_camera_training`` (``model.camera_norm_train``): then each camera's
    images of a training batch go through the network together, normalised with their own batch
    statistics.
    """

    camera_ids: torch.Tensor | None  # (K,) the training cameras, in slot order

    def __init__(self, cfg: ModelConfig, with_patch_branch: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(
            cfg.backbone,
            last_stride=cfg.last_stride,
            pretrained=cfg.pretrained == "imagenet",
            weights_path=cfg.weights_path,
        )
        channels = self.backbone.out_channels
        self.global_head = GlobalHead(channels)
        self.with_patch_branch = with_patch_branch
        self.pgm: PatchGenerationModule | None = None
        self.patch_heads: PatchHeads | None = None
        self.patch_embedding: PatchEmbedding | None = None
        if with_patch_branch:
            self.pgm = PatchGenerationModule(
                channels, cfg.num_patches, channels=cfg.pgm_channels, hidden=cfg.pgm_hidden
            )
            self.pgm.requires_grad_(cfg.pgm_trainable)
            self.patch_heads = PatchHeads(channels, cfg.num_patches, cfg.patch_dim)
            self.patch_embedding = PatchEmbedding(cfg.num_patches, cfg.patch_dim, cfg.ipfl_dim)
        self.register_buffer("camera_ids", None)  # set by use_camera_norm
        self.per_camera_training = False  # set by use_camera_norm

    @property
    def global_dim(self) -> int:
        return self.backbone.out_channels

    def feature_dim(self, feature: FeatureKind = "concat") -> int:
        if feature == "global" or not self.with_patch_branch:
            return self.global_dim
        return self.global_dim + self.cfg.num_patches * self.cfg.patch_dim

    def train(self, mode: bool = True) -> ReIDModel:
        super().train(mode)
        if self.pgm is not None and not self.cfg.pgm_trainable:
            self.pgm.eval()  # a frozen PGM keeps its BatchNorm statistics too
        return self

    def new_layers(self) -> list[nn.Parameter]:
        """Parameters that are not the trunk's (they get the higher learning rate)."""
        trunk = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in trunk and p.requires_grad]

    def use_camera_norm(self, camera_ids: Sequence[int], in_training: bool = False) -> None:
        """Give every trained BatchNorm layer statistics per camera of ``camera_ids`` (the
        training cameras); a frozen patch generation module keeps its fixed statistics. With
        ``in_training``, training batches are normalised per camera too (see the class
        docstring).

        Convert before building an optimiser (the layers' parameters are new objects)."""
        if self.camera_ids is not None:
            raise RuntimeError("the model already has camera normalisation")
        ids = sorted({int(c) for c in camera_ids})
        if not ids or ids[0] < 0:
            raise ValueError(
                f"camera normalisation needs known training cameras (ids >= 0), got {ids[:8]}"
            )
        frozen = self.pgm if self.pgm is not None and not self.cfg.pgm_trainable else None
        for child in self.children():
            if child is not frozen:
                convert_to_camera_norm(child, len(ids))
        device = next(self.parameters()).device
        self.camera_ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.per_camera_training = in_training

    def camera_slots(self, cameras: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(B,) slot of each camera id among the training cameras, -1 for any other."""
        if self.camera_ids is None:
            raise RuntimeError("the model has no camera normalisation (model.camera_norm)")
        cams = torch.as_tensor(cameras, dtype=torch.long, device=self.camera_ids.device)
        match = cams[:, None] == self.camera_ids[None, :]
        return torch.where(match.any(dim=1), match.long().argmax(dim=1), -1)

    def _camera_groups(
        self, images: torch.Tensor, cameras: torch.Tensor | Sequence[int]
    ) -> list[tuple[int, torch.Tensor]]:
        """``(slot, rows)`` for each camera slot among the images (-1: other cameras)."""
        slots = self.camera_slots(cameras).to(images.device)
        if len(slots) != len(images):
            raise ValueError(f"{len(slots)} cameras given for {len(images)} images")
        return [(slot, (slots == slot).nonzero().squeeze(1)) for slot in slots.unique().tolist()]

    @torch.no_grad()
    def calibrate_camera_norm(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | Sequence[int]]]
    ) -> dict[int, int]:
        """Estimate every training camera's statistics from ``batches`` of ``(images, camera
        ids)``, the weights and the ordinary statistics untouched; returns the number of images
        used per camera id.

        Each batch's images of one training camera go through the network in training mode,
        and every layer averages their batch statistics over that camera's batches. Batches of
        one camera give the best estimates; a camera's single image in a batch, and images of
        other cameras, are left out. A camera with no image keeps the ordinary statistics.
        """
        if self.camera_ids is None:
            raise RuntimeError("the model has no camera normalisation (model.camera_norm)")
        norms = [m for m in self.modules() if isinstance(m, CameraBatchNorm)]
        ids = self.camera_ids.tolist()
        used = dict.fromkeys(ids, 0)
        was_training = self.training
        for norm in norms:
            norm.start_calibration()
        self.train()
        try:
            for images, cameras in batches:
                for slot, rows in self._camera_groups(images, cameras):
                    if slot < 0 or len(rows) < 2:  # one image has no batch statistics
                        continue
                    with camera_context(self, slot):
                        self._forward(images[rows])
                    used[ids[slot]] += len(rows)
        finally:
            for norm in norms:
                norm.end_calibration()
            self.train(was_training)
        return used

    def forward(
        self, images: torch.Tensor, cameras: torch.Tensor | Sequence[int] | None = None
    ) -> ReIDOutput:
        """``cameras`` (B,): each image's camera id, read in evaluation by a model with camera
        normalisation, and in training by one with ``per_camera_training``."""
        if self.camera_ids is None or cameras is None:
            return self._forward(images)
        if self.training and not self.per_camera_training:
            return self._forward(images)
        parts: list[tuple[torch.Tensor, ReIDOutput]] = []
        for slot, rows in self._camera_groups(images, cameras):
            # in training every group is normalised with its own batch statistics
            selected = None if self.training or slot < 0 else slot
            with camera_context(self, selected):
                parts.append((rows, self._forward(images[rows])))
        if len(parts) == 1:
            return parts[0][1]
        return _merge(parts, len(images))

    def _forward(self, images: torch.Tensor) -> ReIDOutput:
        feature_map = self.backbone(images)
        global_features = self.global_head(feature_map)
        if not self.with_patch_branch:
            return ReIDOutput(global_features, None, None)
        assert self.pgm is not None and self.patch_heads is not None
        assert self.patch_embedding is not None
        patch_features = self.patch_heads(self.pgm(feature_map))
        return ReIDOutput(global_features, patch_features, self.patch_embedding(patch_features))

    @torch.no_grad()
    def extract(
        self,
        images: torch.Tensor,
        feature: FeatureKind = "concat",
        cameras: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Test features, (B, D): see the class docstring."""
        out = self.forward(images, cameras)
        if feature == "global" or out.patch_features is None:
            return out.global_features.float()
        blocks = [out.global_features, *out.patch_features.unbind(dim=1)]
        return torch.cat([F.normalize(b.float(), dim=1) for b in blocks], dim=1)


def _merge(parts: Sequence[tuple[torch.Tensor, ReIDOutput]], batch_size: int) -> ReIDOutput:
    """One output for the whole batch from outputs of its row subsets (``rows``, output)."""

    def field(name: str) -> torch.Tensor | None:
        values = [(rows, getattr(out, name)) for rows, out in parts]
        if values[0][1] is None:
            return None
        first = values[0][1]
        merged = first.new_empty((batch_size, *first.shape[1:]))
        for rows, value in values:
            merged = merged.index_copy(0, rows, value)
        return merged

    global_features = field("global_features")
    assert global_features is not None
    return ReIDOutput(global_features, field("patch_features"), field("embeddings"))
