"""The classifier: normalisation -> backbone -> head, saved with what inference needs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtl.backbones import Backbone, backbone_from_state
from medtl.errors import MedtlError
from medtl.io import load_torch


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
        return self.head(self.features(x))


def load_backbone(path: str | Path) -> tuple[Backbone, dict[str, Any]]:
    ckpt = load_torch(path)
    return backbone_from_state(ckpt), ckpt


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier saved by fine-tune; the dict carries classes and preprocessing."""
    ckpt = load_torch(path)
    try:
        backbone = backbone_from_state(ckpt["backbone"])
        pre = ckpt["preprocessing"]
        model = Classifier(backbone, len(ckpt["classes"]), pre["mean"], pre["std"], ckpt.get("dropout", 0.0))
        model.head.load_state_dict(ckpt["head"])
    except (KeyError, TypeError) as e:
        raise MedtlError(f"{path} is not a medtl model file (missing {e})") from e
    model.eval()
    return model, ckpt
