"""Camera colour style: the augmented view of an image recoloured as another camera sees.

Two cameras differ most in colour (white balance, exposure, the light of the place): on
cuhk03-pair1 colour stripe histograms find a person's other-camera images three times better once
each camera's mean is removed (bench/results/train_real.md). With
``data.camera_style_probability`` = p, the augmented view of an image of camera c is, with
probability p, moved channel by channel from c's colour statistics to those of another camera c'
(drawn uniformly among the others):

    x' = (x - mu_c) / sigma_c * sigma_c' + mu_c'

where mu and sigma are each colour channel's mean and standard deviation over camera's training
images, in the normalised space the network sees (the map is affine per channel, so it commutes
with the normalisation). The image keeps its index, so its pseudo label and its camera's proxies
stay the same: the losses ask the network for the same feature whatever camera's colours the
person is shown in. A cheap stand-in for CamStyle's generated camera-to-camera images.

Images with an unknown camera (``camid`` -1) are left as they are; data with fewer than two
known cameras has nothing to transfer (the loader warns and trains without it).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from reid_core.data.image_io import CorruptImageError, load_image
from reid_core.data.records import ImageRecord

__all__ = ["CameraColourStats", "CameraStyle", "camera_colour_stats"]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class CameraColourStats:
    """Per camera (``cameras[i]``): each channel's ``mean[i]`` and ``std[i]`` (3 values)."""

    cameras: tuple[int, ...]
    mean: torch.Tensor  # (len(cameras), 3)
    std: torch.Tensor  # (len(cameras), 3)


def camera_colour_stats(
    records: Sequence[ImageRecord],
    transform: Callable[[Image.Image], torch.Tensor],
    max_per_camera: int = 256,
    seed: int = 0,
) -> CameraColourStats | None:
    """The colour statistics of each camera over up to ``max_per_camera`` of its images (drawn
    with ``seed``), each image through ``transform`` (the test transform: resized, normalised);
    None with fewer than two cameras. Unreadable images are skipped."""
    by_camera: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in records:
        if record.camid >= 0:
            by_camera[record.camid].append(record)
    if len(by_camera) < 2:
        return None
    rng = random.Random(seed)
    cameras, means, stds = [], [], []
    for camid in sorted(by_camera):
        chosen = by_camera[camid]
        if len(chosen) > max_per_camera:
            chosen = rng.sample(chosen, max_per_camera)
        pixels = []
        for record in chosen:
            try:
                pixels.append(transform(load_image(record.path)).flatten(1))
            except CorruptImageError:
                continue
        if not pixels:
            continue
        values = torch.cat(pixels, dim=1)  # (3, pixels of all chosen images)
        cameras.append(camid)
        means.append(values.mean(dim=1))
        stds.append(values.std(dim=1).clamp_min(1e-6))
    if len(cameras) < 2:
        return None
    return CameraColourStats(tuple(cameras), torch.stack(means), torch.stack(stds))


class CameraStyle:
    """``(view, camid) -> view``: with ``probability``, ``view`` (a normalised 3 x H x W tensor
    of camera ``camid``) recoloured to another camera's statistics. Draws from torch's global
    generator, so a seeded item (:class:`reid_core.data.loaders.TrainSet`) is reproducible."""

    def __init__(self, stats: CameraColourStats, probability: float) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.stats = stats
        self.probability = probability
        self._row = {camid: i for i, camid in enumerate(stats.cameras)}

    def __call__(self, view: torch.Tensor, camid: int) -> torch.Tensor:
        source = self._row.get(camid)
        if source is None or torch.rand(()).item() >= self.probability:
            return view
        others = len(self.stats.cameras) - 1
        target = int(torch.randint(others, ()).item())
        target += target >= source  # any camera but the image's own
        scale = (self.stats.std[target] / self.stats.std[source]).view(3, 1, 1)
        return (view - self.stats.mean[source].view(3, 1, 1)) * scale + self.stats.mean[
            target
        ].view(3, 1, 1)

    def __repr__(self) -> str:
        return f"CameraStyle(cameras={list(self.stats.cameras)}, probability={self.probability})"
