"""evaluate: the model on the test split -> metrics, predictions and plot data."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve

from medtl import hardware
from medtl.finetune import forward_batches
from medtl.io import atomic_dir, atomic_path, write_json
from medtl.metrics import compute_metrics
from medtl.model import load_classifier
from medtl.params import Device, Precision, require
from medtl.preprocess import load_split, load_stats


@dataclass(frozen=True)
class EvaluateParams:
    split: str = "test"
    batch_size: int = 64
    device: Device = "auto"
    precision: Precision = "auto"

    def check(self, key: str) -> None:
        require(self.split in ("val", "test"), f"{key}.split", self.split, "'test' (or 'val' while developing)")
        require(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "a positive integer")


def predict_probs(model_path: Path, prepared: Path, split: str, batch_size: int, hw: hardware.Hardware):
    model, ckpt = load_classifier(model_path)
    stats = load_stats(prepared)
    for key in ("size", "channels"):
        if stats[key] != ckpt["preprocessing"][key]:
            from medtl.errors import MedtlError

            raise MedtlError(f"{model_path} expects {key} {ckpt['preprocessing'][key]} but {prepared} has {stats[key]}; "
                             "rerun the pipeline (dvc repro) so model and data match")
    data = load_split(prepared, split)
    model.to(hw.device)
    if hw.channels_last:
        model.to(memory_format=torch.channels_last)
    logits = forward_batches(model, data.images, batch_size, hw, f"evaluate {split}")
    return torch.softmax(logits, dim=1).numpy().astype(np.float64), data, ckpt


def run_evaluate(params: EvaluateParams, model_path: Path, prepared: Path, out_dir: Path) -> dict:
    hw = hardware.select(params.device, params.precision, key="evaluate.device")
    probs, data, ckpt = predict_probs(model_path, prepared, params.split, params.batch_size, hw)
    classes = ckpt["classes"]
    metrics = compute_metrics(data.labels, probs, classes)
    metrics = {"split": params.split, **metrics}
    with atomic_dir(out_dir / "plots") as plots:
        _write_plots(plots, data.labels, probs, classes)
    with atomic_path(out_dir / "predictions.csv") as tmp:
        _write_predictions(tmp, data, probs, classes)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _write_predictions(path: Path, data, probs: np.ndarray, classes: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "group", "label", "predicted"] + [f"prob_{c}" for c in classes])
        for row, y, p in zip(data.rows, data.labels, probs):
            w.writerow([row["image_id"], row["group"], classes[y], classes[int(p.argmax())]] + [f"{v:.6f}" for v in p])


def _write_plots(plots: Path, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    pred = probs.argmax(1)
    write_json(plots / "confusion.json", [{"actual": classes[a], "predicted": classes[b]} for a, b in zip(labels, pred)])
    rows = []
    if len(np.unique(labels)) > 1:
        # one-vs-rest curve for the positive class (binary) or the first class otherwise
        pos = 1 if len(classes) == 2 else 0
        fpr, tpr, thr = roc_curve(labels == pos, probs[:, pos])
        rows = [{"fpr": float(a), "tpr": float(b), "threshold": float(min(c, 1.0))} for a, b, c in zip(fpr, tpr, thr)]
    write_json(plots / "roc.json", rows)
