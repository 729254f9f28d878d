"""Feature heads on top of the trunk.

Global head:   f   = L2norm(BN(GAP(X)))                                     (d = C)
Patch heads:   f^p = L2norm(BN_p(W_p GAP(patch_p))),  W_p: C -> D per patch  (conv1x1 == Linear)
IPFL embedding: e  = concat_p L2norm(U_p f^p),         U_p: D -> E_p per patch
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GlobalHead", "PatchEmbedding", "PatchHeads"]


class GlobalHead(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_channels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = feature_map.mean(dim=(2, 3))
        return F.normalize(self.bn(pooled.float()), dim=1)


class _PerPatchLinear(nn.Module):
    """P independent Linear layers applied at once (a grouped 1x1 convolution)."""

    def __init__(self, num_patches: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.proj = nn.Conv1d(num_patches * in_dim, num_patches * out_dim, 1, groups=num_patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, in) -> (B, P*out)
        b = x.shape[0]
        return self.proj(x.reshape(b, -1, 1)).squeeze(-1)


class PatchHeads(nn.Module):
    def __init__(self, in_channels: int, num_patches: int, dim: int) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.dim = dim
        self.reduce = _PerPatchLinear(num_patches, in_channels, dim)
        self.bn = nn.BatchNorm1d(num_patches * dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, C, h, w) patches -> (B, P, D) L2-normalised patch features."""
        b = patches.shape[0]
        pooled = patches.mean(dim=(3, 4)).float()
        reduced = self.bn(self.reduce(pooled)).view(b, self.num_patches, self.dim)
        return F.normalize(reduced, dim=2)


class PatchEmbedding(nn.Module):
    def __init__(self, num_patches: int, in_dim: int, dim: int) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.dim = dim
        self.project = _PerPatchLinear(num_patches, in_dim, dim)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, P * E) concatenation of per-patch normalised projections."""
        b = patch_features.shape[0]
        e = self.project(patch_features).view(b, self.num_patches, self.dim)
        return F.normalize(e, dim=2).reshape(b, -1)
