"""Samplers whose order is a pure function of (seed, epoch), so a run can resume mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochShuffleSampler"]


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Shuffle ``num_samples`` indices anew each epoch and give this rank its share.

    Each item is ``(index, augmentation_seed)``: the seed is a function of (seed, epoch, index),
    so a sample's random augmentation does not depend on which process or loader worker makes it,
    nor on what ran before (see :class:`reid_core.data.loaders.TrainSet`).

    The permutation of epoch ``e`` is ``randperm(N, generator=seed + e)``; rank ``r`` of ``W``
    takes every W-th whole batch, so every rank gets the same number of full batches per epoch
    (the tail that does not fill a batch on every rank is dropped). ``set_epoch(e, start_batch=s)``
    skips the first ``s`` batches of this rank: that is how a run stopped mid-epoch resumes with
    the very batches it would have seen.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the training set has {num_samples} images, fewer than one batch per process "
                f"(data.batch_size={batch_size} x {world_size} processes): lower data.batch_size"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def indices(self) -> list[int]:
        """This rank's image indices for the current epoch, from ``start_batch`` on."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        b, w = self.batch_size, self.world_size
        usable = order[: self.batches_per_epoch * b * w].view(self.batches_per_epoch, w, b)
        return usable[self.start_batch :, self.rank].reshape(-1).tolist()

    def augmentation_seed(self, index: int) -> int:
        return ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**62

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.augmentation_seed(i)) for i in self.indices()])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
