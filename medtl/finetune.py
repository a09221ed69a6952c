"""fine-tune: a new head for the classes on top of the adapted backbone.

Strategies: `linear` (frozen backbone, the classic linear probe), `partial`
(the last N backbone stages train), `full`, and `gradual` (one more stage
unfreezes every K epochs, from the output towards the input). Earlier stages
can get smaller learning rates (layer-wise decay).

A frozen backbone is run once per split and its features cached: training the
head for many epochs must not cost as many forward passes of the backbone.

Every random stream (batch order, augmentation, dropout) restarts each epoch
from a seed derived from (seed, epoch, rank), so the state after an epoch is
the weights, the optimiser and the scheduler; a run resumed from any epoch
ends with the same bytes as one that was never interrupted.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medtl import distributed, hardware
from medtl.checkpoint import ResumeFile, code_digest, input_digest, resume_key
from medtl.data import AugmentParams, TrainBatches, build_augment
from medtl.distributed import EpochBatches, World, derive_seed
from medtl.errors import ParamsError
from medtl.inference import forward_batches
from medtl.metrics import predict_labels, roc_auc
from medtl.model import Classifier, load_backbone, model_file
from medtl.params import Device, Precision, require, require_batch_size
from medtl.prepared import PreparedSplit, load_split, load_stats

STRATEGIES = ("linear", "partial", "full", "gradual")


@dataclass(frozen=True)
class FinetuneParams:
    strategy: Literal["linear", "partial", "full", "gradual"] = "full"
    unfreeze_stages: int = 2  # partial: how many backbone stages train, counted from the output
    unfreeze_every: int = 2  # gradual: epochs between unfreezing one more stage
    layer_decay: float = 1.0  # learning rate x layer_decay**d for a stage d stages below the head
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 0.001
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0001
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = 0
    step_epochs: int = 5  # step schedule: multiply the rate by step_gamma every step_epochs
    step_gamma: float = 0.1
    epochs: int = 15
    batch_size: int = 32  # the global batch, split across processes under torchrun
    patience: int = 6
    monitor: Literal["val_auc", "val_loss", "val_accuracy"] = "val_auc"
    class_weighting: bool = True  # inverse-frequency weights in the loss
    sampler: Literal["shuffle", "balanced"] = "shuffle"  # balanced: draw classes equally often
    label_smoothing: float = 0.0
    dropout: float = 0.0
    augment: AugmentParams = field(default_factory=AugmentParams)
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"
    nproc: int = 1  # >1: the stage relaunches itself under torchrun with this many processes

    def check(self, key: str) -> None:
        require(0 < self.lr < 10, f"{key}.lr", self.lr, "a learning rate between 0 and 10")
        require(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, "a non-negative number")
        require(0 <= self.momentum < 1, f"{key}.momentum", self.momentum, "a number in [0, 1)")
        require(0 < self.layer_decay <= 1, f"{key}.layer_decay", self.layer_decay, "a number in (0, 1] (1: one rate for all)")
        require(self.unfreeze_stages >= 1, f"{key}.unfreeze_stages", self.unfreeze_stages, "a positive integer")
        require(self.unfreeze_every >= 1, f"{key}.unfreeze_every", self.unfreeze_every, "a positive integer")
        require(self.epochs >= 1, f"{key}.epochs", self.epochs, "a positive integer")
        require(0 <= self.warmup_epochs < self.epochs, f"{key}.warmup_epochs", self.warmup_epochs,
                f"a non-negative integer below epochs ({self.epochs})")
        require(self.step_epochs >= 1, f"{key}.step_epochs", self.step_epochs, "a positive integer")
        require(0 < self.step_gamma <= 1, f"{key}.step_gamma", self.step_gamma, "a number in (0, 1]")
        require_batch_size(self.batch_size, f"{key}.batch_size", least=2)
        require(self.patience >= 1, f"{key}.patience", self.patience, "a positive integer")
        require(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        require(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "a number in [0, 1)")
        require(self.nproc >= 1, f"{key}.nproc", self.nproc, "a positive integer")
        require(self.batch_size % self.nproc == 0, f"{key}.batch_size", self.batch_size,
                f"a multiple of nproc ({self.nproc}): it is the global batch, split evenly across processes")
        limit, why = hardware.max_processes(self.device)
        require(self.nproc <= max(1, limit), f"{key}.nproc", self.nproc, f"at most {max(1, limit)}, {why}")
        require(not (self.class_weighting and self.sampler == "balanced"), f"{key}.class_weighting", self.class_weighting,
                "false when sampler is 'balanced' (the balanced sampler already corrects the imbalance; "
                "weighting the loss as well would over-correct)")


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


def balanced_row_weights(labels: np.ndarray, k: int) -> np.ndarray:
    """Per-row sampling weights under which every present class is drawn equally often."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return 1.0 / counts[labels]


def make_optimizer(name: str, groups, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, params: FinetuneParams, steps_per_epoch: int) -> float:
    """Multiplier of the base rates at optimiser step `step`: linear warmup, then the schedule."""
    warm = params.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if params.schedule == "constant":
        return 1.0
    if params.schedule == "step":
        return params.step_gamma ** ((step // steps_per_epoch) // params.step_epochs)
    total = params.epochs * steps_per_epoch
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def trained_stages(params: FinetuneParams, epoch: int, n_stages: int) -> int:
    """How many backbone stages, counted from the output, train in `epoch`."""
    if params.strategy == "linear":
        return 0
    if params.strategy == "full":
        return n_stages
    if params.strategy == "partial":
        return params.unfreeze_stages
    return min(n_stages, epoch // params.unfreeze_every)  # gradual: the head alone first


def param_groups(model: Classifier, params: FinetuneParams) -> list[dict]:
    """One optimiser group per backbone stage (input to output), then the head; rates decay away from the head.

    Frozen stages stay in the optimiser: their gradients are None, which AdamW and
    SGD skip, so gradual unfreezing needs no new optimiser (and resuming none either).
    """
    if params.strategy == "linear":
        return [{"params": list(model.head.parameters()), "lr": params.lr, "name": "head"}]
    stages = model.backbone.stages()
    groups = [{"params": ps, "lr": params.lr * params.layer_decay ** (len(stages) - i), "name": name}
              for i, (name, ps) in enumerate(stages) if ps]
    return groups + [{"params": list(model.head.parameters()), "lr": params.lr, "name": "head"}]


def freeze(model: Classifier, n_trained: int) -> set[int]:
    """Train the last `n_trained` backbone stages and the head; return the ids of frozen parameters."""
    stages = model.backbone.stages()
    frozen: set[int] = set()
    for i, (_, ps) in enumerate(stages):
        train = i >= len(stages) - n_trained
        for p in ps:
            p.requires_grad_(train)
            if not train:
                frozen.add(id(p))
    model.head.requires_grad_(True)
    return frozen


def set_train_mode(model: Classifier, frozen: set[int]) -> None:
    """Training mode, except batch norm in frozen stages keeps its statistics (eval mode)."""
    model.train()
    for m in model.backbone.modules():
        if isinstance(m, _BatchNorm) and m.weight is not None and id(m.weight) in frozen:
            m.eval()
    if all(id(p) in frozen for p in model.backbone.parameters()):
        model.backbone.eval()


def forward_split(fn, images: np.ndarray, batch_size: int, hw: hardware.Hardware, desc: str, world: World) -> torch.Tensor:
    """`forward_batches` over a whole split, each rank doing its share."""
    local = forward_batches(fn, images[distributed.shard(len(images), world)], batch_size, hw, desc)
    return distributed.gather_rows(local, world, len(images))


def validation_metrics(logits: torch.Tensor, labels: np.ndarray, loss_fn: nn.Module) -> dict[str, float]:
    y = torch.from_numpy(labels)
    probs = torch.softmax(logits, dim=1).numpy()
    out = {"val_loss": float(loss_fn(logits, y)), "val_accuracy": float((predict_labels(probs) == labels).mean())}
    # The evaluate stage's AUC (macro one-vs-rest for K > 2); undefined (NaN) on a one-class split.
    auc = roc_auc(labels, probs)
    out["val_auc"] = float("nan") if auc is None else float(auc)
    return out


def _score(metrics: dict[str, float], monitor: str) -> float:
    v = metrics[monitor]
    if math.isnan(v):  # AUC undefined on a one-class validation split: fall back to the loss
        return -metrics["val_loss"]
    return -v if monitor == "val_loss" else v


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


@dataclass
class _Loop:
    """What one epoch of training needs, whatever the strategy."""

    module: nn.Module  # what the optimiser trains: the head (linear) or the whole classifier
    batches: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
    inputs: Callable[[torch.Tensor], torch.Tensor]  # batch -> what `module` takes
    val_logits: Callable[[], torch.Tensor]


def _build_loop(params: FinetuneParams, model: Classifier, train: PreparedSplit, val: PreparedSplit,
                hw: hardware.Hardware, world: World, cache_features: bool) -> tuple[_Loop, TrainBatches | None]:
    eval_bs = max(64, params.batch_size)
    if params.strategy == "linear" and cache_features:
        model.backbone.eval()
        train_f = forward_split(model.features, train.images, eval_bs, hw, "features train", world)
        val_f = forward_split(model.features, val.images, eval_bs, hw, "features val", world)
        labels = torch.from_numpy(train.labels)

        def cached(index: list[int]):
            idx = torch.as_tensor(index, dtype=torch.long)
            return train_f[idx], labels[idx]
        return _Loop(model.head, cached, lambda f: f, lambda: model.head(val_f.to(hw.device)).float().cpu()), None

    source = TrainBatches(train.images, train.labels, build_augment(params.augment), pin_memory=hw.device.type == "cuda")
    if params.strategy == "linear":  # the frozen backbone forwarded every step: the reference for the cache

        def features(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), hw.autocast():
                return model.features(x).float()
        val_logits = lambda: forward_split(model, val.images, eval_bs, hw, "val", world)  # noqa: E731
        return _Loop(model.head, source.batch, features, val_logits), source
    val_logits = lambda: forward_split(model, val.images, eval_bs, hw, "val", world)  # noqa: E731
    return _Loop(model, source.batch, lambda x: x, val_logits), source


def fit(params: FinetuneParams, model: Classifier, train: PreparedSplit, val: PreparedSplit,
        hw: hardware.Hardware, log: Callable[[int, dict], None] | None = None, *,
        world: World = World(), resume: ResumeFile | None = None, cache_features: bool = True) -> dict:
    """Train, keep the best epoch by `params.monitor`, and load its weights into `model`.

    Returns best_epoch (counted from 1), best (its validation metrics), epochs_run,
    history (one row per epoch; row["epoch"] counts from 0) and resumed_from.

    With `resume`, the state is saved after every epoch (by rank 0) and a saved
    state of the same run is continued. `log` receives every epoch's row, the
    resumed ones first, so curves are neither lost nor duplicated.
    """
    k = model.head[-1].out_features
    seed_everything(params.seed)
    weight = class_weights(train.labels, k) if params.class_weighting else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=params.label_smoothing).to(hw.device)
    val_loss_fn = nn.CrossEntropyLoss()
    n_stages = len(model.backbone.stages())
    if params.strategy == "partial" and params.unfreeze_stages > n_stages:
        raise ParamsError(f"params key 'finetune.unfreeze_stages' has value {params.unfreeze_stages}; "
                          f"expected at most {n_stages}, the number of stages of {model.backbone.arch} "
                          f"({', '.join(n for n, _ in model.backbone.stages())})")
    model.to(hw.device)
    if hw.channels_last:
        model.to(memory_format=torch.channels_last)
    freeze(model, trained_stages(params, 0, n_stages))

    loop, source = _build_loop(params, model, train, val, hw, world, cache_features)
    sampler = EpochBatches(len(train.labels), params.batch_size, params.seed, world,
                           balanced_row_weights(train.labels, k) if params.sampler == "balanced" else None)
    steps = len(sampler)
    optimizer = make_optimizer(params.optimizer, param_groups(model, params), params.lr, params.weight_decay, params.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, params, steps))
    scaler = torch.amp.GradScaler(hw.device.type, enabled=hw.precision == "fp16")

    best: dict[str, Any] = {"score": -math.inf, "epoch": -1, "metrics": {}, "state": None}
    history: list[dict] = []
    start, stopped = 0, False
    if resume is not None and world.is_main:
        resume.clean_partial()
    saved = resume.load() if resume is not None else None
    if saved is not None:
        loop.module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        best, history, stopped = saved["best"], saved["history"], saved["stopped"]
        start = saved["epoch"] + 1
        if log:
            for row in history:
                log(row["epoch"], row)

    ddp, ddp_trained = None, -1
    for epoch in tqdm(range(start, params.epochs), desc="fine-tune", unit="epoch", leave=False, disable=stopped):
        if stopped:
            break
        n_trained = trained_stages(params, epoch, n_stages)
        frozen = freeze(model, n_trained)
        if world.distributed and n_trained != ddp_trained:  # DDP hooks only the parameters that train
            ddp = DistributedDataParallel(loop.module, device_ids=[hw.device.index] if hw.device.type == "cuda" else None)
            ddp_trained = n_trained
        net = ddp if ddp is not None else loop.module
        set_train_mode(model, frozen)
        sampler.set_epoch(epoch)
        if source is not None:
            source.reseed(derive_seed(params.seed, epoch, "augment", world.rank))
        torch.manual_seed(derive_seed(params.seed, epoch, "torch", world.rank))  # dropout

        total, n = 0.0, 0
        for index in sampler:
            x, y = loop.batches(index)
            x, y = x.to(hw.device, non_blocking=True), y.to(hw.device, non_blocking=True)
            if hw.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            x = loop.inputs(x)
            with hw.autocast():
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        total, n = distributed.all_reduce_sum([total, float(n)], world)

        model.eval()
        with torch.no_grad():
            vm = validation_metrics(loop.val_logits(), val.labels, val_loss_fn)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), **vm, "lr": optimizer.param_groups[-1]["lr"]}
        history.append(row)
        if log:
            log(epoch, row)
        score = _score(vm, params.monitor)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, "metrics": vm, "state": _cpu_state(loop.module)}
        elif epoch - best["epoch"] >= params.patience:
            stopped = True
        stopped = distributed.broadcast_flag(stopped, world)
        if resume is not None and world.is_main:
            resume.save({"epoch": epoch, "stopped": stopped, "module": _cpu_state(loop.module),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "best": best, "history": list(history)})
    if resume is not None:
        resume.wait()
    distributed.barrier(world)

    loop.module.load_state_dict(best["state"])
    model.requires_grad_(True)
    model.cpu().to(memory_format=torch.contiguous_format).eval()
    # Epochs are counted from 1 in every record (model file, dvclive steps, the stage's summary line).
    return {"best_epoch": best["epoch"] + 1, "best": best["metrics"], "epochs_run": len(history), "history": history,
            "resumed_from": start if saved is not None else None}


def run_finetune(params: FinetuneParams, backbone_path: Path, prepared: Path,
                 log: Callable[[int, dict], None] | None = None, *, resume_path: Path | None = None,
                 world: World | None = None) -> tuple[dict, dict]:
    """Return (model checkpoint dict, training summary)."""
    world = world or World()
    stats = load_stats(prepared)
    pre = stats.preprocessing
    backbone, bb_ckpt = load_backbone(backbone_path)
    hw = hardware.select(params.device, params.precision, key="finetune.device")
    hw = hardware.Hardware(distributed.device_for(world, hw.device), hw.precision)
    distributed.init(world, hw.device.type)
    if world.is_main:
        d = hw.describe()
        print(f"fine-tune: {params.strategy} on {d['device']} ({d.get('gpu', 'CPU')}), precision {d['precision']}, "
              f"channels_last {d['channels_last']}, {world.size} process(es)", file=sys.stderr)
    seed_everything(params.seed)
    model = Classifier(backbone, len(pre.classes), pre.mean, pre.std, params.dropout)
    train, val = load_split(prepared, "train", stats), load_split(prepared, "val", stats)
    resume = None
    if resume_path is not None:
        files = [backbone_path, prepared / "stats.json"] + [prepared / f"{s}.{e}" for s in ("train", "val") for e in ("npy", "csv")]
        key = resume_key(params, input_digest(files),
                         {"world_size": world.size, "device": hw.device.type, "precision": hw.precision,
                          "torch": torch.__version__, "code": code_digest()})
        resume = ResumeFile(resume_path, key)
    summary = fit(params, model, train, val, hw, log, world=world, resume=resume)
    ckpt = model_file(
        model, pre,
        strategy=params.strategy,
        hardware={**hw.describe(), "processes": world.size},
        params=asdict(params),
        best_epoch=summary["best_epoch"],
        validation=summary["best"],
        adaptation=bb_ckpt.get("adaptation", {}),
    )
    return ckpt, summary
