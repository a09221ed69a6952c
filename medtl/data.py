"""Batches from the prepared arrays: plain slicing for inference, gathered and augmented batches for training."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset


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


def build_augment(p: AugmentParams) -> A.Compose | None:
    if not p.enabled:
        return None
    steps: list = []
    if p.hflip > 0:
        steps.append(A.HorizontalFlip(p=p.hflip))
    if p.vflip > 0:
        steps.append(A.VerticalFlip(p=p.vflip))
    if p.rotate_limit > 0 or p.scale_limit > 0:
        steps.append(A.Affine(rotate=(-p.rotate_limit, p.rotate_limit), scale=(1 - p.scale_limit, 1 + p.scale_limit),
                              border_mode=0, p=0.8))
    if p.brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(p.brightness_contrast, p.brightness_contrast, p=0.5))
    if p.noise_std > 0:
        steps.append(A.GaussNoise(std_range=(0.0, p.noise_std), p=0.5))
    return A.Compose(steps, seed=0) if steps else None


class ArrayDataset(Dataset):
    """Images (N, C, S, S) float16 in [0, 1] with labels; augmentation on (S, S, C) float32."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: A.Compose | None = None):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = np.asarray(self.images[i], dtype=np.float32)
        if self.augment is not None:
            img = self.augment(image=img.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
            img = np.clip(img, 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.labels[i])


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive float32 batches straight from the (memory-mapped) array: no per-item overhead."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32))


class TrainBatches:
    """Training batches gathered from the (memory-mapped) arrays by index lists, augmented per image.

    One fancy-index read per batch instead of a DataLoader's per-item calls and
    collation; augmentation is the only per-image work. `reseed` restarts the
    augmentation's random streams, so an epoch's augmentations depend only on
    the seed given for that epoch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: A.Compose | None, pin_memory: bool = False):
        self.images, self.labels, self.augment, self.pin_memory = images, np.asarray(labels), augment, pin_memory

    def reseed(self, seed: int) -> None:
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def batch(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(index, dtype=np.int64)
        x = np.asarray(self.images[idx], dtype=np.float32)
        if self.augment is not None:
            for i in range(len(x)):
                x[i] = np.clip(self.augment(image=x[i].transpose(1, 2, 0))["image"], 0.0, 1.0).transpose(2, 0, 1)
        xt, yt = torch.from_numpy(x), torch.from_numpy(self.labels[idx].astype(np.int64))
        if self.pin_memory:
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt, yt

    def __call__(self, batches: Iterable[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in batches:
            yield self.batch(index)
