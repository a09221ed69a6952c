"""The backbone a run starts from: an architecture with its starting weights (none, ImageNet, a pinned
file, or another project's model with its lineage)."""
from __future__ import annotations

from medtl.model import lineage
from medtl.model import weights as weights_mod
from medtl.model.backbones import Backbone, _check_channels, check_arch


def build_backbone(arch: str, in_channels: int = 1, weights: str = "none", sha256: str | None = None, grayscale: str = "adapt") -> Backbone:
    """Build `arch` with `weights` ("none", "imagenet" or a file pinned by `sha256`)."""
    check_arch(arch)
    _check_channels(in_channels, grayscale)
    if isinstance(weights, str) and weights.strip() and weights not in ("none", "imagenet"):
        loaded = weights_mod.load_pinned(weights, sha256)
        if lineage.is_model_file(loaded):  # another project's models/model.pt
            return lineage.backbone_from_model(arch, loaded, in_channels, grayscale, weights, weights_mod.check_sha256(sha256))
        model, info = weights_mod.model_from_file(arch, loaded, weights, sha256)
        return Backbone(arch, model, in_channels, grayscale, info)
    model, info = weights_mod.load_model(arch, weights, sha256)
    return Backbone(arch, model, in_channels, grayscale, info)
