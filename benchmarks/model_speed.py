"""7. Model speed: ResNets at the sizes users pick, fp32 vs `precision: auto`, against the machine's own limit.

The limit is measured in the same run: the better GFLOP/s of a large matrix
product and of a 3x3 convolution, in fp32 and in bf16 (fp16 too on a GPU),
each the best of short windows before and after the models. A model's
fraction of it is model FLOPs per image (counted by torch's FlopCounterMode on
one forward pass; a training step is counted as 3x the forward) x images/s /
the limit of the same precision. Images/s are forward (+ backward + AdamW step) on random
batches already on the device, after a warm-up step, so they are the model's
own rate, the ceiling for any data path.
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import Result
from benchmarks.precision import infer_seconds
from benchmarks.train_path import raw_train

NAME = "model_speed"


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int, seconds: float = 0.3, windows: int = 3) -> float:
    """GFLOP/s of an n x n matrix product in `dtype` (2 n^3 FLOPs each): the best of a few short windows,
    since on a shared machine a window can lose the core to another process."""
    return max(_matmul_window(dtype, device, n, seconds) for _ in range(windows))


def _matmul_window(dtype: torch.dtype, device: torch.device, n: int, seconds: float) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync()
            if time.perf_counter() - start >= seconds:
                break
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def conv_gflops(dtype: torch.dtype, device: torch.device, channels: int = 256, side: int = 28, windows: int = 3) -> float:
    """GFLOP/s of a 3x3 convolution (channels_last), the ResNets' own kernel: on some CPUs the convolution
    library reaches more than the matrix-product library, and the limit is the better of the two."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, channels, side, side, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
    conv.to(memory_format=torch.channels_last)
    flops = 2 * 8 * channels * channels * 9 * side * side
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    with torch.no_grad():
        conv(x)
        for _ in range(windows):
            sync()
            start = time.perf_counter()
            for _ in range(4):
                conv(x)
            sync()
            best = max(best, 4 * flops / (time.perf_counter() - start) / 1e9)
    return best


def build(arch: str, channels: int, hw, num_classes: int = 2):
    from medtl.model.classifier import Classifier
    from medtl.model.start import build_backbone

    torch.manual_seed(0)
    model = Classifier(build_backbone(arch, channels, "none"), num_classes, [0.5] * channels, [0.25] * channels)
    model.to(hw.device)
    if hw.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def forward_flops(arch: str, channels: int, size: int) -> float:
    """FLOPs of one image's forward pass (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import cpu_fp32

    model = build(arch, channels, cpu_fp32()).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, size, size))
    return float(counter.get_total_flops())


def random_batches(batch_size: int, steps: int, channels: int, size: int, hw) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x = torch.rand(batch_size, channels, size, size, generator=g).to(hw.device)
        if hw.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 2, (batch_size,), generator=g).to(hw.device)))
    return out


def images_per_second(arch: str, size: int, hw, batch_size: int, steps: int, channels: int = 1) -> tuple[float, float]:
    """(training, inference) images/s of `arch` at `size` px on `hw`."""
    batches = random_batches(batch_size, steps, channels, size, hw)
    sync = torch.cuda.synchronize if hw.device.type == "cuda" else (lambda: None)
    model = build(arch, channels, hw)
    sync()
    train_s = raw_train(model, batches, hw, warmup=1)
    sync()
    infer_s = infer_seconds(model, batches, hw)
    sync()
    return steps * batch_size / train_s, steps * batch_size / infer_s


def fused_inference(arch: str, size: int, hw, batch_size: int, steps: int, mode: str,
                    channels: int = 1) -> tuple[float, float, str]:
    """(images/s, build seconds, mode that ran) of medtl's fused inference (medtl.model.fused) forced to `mode`."""
    from medtl.model.fused import FusedForward

    batches = random_batches(batch_size, steps, channels, size, hw)
    model = build(arch, channels, hw).eval()
    if mode == "compile":
        torch._dynamo.reset()  # a fresh build per model, as in a new process; no recompile limit reached
    fused = FusedForward(model, hw, "auto", None, mode=mode)
    with torch.no_grad(), hw.autocast():
        start = time.perf_counter()
        fused(batches[0][0])  # the build, and its check against eager on the first images of this batch
        built = time.perf_counter() - start
        fused(batches[0][0])  # warm-up
        start = time.perf_counter()
        for x, _ in batches:
            fused(x)
        seconds = time.perf_counter() - start
    return steps * batch_size / seconds, built, fused.record["mode"]


def precisions(device: torch.device) -> tuple[list[tuple[str, object]], object]:
    """(label, Hardware) to compare: fp32, each reduced precision the device has, and what `auto` picks."""
    from medtl import hardware

    auto = hardware.select(device.type, "auto")
    out = [("fp32", hardware.Hardware(device, "fp32"))]
    if device.type == "cuda":
        # channels_last on its own, then AMP (which medtl always pairs with channels_last on a GPU)
        out.append(("fp32 + channels_last", _ChannelsLast(device)))
        out += [(f"{p} + channels_last", hardware.Hardware(device, p))
                for p in ("bf16", "fp16") if p != "bf16" or torch.cuda.is_bf16_supported()]
    else:
        out.append(("bf16 + channels_last", hardware.Hardware(device, "bf16")))
    return out, auto


class _ChannelsLast:
    """fp32 with channels_last (Hardware ties channels_last to the device and precision)."""

    def __init__(self, device: torch.device):
        from medtl import hardware

        self._hw = hardware.Hardware(device, "fp32")
        self.device, self.precision, self.channels_last = device, "fp32", True

    def autocast(self):
        return self._hw.autocast()


def run(archs: list[str], sizes: list[int], batch_size: int, steps: int, device: str = "cpu",
        matmul_n: int = 2048, repeats: int = 2, fused_sizes: tuple[int, ...] = (224,),
        fused_modes: tuple[str, ...] = ("trace-freeze", "compile")) -> Result:
    from medtl import hardware

    dev = torch.device(device)
    res = Result(NAME, f"Model speed on {device}: fp32 vs precision auto, fraction of the measured limit",
                 {"archs": archs, "sizes": sizes, "batch_size": batch_size, "timed_steps": steps, "device": device,
                  "threads": torch.get_num_threads(), "matmul_n": matmul_n, "input_channels": 1,
                  "repeats": repeats})
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if dev.type == "cuda":
        dtypes["fp16"] = torch.float16
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; TF32 is a precision choice of its own
        torch.backends.cudnn.allow_tf32 = False
    # the limit (the better of a matrix product and a 3x3 convolution) is measured before the models and again
    # after them, and the better of the two counts
    def limits() -> dict:
        return {name: (matmul_gflops(dtype, dev, matmul_n), conv_gflops(dtype, dev)) for name, dtype in dtypes.items()}

    before = limits()
    variants, auto = precisions(dev)
    res.params["precision_auto"] = auto.precision
    auto_label = next(label for label, hw in variants if hw.precision == auto.precision)
    measured = []  # (arch, size, forward FLOPs, {label: (train img/s, inference img/s)})
    fused_rows = []  # (arch, size, forward FLOPs, {mode: (inference img/s, build s, mode that ran)})
    for arch in archs:
        for size in sizes:
            bs = batch_size if size >= 128 else batch_size * 4  # small images: bigger batches, same time
            # interleaved repeats, the best of each kept: a load spike from another process hits one repeat
            # of one variant, not the comparison
            fuse = size in fused_sizes  # on a GPU too (gpu.sh): forced forms, a failure shows as a fallback
            runs = [{**{label: images_per_second(arch, size, hw, bs, steps) for label, hw in variants},
                     **{f"fused {m}": fused_inference(arch, size, auto, bs, steps, m) for m in fused_modes if fuse}}
                    for _ in range(repeats)]
            speed = {label: tuple(max(r[label][i] for r in runs) for i in (0, 1)) for label, _ in variants}
            fused = {m: (max(r[f"fused {m}"][0] for r in runs), min(r[f"fused {m}"][1] for r in runs),
                         runs[-1][f"fused {m}"][2]) for m in fused_modes if fuse}
            measured.append((arch, size, forward_flops(arch, 1, size), speed))
            fused_rows.append((arch, size, measured[-1][2], fused))
    after, limit = limits(), {}
    for name in dtypes:
        (mm0, cv0), (mm1, cv1) = before[name], after[name]
        res.add(f"limit {name}: matmul {matmul_n}, before / after the models", f"{mm0:.1f} / {mm1:.1f}", "GFLOP/s")
        res.add(f"limit {name}: 3x3 conv, before / after the models", f"{cv0:.1f} / {cv1:.1f}", "GFLOP/s")
        limit[name] = max(mm0, mm1, cv0, cv1)
    res.add("limit bf16 / fp32", round(limit["bf16"] / limit["fp32"], 2), "x")
    precision_of = {label: hw.precision for label, hw in variants}
    for arch, size, flops, speed in measured:
        res.add(f"{arch} {size}px forward", round(flops / 1e9, 3), "GFLOP/image")
        for label, (train_ips, infer_ips) in speed.items():
            p = precision_of[label]
            # a training step is counted as 3 forward passes (forward, and backward's two products)
            res.add(f"{arch} {size}px train {label}", round(train_ips, 1),
                    f"img/s = {3 * flops * train_ips / 1e9 / limit[p]:.0%} of {p} limit")
            res.add(f"{arch} {size}px inference {label}", round(infer_ips, 1),
                    f"img/s = {flops * infer_ips / 1e9 / limit[p]:.0%} of {p} limit")
        base = speed["fp32"]
        res.add(f"{arch} {size}px train: precision auto ({auto.precision}) / fp32",
                round(speed[auto_label][0] / base[0], 2), "x")
        res.add(f"{arch} {size}px inference: precision auto ({auto.precision}) / fp32",
                round(speed[auto_label][1] / base[1], 2), "x")
        fastest = max(speed, key=lambda k: speed[k][0])
        # auto may trail the fastest choice by no more than the noise of a shared machine
        res.check(f"{arch} {size}px train: auto / fastest ({fastest})",
                  round(speed[auto_label][0] / speed[fastest][0], 2), ">=", 0.8)
    p = auto.precision
    for (arch, size, flops, fused), (_, _, _, speed) in zip(fused_rows, measured):
        eager = speed[auto_label][1]
        for mode, (ips, built, ran) in fused.items():
            res.add(f"{arch} {size}px inference {p} fused {mode}" + ("" if ran == mode else f" (fell back to {ran})"),
                    round(ips, 1), f"img/s = {flops * ips / 1e9 / limit[p]:.0%} of {p} limit "
                                   f"(eager {flops * eager / 1e9 / limit[p]:.0%})")
            res.add(f"{arch} {size}px inference: fused {mode} / eager ({p})", round(ips / eager, 2), "x")
            res.add(f"{arch} {size}px fused {mode}: build + check on the first batch", round(built, 1), "s")
    if dev.type == "cpu":
        res.notes.append(f"CPU bf16 instructions: {hardware.cpu_bf16() or 'none (emulated)'}; "
                         f"precision auto picks {auto.precision}")
    return res


# One measurement in a fresh process, so that OpenMP starts with the environment under test. A stage imports
# medtl before torch (medtl sets OMP_WAIT_POLICY=PASSIVE unless the user set it); "torch" loads torch first,
# so OpenMP starts with its own default (idle threads spin a while before sleeping).
_THREAD_WORKER = """
import json, sys
first, threads, arch, size, batch, steps = sys.argv[1], *map(int, sys.argv[2:3]), sys.argv[3], *map(int, sys.argv[4:])
if first == "torch":
    import torch
import medtl
import torch
from medtl import hardware
from benchmarks.common import cpu_fp32
from benchmarks.model_speed import images_per_second
if threads:
    torch.set_num_threads(threads)
else:
    hardware.limit_threads()
print(json.dumps([torch.get_num_threads(), *images_per_second(arch, size, cpu_fp32(), batch, steps)]))
"""


def _threads_in_fresh_process(first: str, threads: int, arch: str, size: int, batch: int, steps: int):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _THREAD_WORKER, first, str(threads), arch, str(size), str(batch),
                          str(steps)], env=env, capture_output=True, text=True, check=True)
    n, train, infer = json.loads(out.stdout.strip().splitlines()[-1])
    return int(n), float(train), float(infer)


def thread_rows(arch: str, size: int, batch_size: int, steps: int, repeats: int = 2) -> Result:
    """Training and inference images/s with the stages' default threads, torch's own default, and 1 thread."""
    from medtl import hardware

    cores = hardware.available_cores()
    choices = {"stage default, idle threads sleep": ("medtl", 0),
               "torch default, idle threads spin": ("torch", 0),
               "1 thread": ("medtl", 1)}
    res = Result("threads", f"Torch threads: the stages' default vs torch's default vs 1 thread ({cores} cores)",
                 {"arch": arch, "size": size, "batch_size": batch_size, "timed_steps": steps, "precision": "fp32",
                  "available_cores": cores, "repeats": repeats, "each measured in": "a fresh process"})
    speed, used = {}, {}
    for _ in range(repeats):  # interleaved, the best of each kept (see run)
        for label, (first, n) in choices.items():
            used[label], *ips = _threads_in_fresh_process(first, n, arch, size, batch_size, steps)
            speed[label] = tuple(max(a, b) for a, b in zip(speed.get(label, (0.0, 0.0)), ips))
    for label in choices:
        res.add(f"train, {label} ({used[label]})", round(speed[label][0], 1), "img/s")
        res.add(f"inference, {label} ({used[label]})", round(speed[label][1], 1), "img/s")
    fastest = max(speed, key=lambda k: speed[k][0])
    default = "stage default, idle threads sleep"
    res.add("fastest for training", fastest)
    res.check("train: stage default / fastest", round(speed[default][0] / speed[fastest][0], 2), ">=", 0.8)
    res.check("inference: stage default / 1 thread", round(speed[default][1] / speed["1 thread"][1], 2), ">=", 0.8)
    return res
