"""The dual-branch re-ID network: a shared trunk, a global head and a PAUL-style patch branch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from reid_core.config import ModelConfig
from reid_core.models.backbones import build_backbone
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
    """

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

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        feature_map = self.backbone(images)
        global_features = self.global_head(feature_map)
        if not self.with_patch_branch:
            return ReIDOutput(global_features, None, None)
        assert self.pgm is not None and self.patch_heads is not None
        assert self.patch_embedding is not None
        patch_features = self.patch_heads(self.pgm(feature_map))
        return ReIDOutput(global_features, patch_features, self.patch_embedding(patch_features))

    @torch.no_grad()
    def extract(self, images: torch.Tensor, feature: FeatureKind = "concat") -> torch.Tensor:
        """Test features, (B, D): see the class docstring."""
        out = self.forward(images)
        if feature == "global" or out.patch_features is None:
            return out.global_features.float()
        blocks = [out.global_features, *out.patch_features.unbind(dim=1)]
        return torch.cat([F.normalize(b.float(), dim=1) for b in blocks], dim=1)
