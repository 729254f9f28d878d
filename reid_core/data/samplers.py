"""Samplers whose order is a pure function of (seed, epoch), so a run can resume mid-epoch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["ClusterSampler", "EpochShuffleSampler"]


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


class ClusterSampler(EpochShuffleSampler):
    """P x K batches over pseudo labels: P = batch_size / K clusters, K images of each.

    Same length, ranks and resume as :class:`EpochShuffleSampler` (``num_samples // (batch_size
    * world_size)`` batches an epoch); the labels come from :meth:`set_labels` at every
    clustering. Clusters are taken in a fresh random order each epoch (the order repeats when
    an epoch needs more than all of them). ``cross_camera=True`` **reads the cameras**: a
    cluster's images are shuffled within each camera and then taken one camera after the other,
    so the K images span as many of the cluster's cameras as they can; ``False`` draws them
    uniformly. A cluster with fewer than K images repeats them. Images labelled -1 are never
    drawn. Augmentation seeds are per position in the epoch, as an image may be drawn twice.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        instances: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        cross_camera: bool = True,
    ) -> None:
        super().__init__(num_samples, batch_size, seed, rank, world_size)
        if batch_size % instances:
            raise ValueError(f"batch size {batch_size} is not a multiple of K={instances}")
        self.instances = instances
        self.cross_camera = cross_camera
        self._members: list[np.ndarray] = []
        self._cameras = np.full(num_samples, -1, dtype=np.int64)

    def set_labels(self, labels: np.ndarray, cameras: np.ndarray) -> None:
        """The pseudo label (-1: none) and camera of every image, in dataset order."""
        labels, cameras = np.asarray(labels), np.asarray(cameras)
        if labels.shape != (self.num_samples,) or cameras.shape != (self.num_samples,):
            raise ValueError(
                f"{labels.shape[0]} labels and {cameras.shape[0]} cameras for "
                f"{self.num_samples} images"
            )
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(int(labels.max(initial=-1)) + 2))
        self._members = [order[a:b] for a, b in itertools.pairwise(bounds)]
        self._members = [m for m in self._members if len(m)]
        if not self._members:
            raise ValueError("no image has a pseudo label: nothing to sample")
        self._cameras = cameras.astype(np.int64)

    @property
    def num_clusters(self) -> int:
        return len(self._members)

    def _draw(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.cross_camera:
            cams = self._cameras[members]
            groups = [rng.permutation(members[cams == c]) for c in rng.permutation(np.unique(cams))]
            # one image of each camera in turn: [a0, b0, a1, b1, ...]
            width = max(len(g) for g in groups)
            grid = np.full((width, len(groups)), -1, dtype=np.int64)
            for j, g in enumerate(groups):
                grid[: len(g), j] = g
            chosen = grid.reshape(-1)
            chosen = chosen[chosen >= 0]
        else:
            chosen = rng.permutation(members)
        return np.resize(chosen, self.instances)

    def indices(self) -> list[int]:
        if not self._members:
            raise RuntimeError("ClusterSampler.set_labels was not called before sampling")
        rng = np.random.default_rng([self.seed, self.epoch])
        per_batch = self.batch_size // self.instances
        needed = self.batches_per_epoch * self.world_size * per_batch
        rounds = -(-needed // self.num_clusters)
        order = np.concatenate([rng.permutation(self.num_clusters) for _ in range(rounds)])
        picks = np.stack([self._draw(self._members[c], rng) for c in order[:needed]])
        b, w = self.batch_size, self.world_size
        usable = picks.reshape(self.batches_per_epoch, w, b)
        return usable[self.start_batch :, self.rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b, w = self.batch_size, self.world_size

        def position(n: int) -> int:  # of this rank's n-th image in the epoch's whole order
            return ((self.start_batch + n // b) * w + self.rank) * b + n % b

        return iter(
            [(i, self.augmentation_seed(position(n))) for n, i in enumerate(self.indices())]
        )
