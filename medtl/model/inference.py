"""Forward passes in inference mode over arrays of prepared images, shared by training, evaluation and predict."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from medtl import hardware


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive float32 batches straight from the (memory-mapped) array: no per-item overhead."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32))


@torch.no_grad()
def forward_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int,
                    hw: hardware.Hardware, desc: str, progress: bool = True) -> torch.Tensor:
    """Apply `fn` to every image in inference mode; float32 results on the CPU."""
    out = []
    for x in tqdm(iter_batches(images, batch_size), total=-(-len(images) // batch_size), desc=desc, leave=False,
                  disable=not progress):
        if hw.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(hw.device, non_blocking=True)
        if hw.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with hw.autocast():
            out.append(fn(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def predict_logits(model, images: np.ndarray, batch_size: int, hw: hardware.Hardware, desc: str,
                   progress: bool = True) -> np.ndarray:
    """(N, K) float64 logits; temperature scaling needs logits, not probabilities."""
    if len(images) == 0:
        return np.zeros((0, model.head[-1].out_features))
    fn = getattr(model, "fused_forward", None) or model  # set by use_fused
    return forward_batches(fn, images, batch_size, hw, desc, progress).numpy().astype(np.float64).reshape(len(images), -1)


def prepare_model(model: torch.nn.Module, hw: hardware.Hardware) -> torch.nn.Module:
    """The model on the chosen device, channels-last where that is faster."""
    model.to(hw.device)
    if hw.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def use_fused(model: torch.nn.Module, hw: hardware.Hardware, precision: str, images: int | None):
    """From now on `predict_logits(model, ...)` runs fused (medtl.model.fused) when `precision` is auto.

    `images`: how many the run will infer, which decides whether torch.compile repays its build.
    Returns the FusedForward; its `record` (after the first batch) says what ran and why."""
    from medtl.model.fused import FusedForward

    fused = FusedForward(model, hw, precision, images)
    model.fused_forward = fused  # read by predict_logits; gradients (saliency) still use the eager model
    return fused
