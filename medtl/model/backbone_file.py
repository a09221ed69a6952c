"""models/backbone.pt on disk, its one writer and reader: the backbone's state (arch, in_channels,
num_features, grayscale, weights with name, origin and sha256, state_dict), what pretrain-adapt did
(`adaptation`: method, images, epochs, loss curve) and, when it started from another project's model
whose classes match, that model's head (`source_head`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medtl.errors import MedtlError

PROJECT_BACKBONE = Path("models/backbone.pt")  # where the pipeline (dvc.yaml) puts it


def save_backbone_file(path: str | Path, state: dict[str, Any], adaptation: dict[str, Any],
                       source_head: dict[str, Any] | None = None) -> None:
    """`state` from medtl.model.backbones.backbone_state."""
    from medtl.io import save_torch

    head = {"source_head": source_head} if source_head else {}
    save_torch({**state, "adaptation": adaptation, **head}, path)


def read_backbone_file(path: str | Path) -> dict[str, Any]:
    from medtl.io import load_torch

    ckpt = load_torch(path)
    if not isinstance(ckpt, dict):
        raise MedtlError(f"{path} is not a backbone file written by pretrain-adapt (expected a dict)")
    return ckpt


def load_backbone(path: str | Path):
    """(the backbone, the file's dict)."""
    from medtl.model.backbones import backbone_from_state

    ckpt = read_backbone_file(path)
    return backbone_from_state(ckpt), ckpt
