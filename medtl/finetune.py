"""fine-tune: a new head for the classes, with the backbone frozen (linear probe) or trained (full).

A frozen backbone is run once per split and its features cached: training the
head for many epochs must not cost as many forward passes of the backbone.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from medtl import hardware
from medtl.backbones import backbone_state
from medtl.data import ArrayDataset, AugmentParams, build_augment, iter_batches
from medtl.model import Classifier, load_backbone
from medtl.params import Device, Precision, require
from medtl.preprocess import PreparedSplit, load_split, load_stats


@dataclass(frozen=True)
class FinetuneParams:
    strategy: Literal["linear", "full"] = "full"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 0.001
    weight_decay: float = 0.0001
    epochs: int = 15
    batch_size: int = 32
    patience: int = 5
    monitor: Literal["val_auc", "val_loss", "val_accuracy"] = "val_auc"
    class_weighting: bool = True
    label_smoothing: float = 0.0
    dropout: float = 0.0
    augment: AugmentParams = field(default_factory=AugmentParams)
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"

    def check(self, key: str) -> None:
        require(0 < self.lr < 10, f"{key}.lr", self.lr, "a learning rate between 0 and 10")
        require(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, "a non-negative number")
        require(self.epochs >= 1, f"{key}.epochs", self.epochs, "a positive integer")
        require(self.batch_size >= 2, f"{key}.batch_size", self.batch_size, "an integer of at least 2")
        require(self.patience >= 1, f"{key}.patience", self.patience, "a positive integer")
        require(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        require(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "a number in [0, 1)")


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def class_weights(labels: np.ndarray, k: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1, so the rare class counts as much as the common one."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / k, 0.0)
    return torch.tensor(w / w[w > 0].mean(), dtype=torch.float32)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def forward_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int,
                    hw: hardware.Hardware, desc: str) -> torch.Tensor:
    """Apply `fn` to every image in inference mode; float32 results on the CPU."""
    out = []
    for x in tqdm(iter_batches(images, batch_size), total=-(-len(images) // batch_size), desc=desc, leave=False):
        x = x.to(hw.device, non_blocking=True)
        if hw.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with hw.autocast():
            out.append(fn(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def validation_metrics(logits: torch.Tensor, labels: np.ndarray, loss_fn: nn.Module) -> dict[str, float]:
    y = torch.from_numpy(labels)
    probs = torch.softmax(logits, dim=1).numpy()
    out = {"val_loss": float(loss_fn(logits, y)), "val_accuracy": float((probs.argmax(1) == labels).mean())}
    if len(np.unique(labels)) < 2:
        out["val_auc"] = float("nan")
    elif probs.shape[1] == 2:
        out["val_auc"] = float(roc_auc_score(labels, probs[:, 1]))
    else:
        out["val_auc"] = float(roc_auc_score(labels, probs, multi_class="ovr", labels=range(probs.shape[1])))
    return out


def _score(metrics: dict[str, float], monitor: str) -> float:
    v = metrics[monitor]
    if math.isnan(v):  # AUC undefined on a one-class validation split: fall back to the loss
        return -metrics["val_loss"]
    return -v if monitor == "val_loss" else v


def train_one_epoch(module: nn.Module, loader: DataLoader, optimizer, loss_fn, hw: hardware.Hardware) -> float:
    module.train()
    total, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(hw.device, non_blocking=True), y.to(hw.device, non_blocking=True)
        if hw.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with hw.autocast():
            logits = module(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss) * len(y)
        n += len(y)
    return total / max(n, 1)


def fit(params: FinetuneParams, model: Classifier, train: PreparedSplit, val: PreparedSplit,
        hw: hardware.Hardware, log: Callable[[int, dict], None] | None = None) -> dict:
    """Train, keep the best epoch by `params.monitor`, and load its weights into `model`."""
    k = model.head[-1].out_features
    gen = seed_everything(params.seed)
    weight = class_weights(train.labels, k) if params.class_weighting else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=params.label_smoothing).to(hw.device)
    val_loss_fn = nn.CrossEntropyLoss()
    model.to(hw.device)
    if hw.channels_last:
        model.to(memory_format=torch.channels_last)

    if params.strategy == "linear":
        model.backbone.requires_grad_(False)
        model.backbone.eval()
        train_x = forward_batches(model.features, train.images, 64, hw, "features train")
        val_x = forward_batches(model.features, val.images, 64, hw, "features val")
        loader = DataLoader(TensorDataset(train_x, torch.from_numpy(train.labels)), batch_size=params.batch_size,
                            shuffle=True, generator=gen)
        trained, val_forward = model.head, (lambda: model.head(val_x.to(hw.device)).float().cpu())
    else:
        dataset = ArrayDataset(train.images, train.labels, build_augment_seeded(params.augment, params.seed))
        loader = DataLoader(dataset, batch_size=params.batch_size, shuffle=True, generator=gen, drop_last=len(dataset) > params.batch_size,
                            pin_memory=hw.device.type == "cuda")
        trained = model
        val_forward = lambda: forward_batches(model, val.images, 64, hw, "val")  # noqa: E731

    optimizer = make_optimizer(params.optimizer, [p for p in trained.parameters() if p.requires_grad],
                               params.lr, params.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
    best: dict[str, Any] = {"score": -math.inf}
    history = []
    for epoch in tqdm(range(params.epochs), desc="fine-tune", unit="epoch", leave=False):
        train_loss = train_one_epoch(trained, loader, optimizer, loss_fn, hw)
        scheduler.step()
        trained.eval()
        with torch.no_grad():
            vm = validation_metrics(val_forward(), val.labels, val_loss_fn)
        row = {"epoch": epoch, "train_loss": train_loss, **vm}
        history.append(row)
        if log:
            log(epoch, row)
        score = _score(vm, params.monitor)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, "metrics": vm,
                    "state": copy.deepcopy({k2: v.cpu() for k2, v in model.state_dict().items()})}
        elif epoch - best["epoch"] >= params.patience:
            break
    model.load_state_dict(best["state"])
    model.cpu().to(memory_format=torch.contiguous_format).eval()
    return {"best_epoch": best["epoch"], "best": best["metrics"], "epochs_run": len(history), "history": history}


def build_augment_seeded(p: AugmentParams, seed: int):
    aug = build_augment(p)
    if aug is not None:
        aug.set_random_seed(seed)
    return aug


def run_finetune(params: FinetuneParams, backbone_path: Path, prepared: Path,
                 log: Callable[[int, dict], None] | None = None) -> tuple[dict, dict]:
    """Return (model checkpoint dict, training summary)."""
    stats = load_stats(prepared)
    backbone, bb_ckpt = load_backbone(backbone_path)
    hw = hardware.select(params.device, params.precision, key="finetune.device")
    seed_everything(params.seed)
    model = Classifier(backbone, len(stats["classes"]), stats["mean"], stats["std"], params.dropout)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    summary = fit(params, model, train, val, hw, log)
    ckpt = {
        "format": "medtl-model/1",
        "arch": backbone.arch,
        "classes": list(stats["classes"]),
        "backbone": backbone_state(model.backbone),
        "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "dropout": params.dropout,
        "preprocessing": {k: stats[k] for k in ("size", "channels", "resize", "mean", "std")},
        "strategy": params.strategy,
        "hardware": hw.describe(),
        "params": asdict(params),
        "best_epoch": summary["best_epoch"],
        "validation": summary["best"],
        "adaptation": bb_ckpt.get("adaptation", {}),
    }
    return ckpt, summary
