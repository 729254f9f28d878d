"""Networks: backbone registry, global head, patch generation module, patch heads."""

from reid_core.models.backbones import (
    BACKBONES,
    PretrainedWeightsNotFoundError,
    build_backbone,
    register_backbone,
)
from reid_core.models.patch_generation import PatchGenerationModule, stripe_thetas
from reid_core.models.reid_model import ReIDModel, ReIDOutput

__all__ = [
    "BACKBONES",
    "PatchGenerationModule",
    "PretrainedWeightsNotFoundError",
    "ReIDModel",
    "ReIDOutput",
    "build_backbone",
    "register_backbone",
    "stripe_thetas",
]
