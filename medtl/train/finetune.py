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

from medtl import hardware
from medtl.errors import ParamsError
from medtl.io import prefetch
from medtl.metrics import predict_labels, roc_auc
from medtl.model.backbone_file import load_backbone
from medtl.model.classifier import Classifier, model_file
from medtl.model.inference import forward_batches
from medtl.model.lineage import initial_head
from medtl.params import Device, Precision, require, require_batch_size
from medtl.prepare.prepared import PreparedSplit, images_path, load_split, load_stats, rows_path, stats_path
from medtl.train import distributed
from medtl.train.attacks import AdversarialParams, TrainingAttack
from medtl.train.checkpoint import ResumeFile, code_digest, input_digest, resume_key
from medtl.train.data import AugmentParams, TrainBatches, build_augment
from medtl.train.distributed import EpochBatches, World, derive_seed
from medtl.train.domain import Adversary, DomainAdversarialParams, adabn_target, check_adabn_target
from medtl.train.target import TargetParams, check_target, read_target

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
    # balanced: draw classes equally often; site_balanced: sites equally often, classes balanced within each
    sampler: Literal["shuffle", "balanced", "site_balanced"] = "shuffle"
    label_smoothing: float = 0.0
    dropout: float = 0.0
    augment: AugmentParams = field(default_factory=AugmentParams)
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"
    nproc: int = 1  # >1: the stage relaunches itself under torchrun with this many processes
    # Unlabelled images of the deployment site (medtl.train.target), and what is done with them (medtl.train.domain).
    target: TargetParams = field(default_factory=TargetParams)
    target_data: str = "medtl/intake/demo.py"  # what dvc tracks as the target images: the folder that holds them
    adapt: Literal["none", "adabn_target"] = "none"
    domain_adversarial: DomainAdversarialParams = field(default_factory=DomainAdversarialParams)
    adversarial: AdversarialParams = field(default_factory=AdversarialParams)  # medtl.train.attacks

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
        require(not (self.class_weighting and self.sampler != "shuffle"), f"{key}.class_weighting", self.class_weighting,
                f"false when sampler is {self.sampler!r} (the balanced sampler already corrects the imbalance; "
                "weighting the loss as well would over-correct)")
        self.check_target(key)

    def check_target(self, key: str) -> None:
        dann = self.domain_adversarial.enabled
        require(not (dann and self.strategy == "linear"), f"{key}.domain_adversarial.weight", self.domain_adversarial.weight,
                "0 with strategy 'linear' (a frozen backbone cannot align its features); use strategy partial, "
                "full or gradual for domain-adversarial fine-tuning")
        needs = f"to name the target images in {key}.target (its source is 'none')"
        require(self.adapt == "none" or self.target.enabled, f"{key}.adapt", self.adapt, f"'none', or {needs}")
        require(not dann or self.target.enabled, f"{key}.domain_adversarial.weight", self.domain_adversarial.weight,
                f"0, or {needs}")
        check_target(self.target, self.target_data, key)


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


def site_balanced_row_weights(labels: np.ndarray, sites: list[str], k: int) -> np.ndarray:
    """Per-row sampling weights under which every site is drawn equally often, and within a site every class
    it has (a site's missing class is not made up from other sites)."""
    names, site = np.unique(np.asarray(sites, dtype=object).astype(str), return_inverse=True)
    cell = site * k + labels
    counts = np.bincount(cell, minlength=len(names) * k).astype(np.float64)
    classes_at = (counts.reshape(len(names), k) > 0).sum(1)
    return 1.0 / (len(names) * classes_at[site] * counts[cell])


def sampling_weights(sampler: str, train: PreparedSplit, k: int) -> np.ndarray | None:
    """The training rows' sampling weights for `finetune.sampler` (None: a plain shuffle)."""
    if sampler == "balanced":
        return balanced_row_weights(train.labels, k)
    if sampler == "site_balanced":
        sites = [r.get("site", "") for r in train.rows]
        if not any(sites):
            raise ParamsError("params key 'finetune.sampler' has value 'site_balanced', but the training images carry "
                              "no site; expected several sites (ingest.sources, or the demo's ingest.demo.sites), or "
                              "sampler shuffle or balanced")
        return site_balanced_row_weights(train.labels, sites, k)
    return None


def make_optimizer(name: str, groups, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    # fused: one kernel over all tensors per step instead of several per tensor (the AdamW update was
    # ~18% of a ResNet-18 step at 64 px); devices or dtypes without a fused kernel get the plain one
    groups = list(groups)

    def build(fused: bool) -> torch.optim.Optimizer:
        fresh = [dict(g) if isinstance(g, dict) else g for g in groups]  # torch writes its defaults into groups
        if name == "sgd":
            return torch.optim.SGD(fresh, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   nesterov=momentum > 0, fused=fused)
        return torch.optim.AdamW(fresh, lr=lr, weight_decay=weight_decay, fused=fused)

    try:
        return build(True)
    except (RuntimeError, TypeError, ValueError):
        return build(False)


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
    gather: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]  # no random draws: runs in the prefetch thread
    finish: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # augmentation, in this thread
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
        return _Loop(model.head, cached, lambda f, y: (f, y), lambda f: f, lambda: model.head(val_f.to(hw.device)).float().cpu()), None

    source = TrainBatches(train.images, train.labels, build_augment(params.augment), pin_memory=hw.device.type == "cuda")
    if params.strategy == "linear":  # the frozen backbone forwarded every step: the reference for the cache

        def features(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), hw.autocast():
                return model.features(x).float()
        val_logits = lambda: forward_split(model, val.images, eval_bs, hw, "val", world)  # noqa: E731
        return _Loop(model.head, source.gather, source.finish, features, val_logits), source
    val_logits = lambda: forward_split(model, val.images, eval_bs, hw, "val", world)  # noqa: E731
    return _Loop(model, source.gather, source.finish, lambda x: x, val_logits), source


def fit(params: FinetuneParams, model: Classifier, train: PreparedSplit, val: PreparedSplit,
        hw: hardware.Hardware, log: Callable[[int, dict], None] | None = None, *,
        world: World = World(), resume: ResumeFile | None = None, cache_features: bool = True,
        target: np.ndarray | None = None) -> dict:
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

    # Adversarial examples change the input every step: the linear probe's cached features cannot be reused.
    attack = TrainingAttack(params.adversarial, model) if params.adversarial.enabled else None
    loop, source = _build_loop(params, model, train, val, hw, world, cache_features and attack is None)
    sampler = EpochBatches(len(train.labels), params.batch_size, params.seed, world,
                           sampling_weights(params.sampler, train, k))
    steps = len(sampler)
    groups = param_groups(model, params)
    adversary = None
    if params.domain_adversarial.enabled and target is not None:  # DANN: the loop trains classifier + domain classifier
        adversary = Adversary(params.domain_adversarial, params.seed, model, target, build_augment(params.augment),
                              params.epochs * steps, pin_memory=hw.device.type == "cuda")
        adversary.module.to(hw.device)
        loop.module = adversary.module
        groups.insert(len(groups) - 1, adversary.param_group(params.lr))  # the head stays last (the logged lr)
    optimizer = make_optimizer(params.optimizer, groups, params.lr, params.weight_decay, params.momentum)
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
        if adversary is not None:
            adversary.start_epoch(epoch, world)
        if attack is not None:
            attack.reseed(derive_seed(params.seed, epoch, "adversarial", world.rank))  # PGD's random starts

        total, n = 0.0, 0
        for i, (x, y) in enumerate(loop.finish(*b) for b in prefetch(map(loop.gather, sampler))):  # next batch read meanwhile
            x, y = x.to(hw.device, non_blocking=True), y.to(hw.device, non_blocking=True)
            if hw.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if attack is not None:
                x = attack(x, y)
            x = loop.inputs(x)
            with hw.autocast():
                logits = net(x) if adversary is None else adversary.forward(net, x, epoch * steps + i)
            loss = task_loss = loss_fn(logits.float(), y)
            if adversary is not None:
                loss = task_loss + adversary.loss()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += float(task_loss.detach()) * len(y)
            n += len(y)
        total, n = distributed.all_reduce_sum([total, float(n)], world)

        model.eval()
        with torch.no_grad():
            vm = validation_metrics(loop.val_logits(), val.labels, val_loss_fn)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), **vm, "lr": optimizer.param_groups[-1]["lr"]}
        if adversary is not None:
            row.update(adversary.epoch_metrics(world, (epoch + 1) * steps - 1))
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
    head_init = initial_head(model.head, bb_ckpt.get("source_head"), pre.classes)
    train, val = load_split(prepared, "train", stats), load_split(prepared, "val", stats)
    target = None
    if params.adapt == "adabn_target":
        check_adabn_target(backbone, backbone.arch)
    if params.target.enabled:  # read before any training, so a bad target stops the stage at once
        modalities = {str(r.get("modality") or "").upper() for r in train.rows} - {""}
        target = read_target(params.target, "finetune.target", pre, modalities)
    resume = None
    if resume_path is not None:
        files = [backbone_path, stats_path(prepared)] + [f(prepared, s) for s in ("train", "val") for f in (images_path, rows_path)]
        key = resume_key(params, input_digest(files),
                         {"world_size": world.size, "device": hw.device.type, "precision": hw.precision,
                          "torch": torch.__version__, "code": code_digest(),
                          "target": target.record["pixels_sha256"] if target is not None else None})
        resume = ResumeFile(resume_path, key)
    summary = fit(params, model, train, val, hw, log, world=world, resume=resume,
                  target=target.images if target is not None else None)
    target_record = {}
    if target is not None:
        # The pixel digests let evaluate disclose external results scored on images the model was adapted on.
        target_record["target"] = {**target.record, "pixel_digests": sorted(set(target.digests))}
        kept = next((r for r in summary["history"] if r["epoch"] + 1 == summary["best_epoch"]), {})
        if "domain_accuracy" in kept:  # near 0.5: the kept epoch's features no longer tell the sites apart
            target_record["domain_adversarial"] = {**asdict(params.domain_adversarial),
                                                   "domain_accuracy": kept["domain_accuracy"]}
        if params.adapt == "adabn_target":
            target_record["target_adaptation"] = adabn_target(model, target.images, max(64, params.batch_size), hw)
    ckpt = model_file(
        model, pre,
        strategy=params.strategy,
        hardware={**hw.describe(), "processes": world.size},
        params=asdict(params),
        best_epoch=summary["best_epoch"],
        validation=summary["best"],
        adaptation=bb_ckpt.get("adaptation", {}),
        **target_record,
        head_init=head_init,
    )
    return ckpt, summary
