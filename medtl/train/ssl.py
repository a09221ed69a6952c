"""Self-supervised continued pretraining (SimCLR) on unlabelled target images.

Two augmented views of each image are pulled together and pushed away from
the other images of the batch (NT-Xent loss) through a small projection head
that is discarded afterwards. The augmentations are medical-safe: a random
resized crop with a conservative scale, flips, a small rotation, mild
brightness/contrast, gaussian noise and blur (torchvision.transforms.v2);
never hue or colour jitter, which would change what a stain or a window means.

Only images are read: no labels, no validation or test split. Augmentation
draws come from a seeded generator, so on the CPU two runs with the same seed
give the same backbone.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from medtl import hardware
from medtl.errors import MedtlError
from medtl.model.backbones import Backbone
from medtl.params import require, require_batch_size
from medtl.prepare.imaging import Preprocessing
from medtl.train.data import augment_batch


@dataclass(frozen=True)
class SSLAugment:
    """Medical-safe view generation; every value is a maximum or a probability."""

    crop_scale: float = 0.5  # smallest crop, as a fraction of the image area
    aspect_limit: float = 0.15  # crop aspect ratio within [1/(1+a), 1+a]: anatomy is barely stretched
    hflip: float = 0.5
    vflip: float = 0.0
    rotate_limit: float = 10.0  # degrees
    brightness_contrast: float = 0.15
    noise_std: float = 0.03  # on intensities in [0, 1]
    blur_p: float = 0.3
    blur_sigma: float = 1.0  # pixels

    def check(self, key: str) -> None:
        require(0.05 <= self.crop_scale <= 1.0, f"{key}.crop_scale", self.crop_scale, "a fraction of the image area in [0.05, 1]")
        for name in ("hflip", "vflip", "blur_p"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, f"{key}.{name}", v, "a probability in [0, 1]")
        require(0.0 <= self.aspect_limit <= 0.5, f"{key}.aspect_limit", self.aspect_limit, "a number in [0, 0.5]")
        require(0.0 <= self.rotate_limit <= 45.0, f"{key}.rotate_limit", self.rotate_limit, "degrees in [0, 45]")
        require(0.0 <= self.brightness_contrast <= 0.5, f"{key}.brightness_contrast", self.brightness_contrast, "a mild change in [0, 0.5]")
        require(0.0 <= self.noise_std <= 0.2, f"{key}.noise_std", self.noise_std, "a standard deviation in [0, 0.2]")
        require(0.0 <= self.blur_sigma <= 5.0, f"{key}.blur_sigma", self.blur_sigma, "a sigma in pixels in [0, 5]")


@dataclass(frozen=True)
class SSLParams:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.0003
    weight_decay: float = 0.0001
    temperature: float = 0.2
    projection_dim: int = 128
    seed: int = 0
    # A folder of unlabelled images (any format medtl reads) used beside the training images.
    extra_images: str | None = None
    augment: SSLAugment = field(default_factory=SSLAugment)

    def check(self, key: str) -> None:
        require(self.epochs >= 1, f"{key}.epochs", self.epochs, "a positive integer")
        # Batch norm and the contrastive loss both need at least two images per batch.
        require(self.batch_size >= 2, f"{key}.batch_size", self.batch_size, "an integer >= 2 (batch norm and the contrastive loss need two images)")
        require_batch_size(self.batch_size, f"{key}.batch_size", least=2)
        require(0 < self.lr <= 1, f"{key}.lr", self.lr, "a learning rate in (0, 1]")
        require(0 <= self.weight_decay <= 1, f"{key}.weight_decay", self.weight_decay, "a number in [0, 1]")
        require(0.01 <= self.temperature <= 10, f"{key}.temperature", self.temperature, "a temperature in [0.01, 10]")
        require(self.projection_dim >= 2, f"{key}.projection_dim", self.projection_dim, "an integer >= 2")
        require(self.extra_images is None or self.extra_images.strip() != "", f"{key}.extra_images",
                self.extra_images, "null or the path of a folder of images")


# ---------------------------------------------------------------- images


class ImagePool:
    """Images (N, C, S, S) in [0, 1] from several arrays (memory-mapped), addressed by one index."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = [a for a in arrays if len(a)]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, indices: np.ndarray) -> torch.Tensor:
        out = []
        for i in indices:
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            out.append(np.asarray(self.arrays[k][i - self.starts[k]], dtype=np.float32))
        return torch.from_numpy(np.stack(out))


def read_image_folder(folder: str | Path, pre: Preprocessing, out: Path) -> tuple[np.ndarray, dict]:
    """Decode every readable image under `folder` as the training images were, into `out` (memory-mapped).

    The intake reads them (`medtl.intake.decode.read_unlabelled`): the preprocessing
    record's read options, burned-in text refused, links that leave the folder
    not followed; unreadable files are skipped and counted by reason, hidden
    ones counted. File names are not kept, since they may carry patient identifiers.
    """
    from medtl.prepare.unlabelled import read_unlabelled

    got = read_unlabelled(str(folder), pre, "pretrain.ssl.extra_images", out)
    return got.images, {"files": got.counts["files"], "images": got.counts["images"],
                        "skipped": {k: v for k, v in got.counts["skipped"].items() if v},
                        "hidden_files": got.counts["hidden_files"]}


# ---------------------------------------------------------------- views


def view_transform(aug: SSLAugment, size: tuple[int, int]) -> v2.Transform:
    """One random medical-safe view of an image (C, H, W) in [0, 1], as torchvision.transforms.v2 steps; steps that are off are left out."""
    steps: list[v2.Transform] = []
    if aug.crop_scale < 1.0 or aug.aspect_limit > 0:
        steps.append(v2.RandomResizedCrop(size, scale=(aug.crop_scale, 1.0), ratio=(1 / (1 + aug.aspect_limit), 1 + aug.aspect_limit),
                                          interpolation=v2.InterpolationMode.BILINEAR, antialias=True))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rotate_limit > 0:
        # Zero outside the image, like preprocess's padding.
        steps.append(v2.RandomRotation(aug.rotate_limit, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0))
    if aug.blur_p > 0 and aug.blur_sigma > 0:
        kernel = 2 * max(1, math.ceil(3 * aug.blur_sigma)) + 1
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, aug.blur_sigma))], p=aug.blur_p))
    if aug.brightness_contrast > 0:
        # Brightness and contrast only: never hue or saturation.
        steps.append(v2.ColorJitter(brightness=aug.brightness_contrast, contrast=aug.brightness_contrast))
    if aug.noise_std > 0:
        steps.append(v2.GaussianNoise(sigma=aug.noise_std, clip=True))
    return v2.Compose(steps) if steps else v2.Identity()


def make_views(x: torch.Tensor, aug: SSLAugment, gen: torch.Generator) -> torch.Tensor:
    """One random medical-safe view of each image in `x` (N, C, H, W) in [0, 1], every draw from `gen`."""
    return augment_batch(view_transform(aug, tuple(x.shape[-2:])), x, gen)


# ---------------------------------------------------------------- loss and training


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross entropy over 2N views (each view's positive is its twin)."""
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def projection_head(num_features: int, dim: int) -> nn.Module:
    """SimCLR's two-layer MLP; trained with the backbone, then thrown away."""
    return nn.Sequential(nn.Linear(num_features, num_features), nn.ReLU(inplace=True), nn.Linear(num_features, dim))


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[np.ndarray]:
    order = torch.randperm(n, generator=gen).numpy()
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) >= 2:  # a lone image has no negative and breaks batch norm
            yield idx


def train_ssl(
    backbone: Backbone,
    normalize: nn.Module,
    pool: ImagePool,
    params: SSLParams,
    hw: hardware.Hardware,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict:
    """Continue pretraining `backbone` in place with SimCLR on `pool`; return what was done."""
    if len(pool) < 2:
        raise MedtlError(f"ssl needs at least 2 unlabelled images, got {len(pool)}")
    torch.manual_seed(params.seed)  # the projection head's init
    head = projection_head(backbone.num_features, params.projection_dim)
    gen = torch.Generator().manual_seed(params.seed)
    backbone.to(hw.device)
    head.to(hw.device)
    normalize.to(hw.device)
    if hw.channels_last:
        backbone.to(memory_format=torch.channels_last)
    model_params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(model_params, lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = len(pool) // params.batch_size + (1 if len(pool) % params.batch_size >= 2 else 0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, params.epochs * steps_per_epoch))
    backbone.train()
    head.train()
    losses: list[float] = []
    for epoch in range(params.epochs):
        total, count = 0.0, 0
        for idx in tqdm(_batches(len(pool), params.batch_size, gen), total=steps_per_epoch, desc=f"ssl epoch {epoch + 1}", leave=False):
            x = pool.take(idx)
            views = torch.cat([make_views(x, params.augment, gen), make_views(x, params.augment, gen)])
            views = normalize(views.to(hw.device, non_blocking=True))
            if hw.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            with hw.autocast():
                z = head(backbone(views))
            z1, z2 = z.chunk(2)
            loss = nt_xent(z1, z2, params.temperature)
            if not torch.isfinite(loss):
                raise MedtlError(f"ssl loss became {loss.item()} in epoch {epoch + 1}; lower pretrain.ssl.lr (now {params.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(round(total / count, 6))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    backbone.eval()
    backbone.to("cpu", memory_format=torch.contiguous_format)
    return {
        "method": "ssl",
        "objective": "simclr_nt_xent",
        "epochs": params.epochs,
        "steps": params.epochs * steps_per_epoch,
        "batch_size": params.batch_size,
        "lr": params.lr,
        "temperature": params.temperature,
        "seed": params.seed,
        "augment": {k: getattr(params.augment, k) for k in SSLAugment.__dataclass_fields__},
        "loss": losses,
    }


def extra_pool(params: SSLParams, pre: Preprocessing, workdir: Path) -> tuple[list[np.ndarray], dict | None]:
    """The extra unlabelled images, decoded into `workdir`, or nothing when none are configured."""
    if params.extra_images is None:
        return [], None
    arr, info = read_image_folder(params.extra_images, pre, workdir / "extra.npy")
    return [arr], {"folder": params.extra_images, **info}


def temporary_workdir() -> tempfile.TemporaryDirectory:
    """Scratch space for decoded extra images (honours TMPDIR)."""
    return tempfile.TemporaryDirectory(prefix="medtl-ssl-")
