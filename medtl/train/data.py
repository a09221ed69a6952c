"""Batches from the prepared arrays: plain slicing for inference, gathered and augmented batches for training.

Augmentation is torchvision.transforms.v2 on float tensors in [0, 1]. Each
image of a batch gets its own draw; the draws come from a generator of the
caller's (`reseed`), never from torch's global stream, which is saved and
restored around them, so dropout and batch order are unaffected and an
epoch's augmentations depend only on the seed given for that epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentParams:
    """Medical-safe training augmentations (no colour jitter, mild geometry)."""

    hflip: float = 0.5
    vflip: float = 0.0
    rotate_limit: float = 10.0
    scale_limit: float = 0.1
    brightness_contrast: float = 0.1
    noise_std: float = 0.0
    enabled: bool = True


def build_augment(p: AugmentParams) -> v2.Compose | None:
    """The per-image transform, or None when augmentation is off or every step is off."""
    if not p.enabled:
        return None
    steps: list[v2.Transform] = []
    if p.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p.hflip))
    if p.vflip > 0:
        steps.append(v2.RandomVerticalFlip(p.vflip))
    if p.rotate_limit > 0 or p.scale_limit > 0:
        # Zero outside the image, like preprocess's padding.
        affine = v2.RandomAffine(degrees=p.rotate_limit, scale=(1 - p.scale_limit, 1 + p.scale_limit),
                                 interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
        steps.append(v2.RandomApply([affine], p=0.8))
    if p.brightness_contrast > 0:
        # Brightness and contrast only: hue or saturation would change what a stain or a window means.
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=p.brightness_contrast, contrast=p.brightness_contrast)], p=0.5))
    if p.noise_std > 0:
        steps.append(v2.RandomApply([v2.GaussianNoise(sigma=p.noise_std, clip=True)], p=0.5))
    return v2.Compose(steps) if steps else None


def augment_batch(transform: v2.Transform, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`transform` applied to each image of `x` (N, C, H, W) with its own draw, all draws from `gen`; clipped to [0, 1].

    torchvision draws from torch's global CPU stream: it is seeded from `gen`
    for the batch and restored afterwards (CUDA streams are never touched).
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    saved, threads = torch.get_rng_state(), torch.get_num_threads()
    try:
        torch.default_generator.manual_seed(seed)
        # One image's ops are too small to split across threads: on 2 busy cores one thread was 5-8x faster.
        torch.set_num_threads(1)
        out = torch.stack([transform(img) for img in x])
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(saved)
    return out.clamp_(0.0, 1.0)


class TrainBatches:
    """Training batches gathered from the (memory-mapped) arrays by index lists, then augmented.

    One fancy-index read per batch instead of a DataLoader's per-item calls and
    collation. `reseed` restarts the augmentation's random stream, so an
    epoch's augmentations depend only on the seed given for that epoch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: v2.Transform | None, pin_memory: bool = False):
        self.images, self.labels, self.augment, self.pin_memory = images, np.asarray(labels), augment, pin_memory
        self.gen = torch.Generator().manual_seed(0)

    def reseed(self, seed: int) -> None:
        self.gen.manual_seed(seed)

    def gather(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as stored: safe to run in another thread (no random draws)."""
        idx = np.asarray(index, dtype=np.int64)
        return torch.from_numpy(np.asarray(self.images[idx], dtype=np.float32)), \
            torch.from_numpy(self.labels[idx].astype(np.int64))

    def finish(self, xt: torch.Tensor, yt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmentation, in the training thread: torchvision draws from torch's global stream, which dropout
        and the training step share, so drawing it from a second thread would make runs differ."""
        if self.augment is not None:
            xt = augment_batch(self.augment, xt, self.gen)
        if self.pin_memory:
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt, yt

    def batch(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(*self.gather(index))

    def __call__(self, batches: Iterable[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in batches:
            yield self.batch(index)
