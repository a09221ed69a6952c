"""pretrain-adapt: a pretrained backbone, adapted to the target images without their labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from medtl import hardware
from medtl.errors import MedtlError
from medtl.model.backbones import Backbone, check_arch, check_input_size
from medtl.model.classifier import Normalize
from medtl.model.start import build_backbone
from medtl.params import Device, Precision, require, require_batch_size
from medtl.prepare.prepared import load_images, load_stats
from medtl.train.domain import adabn
from medtl.train.ssl import ImagePool, SSLParams, extra_pool, temporary_workdir, train_ssl

ADAPT_METHODS = ("none", "adabn", "ssl")


@dataclass(frozen=True)
class PretrainParams:
    arch: str = "resnet18"
    weights: str = "none"  # none, imagenet, or a path to a state dict pinned by sha256
    sha256: str | None = None
    grayscale: Literal["adapt", "repeat"] = "adapt"
    adapt: Literal["none", "adabn", "ssl"] = "none"
    batch_size: int = 64  # adabn's batches
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"
    ssl: SSLParams = field(default_factory=SSLParams)

    def check(self, key: str) -> None:
        check_arch(self.arch)
        require_batch_size(self.batch_size, f"{key}.batch_size")
        if self.weights not in ("none", "imagenet"):
            require(self.sha256 is not None, f"{key}.sha256", self.sha256,
                    f"the sha256 of the weights file {self.weights!r} (or weights: none / imagenet)")


def run_pretrain(
    params: PretrainParams, prepared: Path, on_epoch: Callable[[int, float], None] | None = None
) -> tuple[Backbone, dict]:
    """Build the backbone and adapt it to `prepared`'s training images; `on_epoch(epoch, loss)` sees ssl's progress."""
    stats = load_stats(prepared)
    pre = stats.preprocessing
    check_input_size(params.arch, pre.image_size)
    torch.manual_seed(params.seed)
    hw = hardware.select(params.device, params.precision, key="pretrain.device")
    backbone = build_backbone(params.arch, pre.channels, params.weights, params.sha256, params.grayscale)
    record: dict = {"method": params.adapt, "hardware": hw.describe()}
    source = backbone.weights_info.get("source_model")
    if source is not None:  # a previous medtl model: say where its preprocessing differs from this project's
        from medtl.model.lineage import preprocessing_mismatch, warn_mismatch

        source["preprocessing_mismatch"] = preprocessing_mismatch(source.get("preprocessing"), pre.to_dict())
        warn_mismatch(source["preprocessing_mismatch"], params.weights)
    if params.adapt == "none":
        return backbone, record
    # The prepared training images only (memory-mapped): adaptation never opens labels or other splits.
    train = load_images(prepared, "train", stats)
    normalize = Normalize(pre.mean, pre.std).to(hw.device)
    if params.adapt == "adabn":
        backbone.to(hw.device)
        record.update(adabn(backbone, normalize, train, params.batch_size, hw))
        backbone.cpu()
    elif params.adapt == "ssl":
        with temporary_workdir() as tmp:
            extra, extra_info = extra_pool(params.ssl, pre, Path(tmp))
            pool = ImagePool([train, *extra])
            record.update(train_ssl(backbone, normalize, pool, params.ssl, hw, on_epoch))
            del pool, extra  # release the memory map before its folder goes
        record["images"] = len(train) + (extra_info["images"] if extra_info else 0)
        record["image_sources"] = {"train": len(train), "extra": extra_info}
    else:  # PretrainParams' Literal already refuses other names
        raise MedtlError(f"pretrain.adapt: unknown method {params.adapt!r}; choose one of {', '.join(ADAPT_METHODS)}")
    return backbone, record
