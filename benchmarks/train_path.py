"""2. Full fine-tuning: medtl's training loop vs the model's own forward + backward on tensors in memory.

Same model, batch size, precision (`auto`), threads, optimiser and number of steps. The
loop is `medtl.train.finetune.fit` (strategy full, augmentation as in params.yaml,
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
from medtl.prepare.prepared import PreparedSplit, load_split

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


def run(prepared: Path, epochs: int, batch_size: int, arch: str = "resnet18", cpu_epochs: int = 0) -> Result:
    from medtl import hardware
    from medtl.model.classifier import Classifier
    from medtl.model.start import build_backbone
    from medtl.train.finetune import FinetuneParams, fit

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
    if cpu_epochs:
        cpu_rows(res, prepared, cpu_epochs, batch_size, arch)
    return res


# Fine-tune in a fresh process under /usr/bin/time, with the stages' thread defaults: how much of the cores it
# keeps busy. "serial" is the loop without the batch prefetch and without the fused optimiser, for the A/B.
_CPU_WORKER = """
import sys
import time
import medtl
import torch
from medtl.train import finetune
from medtl import hardware
from medtl.model.start import build_backbone
from medtl.model.classifier import Classifier
from medtl.prepare.prepared import load_split
from benchmarks.common import load_stats
from benchmarks.train_path import small_val
variant, prepared, epochs, batch, arch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if variant == "serial":
    finetune.prefetch = lambda batches: batches
    plain = finetune.make_optimizer
    finetune.make_optimizer = lambda name, groups, lr, wd, momentum=0.9: torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
stats = load_stats(prepared)
train, val = load_split(prepared, "train"), small_val(load_split(prepared, "val"), 4)
hw = hardware.select("cpu", "auto")
torch.manual_seed(0)
model = Classifier(build_backbone(arch, stats["channels"], "none"), len(stats["classes"]), stats["mean"], stats["std"])
params = finetune.FinetuneParams(strategy="full", epochs=epochs, batch_size=batch, patience=epochs, seed=0,
                                 device="cpu", precision=hw.precision)
t0, c0 = time.perf_counter(), time.process_time()
finetune.fit(params, model, train, val, hw)
t1, c1 = time.perf_counter(), time.process_time()
print(f"fit-cpu {100 * (c1 - c0) / (t1 - t0):.1f}")  # the training alone, start-up (imports, data, model) left out
print(torch.get_num_threads())
"""


def cpu_rows(res: Result, prepared: Path, epochs: int, batch_size: int, arch: str, repeats: int = 2) -> None:
    import os
    import shutil
    import subprocess
    import sys

    time_bin = shutil.which("time") or "/usr/bin/time"
    if not os.access(time_bin, os.X_OK):
        res.notes.append("fine-tune CPU use not measured: /usr/bin/time is missing")
        return
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    got: dict[str, list[tuple[float, float]]] = {"overlapped": [], "serial": []}
    fit_cpu: dict[str, list[float]] = {"overlapped": [], "serial": []}
    threads = "?"
    for _ in range(repeats):  # interleaved
        for variant in got:
            out = subprocess.run([time_bin, "-f", "medtl-cpu %P %e", sys.executable, "-c", _CPU_WORKER, variant,
                                  str(prepared), str(epochs), str(batch_size), arch],
                                 env=env, capture_output=True, text=True, check=True)
            line = next(ln for ln in out.stderr.splitlines() if ln.startswith("medtl-cpu "))
            cpu, wall = line.split()[1:3]
            got[variant].append((float(cpu.rstrip("%")), float(wall)))
            fit_cpu[variant].append(float(next(ln for ln in out.stdout.splitlines() if ln.startswith("fit-cpu ")).split()[1]))
            threads = out.stdout.strip().splitlines()[-1]
    med = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
    size = load_stats(prepared)["size"]
    for variant, (cpu, wall) in med.items():
        res.add(f"fine-tune {size}px, {threads} torch threads, {variant}: CPU (/usr/bin/time %P)", cpu, "%")
        res.add(f"fine-tune {size}px, {variant}: wall, process included", wall, "s")
        res.add(f"fine-tune {size}px, {variant}: CPU during training alone", sorted(fit_cpu[variant])[len(fit_cpu[variant]) // 2], "%")
    res.add("fine-tune: serial / overlapped wall time", round(med["serial"][1] / med["overlapped"][1], 2), "x")
    res.check(f"fine-tune {size}px CPU use (of {100 * int(threads) if threads.isdigit() else '?'}%)",
              med["overlapped"][0], ">=", 185)
