"""A previous medtl model as the starting point: its backbone (and head, when the classes match) start the new one.

`pretrain.weights` may name another project's models/model.pt, pinned by
`pretrain.sha256` like any weights file. Its backbone initialises this
project's (the first convolution adapted across channel counts as for ImageNet
weights), and the backbone record carries the lineage: the source model's
sha256, architecture, classes and preprocessing record, and the sha256 of its
own provenance record when one lies beside it, so a reviewer can follow model
A -> model B. Fine-tune reuses the source head when the class lists are equal.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torchvision.models import get_model

from medtl.errors import ParamsError
from medtl.io import sha256_file
from medtl.model.backbones import SUPPORTED, Backbone, check_arch

MODEL_FORMAT_PREFIX = "medtl-model/"
# What the new project must share with the source model for its features to mean the same.
COMPARED = ("image_size", "channels", "resize", "window")
PROVENANCE_NAMES = ("{name}.provenance.json", "provenance.json")


def is_model_file(loaded: Any) -> bool:
    return isinstance(loaded, dict) and str(loaded.get("format", "")).startswith(MODEL_FORMAT_PREFIX)


def _source_provenance(path: Path) -> dict | None:
    """The sha256 of the source model's provenance record, when one lies beside the file."""
    for pattern in PROVENANCE_NAMES:
        candidate = path.with_name(pattern.format(name=path.name))
        if candidate.is_file():
            return {"file": candidate.name, "sha256": sha256_file(candidate)}
    return None


def check_model_file(loaded: dict, arch: str, path: str) -> None:
    from medtl.model.model_file import MODEL_FORMAT

    if loaded.get("format") != MODEL_FORMAT:
        raise ParamsError(f"pretrain.weights: {path} is a medtl model of format {loaded.get('format')!r}; this medtl "
                          f"reads {MODEL_FORMAT!r} (retrain the source project with this medtl)")
    if loaded.get("arch") != arch:
        raise ParamsError(f"pretrain.weights: {path} is a {loaded.get('arch')} model but pretrain.arch is {arch}; "
                          f"set pretrain.arch: {loaded.get('arch')} to start from it (a model's backbone initialises "
                          "only the same architecture)")
    backbone = loaded.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("state_dict"), dict) \
            or not isinstance(loaded.get("head"), dict) or not isinstance(loaded.get("classes"), list):
        raise ParamsError(f"pretrain.weights: {path} says it is a medtl model but lacks its backbone, head or classes")


def lineage_record(loaded: dict, path: str, sha256: str) -> dict[str, Any]:
    """What the backbone record and the audit say about the source model (plain values, no tensors)."""
    return {
        "name": "medtl-model",
        "origin": str(path),
        "sha256": sha256,
        "source_model": {
            "sha256": sha256,
            "arch": loaded["arch"],
            "classes": list(loaded["classes"]),
            "preprocessing": loaded.get("preprocessing"),
            "strategy": loaded.get("strategy"),
            "provenance": _source_provenance(Path(path)),
            # The source's own starting point: lineage chains A -> B -> C.
            "weights": (loaded["backbone"].get("weights") or {}),
        },
    }


def _first_conv_for(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """The source's first-convolution filters for `channels` inputs, same response to a gray image."""
    if weight.shape[1] == channels:
        return weight
    if channels == 1:  # RGB filters summed over colour, as for ImageNet weights
        return weight.sum(dim=1, keepdim=True)
    # A gray filter spread over three equal channels: sum_c (w/3) g = w g on a gray image.
    return (weight / 3).expand(-1, channels, -1, -1).contiguous()


def backbone_from_model(arch: str, loaded: dict, in_channels: int, grayscale: str, path: str, sha256: str) -> Backbone:
    """This project's backbone, initialised from the medtl model `loaded` (already hash-checked)."""
    check_arch(arch)
    check_model_file(loaded, arch, path)
    state = {k.removeprefix("model."): v.float() if v.is_floating_point() else v
             for k, v in loaded["backbone"]["state_dict"].items()}
    conv_key = SUPPORTED[arch].first_conv + ".weight"
    conv_channels = 1 if in_channels == 1 and grayscale == "adapt" else 3
    if conv_key not in state:
        raise ParamsError(f"pretrain.weights: {path} lacks the first convolution of {arch} ({conv_key})")
    state[conv_key] = _first_conv_for(state[conv_key], conv_channels)
    info = lineage_record(loaded, path, sha256)
    with torch.device("meta"):
        backbone = Backbone(arch, get_model(arch, weights=None), in_channels, grayscale, info)
    try:
        backbone.load_state_dict({f"model.{k}": v for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ParamsError(f"pretrain.weights: {path} does not hold {arch} weights: {str(e).splitlines()[0]}") from e
    backbone.source_head = source_head(loaded)  # saved beside the backbone by pretrain-adapt, not a parameter
    return backbone


def source_head(loaded: dict) -> dict[str, Any]:
    """The source model's head, kept in models/backbone.pt for fine-tune to reuse when the classes match."""
    return {"classes": list(loaded["classes"]), "dropout": float(loaded.get("dropout", 0.0)),
            "state_dict": {k: v.detach().cpu() for k, v in loaded["head"].items()}}


def preprocessing_mismatch(source: dict | None, target: dict) -> list[dict[str, Any]]:
    """The preprocessing settings where the source model and this project differ."""
    if not isinstance(source, dict):
        return [{"key": "preprocessing", "source": None, "this_project": "recorded"}]
    out = []
    for key in COMPARED:
        a = source.get("read", {}).get(key) if key == "window" else source.get(key)
        b = target.get("read", {}).get(key) if key == "window" else target.get(key)
        if a != b:
            out.append({"key": key, "source": a, "this_project": b})
    return out


def warn_mismatch(mismatch: list[dict[str, Any]], path: str) -> None:
    for m in mismatch:
        print(f"pretrain-adapt: warning: the source model {path} was trained with {m['key']} {m['source']!r}, "
              f"this project uses {m['key']} {m['this_project']!r}; its features may not transfer as well",
              file=sys.stderr)


def initial_head(head: torch.nn.Module, source: dict | None, classes: list[str]) -> str:
    """Load the source model's head into `head` when its classes are this project's, in order; say which it is."""
    if not source:
        return "new"
    if list(source["classes"]) != list(classes):
        print(f"fine-tune: the source model's classes {source['classes']} differ from {list(classes)}; "
              "a new head is trained", file=sys.stderr)
        return "new (source classes differ)"
    head.load_state_dict(source["state_dict"])
    return "source model"
