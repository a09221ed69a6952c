"""2. Full fine-tuning: medtl's training loop vs the model's own forward + backward on tensors in memory.

Same model, batch size, precision (`auto`), threads, optimiser and number of steps. The
loop is `medtl.finetune.fit` (strategy full, augmentation as in params.yaml,
batches gathered from the memory-mapped prepared array), timed as a whole with
a small validation split; the reference is forward + backward + AdamW step on
batches already in memory as float32 tensors, after a short warm-up.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import Result, Timer, load_stats
from medtl.prepared import PreparedSplit, load_split

NAME = "train_path"


def small_val(val: PreparedSplit, n: int) -> PreparedSplit:
    """The first n images of each class: the loop's per-epoch validation, kept negligible."""
    idx = np.concatenate([np.flatnonzero(val.labels == c)[:n] for c in np.unique(val.labels)])
    return PreparedSplit(val.images[idx], val.labels[idx], [val.rows[i] for i in idx])


def raw_train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], hw, warmup: int = 2) -> float:
    """Seconds for forward + backward + step over `batches` (a warm-up pass over the first few not counted)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step(x, y):
        with hw.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in batches[:warmup]:
        step(x, y)
    with Timer() as t:
        for x, y in batches:
            step(x, y)
    return t.seconds


def memory_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, steps: int, hw, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        idx = rng.choice(len(labels), batch_size, replace=False)
        x = torch.from_numpy(np.asarray(images[np.sort(idx)], dtype=np.float32))
        if hw.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.from_numpy(labels[np.sort(idx)])))
    return out


def run(prepared: Path, epochs: int, batch_size: int, arch: str = "resnet18") -> Result:
    from medtl import hardware
    from medtl.backbones import build_backbone
    from medtl.finetune import FinetuneParams, fit
    from medtl.model import Classifier

    stats = load_stats(prepared)
    k = len(stats["classes"])
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    val = small_val(val, 4)
    # what the stage runs here: precision auto (bf16 on a CPU with native bf16), so the model's own rate,
    # which the data path must keep up with, is the fastest this machine has
    hw = hardware.select("cpu", "auto")
    params = FinetuneParams(strategy="full", epochs=epochs, batch_size=batch_size, patience=epochs, seed=0,
                            device="cpu", precision=hw.precision)
    res = Result(NAME, "Full fine-tuning: training loop vs in-memory forward+backward",
                 {"arch": arch, "size": stats["size"], "train_images": len(train.labels), "epochs": epochs,
                  "batch_size": batch_size, "precision": hw.precision, "threads": torch.get_num_threads(),
                  "augment": "params.yaml defaults (on)", "val_images_per_epoch": len(val.labels)})
    torch.manual_seed(0)
    model = Classifier(build_backbone(arch, stats["channels"], "none"), k, stats["mean"], stats["std"])
    steps = epochs * max(1, len(train.labels) // batch_size)  # fit drops the ragged last batch
    with Timer() as t:
        fit(params, model, train, val, hw)
    loop_ips = steps * min(batch_size, len(train.labels)) / t.seconds

    torch.manual_seed(0)
    raw_model = Classifier(build_backbone(arch, stats["channels"], "none"), k, stats["mean"], stats["std"])
    if hw.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    batches = memory_batches(train.images, train.labels, min(batch_size, len(train.labels)), steps, hw)
    raw_ips = len(batches) * batch_size / raw_train(raw_model, batches, hw)
    res.add("medtl training loop", round(loop_ips, 1), "img/s")
    res.add("forward+backward+step, tensors in memory", round(raw_ips, 1), "img/s")
    res.check("loop / in-memory", round(loop_ips / raw_ips, 3), ">=", 0.9)
    return res
