import pytest

from reid_core.data.samplers import EpochShuffleSampler


def test_ranks_partition_whole_batches() -> None:
    samplers = [EpochShuffleSampler(103, 4, seed=1, rank=r, world_size=3) for r in range(3)]
    per_rank = [s.indices() for s in samplers]
    assert all(len(x) == 8 * 4 == len(s) for x, s in zip(per_rank, samplers, strict=True))
    seen = [i for x in per_rank for i in x]
    assert len(seen) == len(set(seen))  # no image twice in one epoch
    assert samplers[0].batches_per_epoch == 8


def test_order_depends_on_seed_and_epoch_only() -> None:
    a = EpochShuffleSampler(50, 5, seed=7)
    b = EpochShuffleSampler(50, 5, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert a.indices() != b.indices()
    assert {seed for _, seed in a}.isdisjoint({seed for _, seed in b})  # fresh augmentations


def test_start_batch_skips_exactly_those_batches() -> None:
    full = EpochShuffleSampler(40, 4, seed=0)
    full.set_epoch(2)
    resumed = EpochShuffleSampler(40, 4, seed=0)
    resumed.set_epoch(2, start_batch=3)
    assert list(resumed) == list(full)[12:]  # same images, same augmentation seeds
    assert len(resumed) == 40 - 12


def test_too_small_dataset_is_explained() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochShuffleSampler(5, 4, world_size=2)
