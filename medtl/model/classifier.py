"""The classifier (normalisation -> backbone -> head), built from and into models/model.pt
(medtl.model.model_file reads and writes the file).

The model file is a plain dict (loadable with torch's weights_only): format
version, architecture, classes, backbone and head tensors, and the
preprocessing record (medtl.prepare.imaging.Preprocessing) that turns a file into the
model's input, so a deployed model decodes new files as its test set was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.model.backbones import Backbone, backbone_from_state, backbone_state
from medtl.model.model_file import MODEL_FORMAT, read_model_file
from medtl.prepare.imaging import Preprocessing


class Normalize(nn.Module):
    """Per-channel standardisation with the training split's statistics, carried inside the model."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, mean: list[float], std: list[float], dropout: float = 0.0):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        if torch.is_autocast_enabled(x.device.type):
            # The head runs in fp32 even under bf16/fp16 autocast: reduced-precision logits tie and
            # saturate, which coarsens the ranking (AUC) and the operating threshold fitted on it.
            with torch.autocast(x.device.type, enabled=False):
                return self.head(features.float())
        return self.head(features)


def model_file(model: Classifier, pre: Preprocessing, **record: Any) -> dict[str, Any]:
    """The dict saved as models/model.pt; `record` adds what fine-tune knows (params, best epoch, ...)."""
    if list(pre.classes) != [str(c) for c in pre.classes] or len(pre.classes) != model.head[-1].out_features:
        raise MedtlError(f"the preprocessing record names {len(pre.classes)} classes but the head has "
                         f"{model.head[-1].out_features} outputs")
    return {
        "format": MODEL_FORMAT,
        "arch": model.backbone.arch,
        "classes": list(pre.classes),
        "backbone": backbone_state(model.backbone),
        "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "dropout": float(model.head[0].p),
        "preprocessing": pre.to_dict(),
        **record,
    }


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier saved by fine-tune; the dict carries classes and the preprocessing record."""
    ckpt = read_model_file(path)
    pre = model_preprocessing(ckpt, path)
    try:
        backbone = backbone_from_state(ckpt["backbone"])
        model = Classifier(backbone, len(ckpt["classes"]), pre.mean, pre.std, ckpt.get("dropout", 0.0))
        model.head.load_state_dict(ckpt["head"])
    except (KeyError, TypeError) as e:
        raise MedtlError(f"{path} is not a medtl model file (missing {e})") from e
    model.eval()
    return model, ckpt


def model_preprocessing(ckpt: dict[str, Any], path: str | Path) -> Preprocessing:
    pre = Preprocessing.from_dict(ckpt.get("preprocessing"), str(path))
    if list(pre.classes) != list(ckpt.get("classes") or []):
        raise MedtlError(f"{path}: the preprocessing record's classes {pre.classes} differ from the model's "
                         f"{ckpt.get('classes')}")
    return pre
