"""The batch sampler shared by all ranks: the union of the ranks' batches is the single-process batch."""
import numpy as np
import pytest

from medtl.distributed import EpochBatches, World, derive_seed, shard
from medtl.errors import MedtlError


def test_ranks_split_each_global_batch():
    one = list(EpochBatches(50, 8, seed=3, world=World()))
    ranks = [list(EpochBatches(50, 8, seed=3, world=World(r, 2))) for r in range(2)]
    assert len(one) == 6 and all(len(b) == 8 for b in one)  # the ragged last batch is dropped
    for b, (r0, r1) in zip(one, zip(*ranks)):
        assert sorted(b) == sorted(r0 + r1) and len(r0) == len(r1) == 4


def test_order_depends_on_the_epoch_only():
    s = EpochBatches(40, 8, seed=1, world=World())
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(3)
    assert list(s) != a
    t = EpochBatches(40, 8, seed=1, world=World())
    t.set_epoch(2)
    assert list(t) == a


def test_balanced_draw_evens_out_the_classes():
    labels = np.array([0] * 90 + [1] * 10)
    weights = 1.0 / np.bincount(labels)[labels]
    drawn = np.concatenate(list(EpochBatches(100, 10, seed=0, world=World(), weights=weights)))
    assert 0.35 < labels[drawn].mean() < 0.65


def test_global_batch_must_divide_among_processes():
    with pytest.raises(MedtlError, match="divisible"):
        EpochBatches(10, 5, seed=0, world=World(0, 2))


def test_shards_cover_the_split_once():
    rows = [list(range(11))[shard(11, World(r, 3))] for r in range(3)]
    assert sum(rows, []) == list(range(11))
    assert derive_seed(0, 1, "augment") != derive_seed(0, 1, "augment", rank=1) != derive_seed(0, 2, "augment")
