"""Image transforms: two views per training image, one plain view for testing.

View 0 (plain): horizontal flip, resize to (height, width), to tensor, normalise.
View 1 (augmented): horizontal flip, a random crop keeping ``data.crop_area`` of the area with the
image's own aspect ratio (+-10%) resized to (height, width), a random rotation of up to
``data.rotation_degrees`` (corners filled with the mean colour), a colour jitter
(``data.color_jitter``), a grey-scale conversion with probability ``data.grayscale_probability``,
to tensor, normalise, a random erasing with probability ``data.erasing_probability`` (2-40% of the
area, filled with 0 = the mean colour). Both views flip independently. The crop and the rotation
work on the resized image, so the cost does not grow with the source resolution.

The training set (:class:`reid_core.data.loaders.TrainSet`) may then recolour view 1 as another
camera sees (``data.camera_style_probability``, :mod:`reid_core.data.camera_style`).

``data.augment_both_views``: view 0 is drawn from the same random augmentation as view 1 (two
independently augmented views, as contrastive learning uses) instead of the plain view.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from reid_core.config import DataConfig

__all__ = [
    "AspectPreservingRandomResizedCrop",
    "TwoViewTransform",
    "build_test_transform",
    "build_train_transform",
]


class AspectPreservingRandomResizedCrop(torch.nn.Module):
    """Random crop of ``scale`` (share of the area) with an aspect ratio within ``ratio_jitter``
    (a factor) of the input's own, resized to ``size`` = (height, width)."""

    def __init__(
        self,
        size: tuple[int, int],
        scale: tuple[float, float],
        ratio_jitter: float = 1.1,
        interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR,
    ) -> None:
        super().__init__()
        if ratio_jitter < 1.0:
            raise ValueError(f"ratio_jitter must be >= 1, got {ratio_jitter}")
        self.size = size
        self.scale = scale
        self.ratio_jitter = ratio_jitter
        self.interpolation = interpolation

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        width, height = TF.get_image_size(img)
        if self.scale[0] >= 1.0:  # keeping the whole area leaves nothing to choose
            return TF.resize(img, list(self.size), self.interpolation, antialias=True)
        own = width / max(1, height)
        ratio = (own / self.ratio_jitter, own * self.ratio_jitter)
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(ratio))
        return TF.resized_crop(
            img, top, left, h, w, list(self.size), self.interpolation, antialias=True
        )

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio_jitter={self.ratio_jitter}"


class TwoViewTransform:
    """``img -> (view0, view1)``: the plain and the augmented view of one image."""

    def __init__(
        self, view0: Callable[[Image.Image], torch.Tensor], view1: Callable[..., torch.Tensor]
    ):
        self.view0 = view0
        self.view1 = view1

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view0(img), self.view1(img)

    def __repr__(self) -> str:
        return f"TwoViewTransform(\n view0={self.view0},\n view1={self.view1}\n)"


def _fill(cfg: DataConfig) -> list[int]:
    return [round(255 * m) for m in cfg.mean]


def _to_normalised_tensor(cfg: DataConfig) -> list[Callable[..., torch.Tensor]]:
    return [T.ToTensor(), T.Normalize(mean=list(cfg.mean), std=list(cfg.std))]


def build_train_transform(cfg: DataConfig) -> TwoViewTransform:
    """The two-view training transform (see the module docstring)."""
    size = (cfg.height, cfg.width)
    brightness, contrast, saturation, hue = cfg.color_jitter
    view0 = T.Compose(
        [
            T.RandomHorizontalFlip(cfg.flip_probability),
            T.Resize(size, antialias=True),
            *_to_normalised_tensor(cfg),
        ]
    )
    augment: list[Callable[..., object]] = [
        T.RandomHorizontalFlip(cfg.flip_probability),
        AspectPreservingRandomResizedCrop(size, scale=cfg.crop_area),
    ]
    if cfg.rotation_degrees > 0:
        augment.append(T.RandomRotation(cfg.rotation_degrees, fill=_fill(cfg)))
    if any(v > 0 for v in cfg.color_jitter):
        augment.append(T.ColorJitter(brightness, contrast, saturation, hue))
    if cfg.grayscale_probability > 0:
        augment.append(T.RandomGrayscale(cfg.grayscale_probability))
    augment += _to_normalised_tensor(cfg)
    if cfg.erasing_probability > 0:
        augment.append(T.RandomErasing(cfg.erasing_probability, scale=(0.02, 0.4), value=0))
    view1 = T.Compose(augment)
    return TwoViewTransform(view1 if cfg.augment_both_views else view0, view1)


def build_test_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to (height, width), to tensor, normalise."""
    return T.Compose(
        [T.Resize((cfg.height, cfg.width), antialias=True), *_to_normalised_tensor(cfg)]
    )
