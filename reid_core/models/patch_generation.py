"""Patch generation module (PGM): a spatial transformer that cuts P patches from the trunk's map.

    theta = Linear_2(ReLU(Linear_1(GAP(MaxPool(ReLU(BN(Conv3x3(X))))))))  in R^{P x 2 x 3}
    patch_p = grid_sample(X, affine_grid(theta_p))                       (align_corners=True)

Linear_2 starts with zero weights and a bias holding P affine matrices

    theta_p = [[1, 0, 0], [0, 1/P, t_p]],   t_p = -1 + (2p + 1)/P,  p = 0..P-1

so at initialisation the patches are P horizontal stripes (t_p in {-5/6, ..., 5/6} for P = 6).
In the unsupervised stage the module is frozen by default (``model.pgm_trainable``), so the patches
stay stripes unless a trained PGM is loaded or it is allowed to learn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchGenerationModule", "stripe_thetas"]


def stripe_thetas(num_patches: int) -> torch.Tensor:
    """The P affine matrices of horizontal stripes, shape (P, 2, 3)."""
    theta = torch.zeros(num_patches, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0 / num_patches
    theta[:, 1, 2] = torch.tensor([-1.0 + (2 * p + 1) / num_patches for p in range(num_patches)])
    return theta


class PatchGenerationModule(nn.Module):
    def __init__(
        self, in_channels: int, num_patches: int = 6, channels: int = 4096, hidden: int = 512
    ) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.localisation = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=0, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_patches * 6),
        )
        regressor = self.localisation[-1]
        assert isinstance(regressor, nn.Linear)
        nn.init.zeros_(regressor.weight)
        with torch.no_grad():
            regressor.bias.copy_(stripe_thetas(num_patches).flatten())

    def thetas(self, x: torch.Tensor) -> torch.Tensor:
        """Affine matrices per image and patch, shape (B, P, 2, 3)."""
        if x.shape[-2] < 3 or x.shape[-1] < 3:
            raise ValueError(
                f"the trunk's feature map {tuple(x.shape[-2:])} is smaller than the PGM's 3x3 "
                "convolution: use a larger input (data.height/data.width) or model.last_stride=1"
            )
        return self.localisation(x).view(-1, self.num_patches, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patches of the map ``x`` (B, C, H, W) -> (B, P, C, max(2, ceil(H/P)), W)."""
        b, c, h, w = x.shape
        p = self.num_patches
        theta = self.thetas(x).to(x.dtype)
        out_h = max(2, math.ceil(h / p))  # a one-row grid is ill-defined with align_corners
        grid = F.affine_grid(theta.reshape(b * p, 2, 3), [b * p, c, out_h, w], align_corners=True)
        source = x.unsqueeze(1).expand(b, p, c, h, w).reshape(b * p, c, h, w)
        patches = F.grid_sample(source, grid, align_corners=True)
        return patches.view(b, p, c, out_h, w)
