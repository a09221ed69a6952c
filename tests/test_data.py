"""Training batches: gathered by index, augmentation reproducible from its seed."""
import numpy as np
import torch

from medtl.model.inference import iter_batches
from medtl.train.data import AugmentParams, TrainBatches, build_augment

IMAGES = np.random.default_rng(0).uniform(0, 1, (12, 1, 16, 16)).astype(np.float16)
LABELS = np.arange(12) % 2


def test_batches_follow_the_index_without_augmentation():
    x, y = TrainBatches(IMAGES, LABELS, None).batch([5, 2, 9])
    assert torch.equal(x, torch.from_numpy(IMAGES[[5, 2, 9]].astype(np.float32)))
    assert y.tolist() == [1, 0, 1] and y.dtype == torch.int64


def test_augmentation_repeats_after_reseeding():
    batches = TrainBatches(IMAGES, LABELS, build_augment(AugmentParams(hflip=0.5, rotate_limit=20)))
    batches.reseed(7)
    a, _ = batches.batch(list(range(12)))
    b, _ = batches.batch(list(range(12)))
    batches.reseed(7)
    c, _ = batches.batch(list(range(12)))
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert a.shape == (12, 1, 16, 16) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_iter_batches_covers_every_image():
    assert sum(len(b) for b in iter_batches(IMAGES, 5)) == 12


def test_augmentation_leaves_torch_global_stream_alone_and_draws_per_image():
    batches = TrainBatches(np.repeat(IMAGES[:1], 8, axis=0), LABELS[:8], build_augment(AugmentParams(hflip=0.5, rotate_limit=30)))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    batches.reseed(1)
    x, _ = batches.batch(list(range(8)))
    assert torch.equal(torch.rand(4), expected)  # dropout's stream is not consumed by augmentation
    # Eight copies of one image come out different: each image has its own draw.
    assert len({bytes(v.numpy()) for v in x}) > 1


def test_augmentation_off_is_none():
    assert build_augment(AugmentParams(enabled=False)) is None
    assert build_augment(AugmentParams(hflip=0, rotate_limit=0, scale_limit=0, brightness_contrast=0)) is None
