"""Datasets and loaders for training (two views, no labels) and evaluation (one view)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from reid_core.config import ClusterConfig, DataConfig
from reid_core.data.camera_style import CameraStyle, camera_colour_stats
from reid_core.data.image_io import CorruptImageError, TooManyCorruptImagesError, load_image
from reid_core.data.records import ImageRecord
from reid_core.data.registry import DatasetError
from reid_core.data.samplers import ClusterSampler, EpochShuffleSampler
from reid_core.data.transforms import (
    TwoViewTransform,
    build_test_transform,
    build_train_transform,
)

__all__ = [
    "EvalSet",
    "TrainSet",
    "build_eval_loader",
    "build_train_loader",
    "seed_worker",
]

_LOG = logging.getLogger("reid_core.data")

OnCorrupt = Literal["substitute", "raise"]

#: How many following images are tried in place of an unreadable one.
_MAX_SUBSTITUTE_TRIES = 16


class TrainSet(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Training images: item ``i`` is ``(view0, view1, i)``; identity labels are never returned.

    An image that became unreadable after the scan is reported (a warning naming the file) and,
    with ``on_corrupt="substitute"`` (the default), replaced by the next readable image of the list
    for the rest of the run, so that one bad file does not end a run; index ``i`` is still returned
    (its memory slot then sees a duplicate of a neighbour). Past ``max_bad_fraction`` of the set
    (counted per worker process) :class:`TooManyCorruptImagesError` is raised.
    ``on_corrupt="raise"`` raises :class:`CorruptImageError` (with the path) at once.

    Items may be asked for as ``(i, seed)`` (as :class:`EpochShuffleSampler` yields them): the
    augmentation of that item then draws from a torch generator seeded with ``seed`` alone, so
    it is the same in any process, with any number of loader workers, after any resume.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: TwoViewTransform,
        max_bad_fraction: float = 0.01,
        on_corrupt: OnCorrupt = "substitute",
        style: CameraStyle | None = None,
    ) -> None:
        if not records:
            raise DatasetError("the train split is empty: nothing to train on")
        self.records = list(records)
        self.transform = transform
        self.style = style
        self.max_bad_fraction = max_bad_fraction
        self.on_corrupt = on_corrupt
        self._bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        if isinstance(item, tuple):
            index, seed = item
            image = self._load(index)
            # torchvision's random transforms draw from torch's global CPU generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                view0, view1 = self._views(image, index)
        else:
            index = item
            view0, view1 = self._views(self._load(index), index)
        return view0, view1, index

    def _views(self, image: Image.Image, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view0, view1 = self.transform(image)
        if self.style is not None:
            view1 = self.style(view1, self.records[index].camid)
        return view0, view1

    def _note_bad(self, index: int, exc: CorruptImageError) -> None:
        self._bad[index] = str(exc)
        _LOG.warning("%s (found during training)", exc)
        if len(self._bad) / len(self.records) > self.max_bad_fraction:
            names = ", ".join(self.records[i].path.name for i in list(self._bad)[:5])
            raise TooManyCorruptImagesError(
                f"{len(self._bad)} of {len(self.records)} training images became unreadable "
                f"during training ({100.0 * len(self._bad) / len(self.records):.2f}%), above the "
                f"limit data.max_bad_fraction={self.max_bad_fraction:g}: {names}. Check the "
                "storage and the files, then resume."
            )

    def _load(self, index: int) -> Image.Image:
        path = self.records[index].path
        if index not in self._bad:
            try:
                return load_image(path)
            except CorruptImageError as exc:
                if self.on_corrupt == "raise":
                    raise
                self._note_bad(index, exc)
        n = len(self.records)
        for step in range(1, min(n, _MAX_SUBSTITUTE_TRIES + 1)):
            other = (index + step) % n
            if other in self._bad:
                continue
            try:
                return load_image(self.records[other].path)
            except CorruptImageError as exc:
                self._note_bad(other, exc)
        raise CorruptImageError(
            path, f"unreadable, and none of the next {_MAX_SUBSTITUTE_TRIES} images could be read"
        )


class EvalSet(Dataset[tuple[torch.Tensor, int]]):
    """Evaluation images: item ``i`` is ``(image, i)``.

    An unreadable image is reported (a warning naming the file) and, with
    ``on_corrupt="substitute"`` (the default), replaced by a plain ``fill``-coloured image so the
    evaluation completes (that entry then cannot match); ``"raise"`` raises
    :class:`CorruptImageError`.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        on_corrupt: OnCorrupt = "substitute",
        fill: tuple[int, int, int] = (124, 116, 104),
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.fill = fill

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            img = load_image(self.records[index].path)
        except CorruptImageError as exc:
            if self.on_corrupt == "raise":
                raise
            _LOG.warning("%s (evaluated as a blank image)", exc)
            img = Image.new("RGB", (64, 128), self.fill)
        return self.transform(img), index


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``numpy`` and ``random`` from the worker's torch seed (which the
    loader derives from its generator and the worker id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_train_loader(
    records: Sequence[ImageRecord],
    cfg: DataConfig,
    seed: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    clusters: ClusterConfig | None = None,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor, int]]:
    """Loader of ``(view0, view1, index)`` batches of ``data.batch_size``.

    With ``clusters`` (``loss.objective=cluster_contrast``) the batches are P x K over pseudo
    labels (:class:`ClusterSampler`, whose ``set_labels`` must be called before the first epoch).

    The order comes from :class:`EpochShuffleSampler` (a function of seed and epoch; each of
    ``world_size`` processes takes its own whole batches); call ``loader.sampler.set_epoch(e)``
    every epoch, with ``start_batch`` to resume mid-epoch. Workers are persistent and seeded from
    ``seed`` and the rank; memory is pinned when CUDA is available.
    """
    dataset = TrainSet(
        records, build_train_transform(cfg), cfg.max_bad_fraction, style=_camera_style(records, cfg)
    )
    try:
        sampler: EpochShuffleSampler
        if clusters is None:
            sampler = EpochShuffleSampler(len(dataset), cfg.batch_size, seed, rank, world_size)
        else:
            sampler = ClusterSampler(
                len(dataset),
                cfg.batch_size,
                clusters.instances_per_cluster,
                seed,
                rank,
                world_size,
                cross_camera=clusters.sampler == "cross_camera",
            )
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    gen = torch.Generator()
    gen.manual_seed(seed + 1_000_003 * rank)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
        worker_init_fn=seed_worker,
        generator=gen,
    )


def _camera_style(records: Sequence[ImageRecord], cfg: DataConfig) -> CameraStyle | None:
    """``data.camera_style_probability``'s recolouring, from the training images' cameras."""
    if cfg.camera_style_probability == 0:
        return None
    stats = camera_colour_stats(records, build_test_transform(cfg))
    if stats is None:
        _LOG.warning(
            "data.camera_style_probability=%g needs images of two cameras or more; the training "
            "images have fewer known cameras, so the augmented views keep their colours",
            cfg.camera_style_probability,
        )
        return None
    _LOG.info(
        "camera colour styles of cameras %s (channel means %s)",
        list(stats.cameras),
        [[round(v, 3) for v in row] for row in stats.mean.tolist()],
    )
    return CameraStyle(stats, cfg.camera_style_probability)


def build_eval_loader(
    records: Sequence[ImageRecord], cfg: DataConfig, batch_size: int
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Loader of ``(image, index)`` batches in record order (nothing dropped)."""
    fill = (
        round(255 * cfg.mean[0]),
        round(255 * cfg.mean[1]),
        round(255 * cfg.mean[2]),
    )
    dataset = EvalSet(records, build_test_transform(cfg), fill=fill)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
    )
