"""torchvision backbones by name, with the classifier head removed and grayscale input handled.

A backbone maps images (N, C, H, W) to features (N, num_features). Grayscale
images are handled by adapting the first convolution (its RGB filters summed
into one channel), which keeps the pretrained response to intensity, rather
than by copying the gray channel three times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import get_model

from medtl.errors import MedtlError, ParamsError


Stages = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class ArchSpec:
    """Where torchvision keeps the parts we change, as submodule paths."""

    first_conv: str
    head: str  # the final Linear that maps features to ImageNet classes
    # Named groups of parameter-name prefixes, from the input to the output: the units of
    # partial unfreezing and discriminative learning rates.
    stages: Stages
    input_size: int | None = None  # the only input size the model accepts, if fixed


def _features(groups: dict[str, tuple[int, ...]], top_extra: tuple[str, ...] = ()) -> Stages:
    """Stages made of `features.<i>` blocks; `top_extra` joins the last group."""
    out = [(name, tuple(f"features.{i}." for i in idx)) for name, idx in groups.items()]
    last_name, last = out[-1]
    out[-1] = (last_name, last + top_extra)
    return tuple(out)


_RESNET = (("stem", ("conv1.", "bn1.")), *((f"layer{i}", (f"layer{i}.",)) for i in range(1, 5)))
_DENSENET = (
    ("stem", ("features.conv0.", "features.norm0.")),
    *((f"block{i}", (f"features.denseblock{i}.", f"features.transition{i}.")) for i in range(1, 4)),
    ("block4", ("features.denseblock4.", "features.norm5.")),
)
_EFFICIENTNET = _features({"stem": (0,), **{f"stage{i}": (i,) for i in range(1, 8)}, "top": (8,)})
_CONVNEXT = _features(
    {"stem": (0,), "stage1": (1,), "stage2": (2, 3), "stage3": (4, 5), "stage4": (6, 7)},
    top_extra=("classifier.0.",),  # the final LayerNorm
)
# Grouped where the resolution halves (torchvision's stride-2 blocks).
_MOBILENET_V3_LARGE = _features(
    {"stem": (0, 1), "stage1": (2, 3), "stage2": (4, 5, 6), "stage3": tuple(range(7, 13)),
     "stage4": (13, 14, 15), "top": (16,)},
    top_extra=("classifier.0.",),  # the pretrained 960 -> 1280 Linear
)
# One group per resolution (the convolutions between max-pools), then the two pretrained 4096-wide layers.
_VGG16_BN = (
    *((name, tuple(f"features.{i}." for i in range(lo, hi)))
      for name, lo, hi in (("stem", 0, 6), ("block2", 7, 13), ("block3", 14, 23), ("block4", 24, 33), ("block5", 34, 43))),
    ("top", ("classifier.0.", "classifier.3.")),
)
_VIT = (
    ("stem", ("conv_proj.", "class_token", "encoder.pos_embedding")),
    *((f"layer{i}", (f"encoder.layers.encoder_layer_{i}.",)) for i in range(12)),
    ("top", ("encoder.ln.",)),
)

SUPPORTED: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("conv1", "fc", _RESNET),
    "resnet34": ArchSpec("conv1", "fc", _RESNET),
    "resnet50": ArchSpec("conv1", "fc", _RESNET),
    "densenet121": ArchSpec("features.conv0", "classifier", _DENSENET),
    "efficientnet_b0": ArchSpec("features.0.0", "classifier.1", _EFFICIENTNET),
    "efficientnet_b1": ArchSpec("features.0.0", "classifier.1", _EFFICIENTNET),
    "efficientnet_b2": ArchSpec("features.0.0", "classifier.1", _EFFICIENTNET),
    "efficientnet_b3": ArchSpec("features.0.0", "classifier.1", _EFFICIENTNET),
    # The LayerNorm and Flatten before the final Linear stay: they belong to the features.
    "convnext_tiny": ArchSpec("features.0.0", "classifier.2", _CONVNEXT),
    # The 960 -> 1280 Linear is pretrained and kept; only the 1280 -> 1000 layer goes.
    "mobilenet_v3_large": ArchSpec("features.0.0", "classifier.3", _MOBILENET_V3_LARGE),
    # The classic transfer baseline; fc6 and fc7 (4096 wide, pretrained) stay as features, as is usual.
    "vgg16_bn": ArchSpec("features.0", "classifier.6", _VGG16_BN),
    # torchvision fixes the ViT's position embeddings to a 14x14 grid of 16 px patches.
    "vit_b_16": ArchSpec("conv_proj", "heads.head", _VIT, input_size=224),
}

GRAYSCALE_MODES = ("adapt", "repeat")


def check_arch(arch: str) -> ArchSpec:
    if arch not in SUPPORTED:
        raise ParamsError(f"pretrain.arch: unknown backbone {arch!r}; supported: {', '.join(SUPPORTED)}")
    return SUPPORTED[arch]


def input_size_rule(arch: str) -> int | None:
    """The image size `arch` requires, or None when any reasonable size works."""
    return check_arch(arch).input_size


def check_input_size(arch: str, size: int) -> None:
    required = input_size_rule(arch)
    if required is not None and size != required:
        raise ParamsError(f"pretrain.arch {arch} needs preprocess.image_size {required}, got {size}")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _gray_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-channel copy of `conv` whose filters are the RGB filters summed over colour.

    For a gray image g fed as (g, g, g), sum_c w_c * g equals (sum_c w_c) * g, so
    the adapted layer gives the pretrained network exactly the response it had.
    """
    gray = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        gray.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            gray.bias.copy_(conv.bias)
    return gray


class Backbone(nn.Module):
    """A torchvision network without its classifier head: images -> features."""

    def __init__(self, arch: str, model: nn.Module, in_channels: int, grayscale: str, weights_info: dict[str, Any] | None = None):
        super().__init__()
        spec = check_arch(arch)
        head = model.get_submodule(spec.head)
        if not isinstance(head, nn.Linear):
            raise MedtlError(f"{arch}: expected a Linear classifier at {spec.head}, found {type(head).__name__}")
        self.arch = arch
        self.in_channels = in_channels
        self.grayscale = grayscale
        self.num_features = head.in_features
        self.weights_info = weights_info or {"name": "none", "origin": None, "sha256": None}
        _set_submodule(model, spec.head, nn.Identity())
        # "repeat" keeps the RGB convolution and feeds it three copies in forward.
        self._repeat = in_channels == 1 and grayscale == "repeat"
        if in_channels == 1 and grayscale == "adapt":
            _set_submodule(model, spec.first_conv, _gray_conv(model.get_submodule(spec.first_conv)))
        self.model = model

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.model.get_submodule(SUPPORTED[self.arch].first_conv)

    def stages(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Parameters in named groups from the input to the output; every parameter is in exactly one.

        Partial unfreezing trains the last k groups; discriminative learning rates
        give earlier groups smaller rates.
        """
        groups = SUPPORTED[self.arch].stages
        out: list[tuple[str, list[nn.Parameter]]] = [(name, []) for name, _ in groups]
        for pname, param in self.model.named_parameters():
            index = next((i for i, (_, prefixes) in enumerate(groups) if pname.startswith(prefixes)), None)
            if index is None:
                raise MedtlError(f"{self.arch}: parameter {pname} belongs to no stage")
            out[index][1].append(param)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise MedtlError(f"{self.arch} backbone expects images (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self._repeat:
            x = x.expand(-1, 3, -1, -1)
        return self.model(x)


def _check_channels(in_channels: int, grayscale: str) -> None:
    if in_channels not in (1, 3):
        raise ParamsError(f"backbone in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels} (see preprocess.channels)")
    if grayscale not in GRAYSCALE_MODES:
        raise ParamsError(f"pretrain.grayscale must be one of {', '.join(GRAYSCALE_MODES)}, got {grayscale!r}")


def backbone_state(backbone: Backbone) -> dict[str, Any]:
    """Everything needed to rebuild `backbone`, as plain values and tensors (loadable with weights_only)."""
    return {
        "arch": backbone.arch,
        "in_channels": backbone.in_channels,
        "num_features": backbone.num_features,
        "grayscale": backbone.grayscale,
        "weights": dict(backbone.weights_info),
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
    }


def backbone_from_state(d: dict[str, Any]) -> Backbone:
    """Rebuild a backbone saved by `backbone_state`, without touching the random generator."""
    try:
        arch, in_channels, state = d["arch"], int(d["in_channels"]), d["state_dict"]
        grayscale = d.get("grayscale", "adapt")
    except (KeyError, TypeError, ValueError) as e:
        raise MedtlError(f"backbone checkpoint is missing or has a malformed field: {e}") from e
    check_arch(arch)
    _check_channels(in_channels, grayscale)
    # Built on the meta device: no memory, no random init, then the saved tensors are assigned.
    with torch.device("meta"):
        model = get_model(arch, weights=None)
        backbone = Backbone(arch, model, in_channels, grayscale, d.get("weights"))
    try:
        backbone.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MedtlError(f"backbone checkpoint does not match {arch} with {in_channels} channel(s): {str(e).splitlines()[0]}") from e
    leftover = [n for n, t in [*backbone.named_parameters(), *backbone.named_buffers()] if t.is_meta]
    if leftover:
        raise MedtlError(f"backbone checkpoint for {arch} lacks tensors: {', '.join(leftover[:5])}")
    if "num_features" in d and int(d["num_features"]) != backbone.num_features:
        raise MedtlError(f"backbone checkpoint says num_features {d['num_features']}, but {arch} gives {backbone.num_features}")
    return backbone
