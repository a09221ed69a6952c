"""pretrain-adapt: a pretrained backbone, adapted to the target images without their labels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from medtl import hardware
from medtl.backbones import Backbone, build_backbone, check_arch, check_input_size
from medtl.data import iter_batches
from medtl.model import Normalize
from medtl.params import Device, Precision, require
from medtl.preprocess import load_split, load_stats


@dataclass(frozen=True)
class PretrainParams:
    arch: str = "resnet18"
    weights: str = "none"  # none, imagenet, or a path to a state dict pinned by sha256
    sha256: str | None = None
    grayscale: Literal["adapt", "repeat"] = "adapt"
    adapt: Literal["none", "adabn"] = "none"
    batch_size: int = 64
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"

    def check(self, key: str) -> None:
        check_arch(self.arch)
        require(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "a positive integer")
        if self.weights not in ("none", "imagenet"):
            require(self.sha256 is not None, f"{key}.sha256", self.sha256,
                    f"the sha256 of the weights file {self.weights!r} (or weights: none / imagenet)")


@torch.no_grad()
def adabn(backbone: Backbone, normalize: Normalize, images, batch_size: int, hw: hardware.Hardware) -> dict:
    """Re-estimate every batch-norm layer's running statistics on target images (AdaBN).

    Only the statistics change; no weight is trained and no label is read.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return {"method": "adabn", "images": 0, "batchnorm_layers": 0, "note": f"{backbone.arch} has no batch-norm layers"}
    backbone.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    n = 0
    for x in tqdm(iter_batches(images, batch_size), total=-(-len(images) // batch_size), desc="adabn", leave=False):
        x = normalize(x.to(hw.device))
        with hw.autocast():
            backbone(x)
        n += len(x)
    for m in bns:
        m.momentum = 0.1
    backbone.eval()
    return {"method": "adabn", "images": n, "batchnorm_layers": len(bns)}


def run_pretrain(params: PretrainParams, prepared: Path) -> tuple[Backbone, dict]:
    stats = load_stats(prepared)
    check_input_size(params.arch, stats["size"])
    torch.manual_seed(params.seed)
    hw = hardware.select(params.device, params.precision, key="pretrain.device")
    backbone = build_backbone(params.arch, stats["channels"], params.weights, params.sha256, params.grayscale)
    record: dict = {"method": params.adapt, "hardware": hw.describe()}
    if params.adapt == "adabn":
        train = load_split(prepared, "train")  # images only; labels are never read here
        normalize = Normalize(stats["mean"], stats["std"]).to(hw.device)
        backbone.to(hw.device)
        record.update(adabn(backbone, normalize, train.images, params.batch_size, hw))
        backbone.cpu()
    return backbone, record
