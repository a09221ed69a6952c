"""Device, numeric precision and threads: CUDA when present, bf16 on CPUs with native bf16, fp32 otherwise."""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from medtl.errors import ParamsError


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


@functools.cache
def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions: 'amx_bf16' (AMX tiles), 'avx512_bf16', or None (bf16 is emulated).

    Measured with ResNets and bf16 autocast + channels_last against fp32: AMX 3-4x faster at 224 px;
    AVX-512 BF16 (AMD EPYC, no AMX) 1.7-2.7x faster to train and 2-3.4x to infer at 224 px, about even to
    train at 28 px;
    without either, 0.25x. See docs/performance.md.
    """
    flags = _cpu_flags()
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def cpu_has_amx_bf16() -> bool:
    return cpu_bf16() == "amx_bf16"


def cpu_has_fast_bf16() -> bool:
    return cpu_bf16() is not None


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup (container) CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" (no quota) or "200000 100000" (two cores' worth)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def limit_threads() -> int:
    """At most one torch thread per available core; returns the count in use.

    torch starts one thread per core of the machine, ignoring a container's CPU quota; OpenMP
    threads on oversubscribed cores spin and wait for each other (measured on a shared 2-core
    machine: 2 threads 0.3x the speed of 1). OMP_NUM_THREADS, when set, is the user's choice.
    """
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > available_cores():
        torch.set_num_threads(available_cores())
    return torch.get_num_threads()


def max_processes(device: str = "auto") -> tuple[int, str]:
    """The most training processes worth starting for `device`: one per GPU, or one per available CPU core."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        n = torch.cuda.device_count()
        return n, f"the number of CUDA GPUs here ({n}): one process per GPU"
    n = available_cores()
    return n, f"the number of CPU cores available here ({n}): more processes than cores only contend for them"


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    precision: str  # fp32, bf16 or fp16

    @property
    def channels_last(self) -> bool:
        # channels_last pays off where a fast reduced-precision kernel exists
        return self.device.type == "cuda" or self.precision == "bf16"

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def describe(self) -> dict:
        d = {"device": str(self.device), "precision": self.precision, "channels_last": self.channels_last}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        else:
            d["cpu_amx_bf16"] = cpu_has_amx_bf16()
            d["cpu_bf16"] = cpu_bf16()
        return d


def select(device: str = "auto", precision: str = "auto", key: str = "device") -> Hardware:
    """Resolve `auto` to what this machine does best; refuse what it cannot do."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise ParamsError(f"params key '{key}' is 'cuda' but no CUDA GPU is available; use 'auto' or 'cpu'")
        dev = torch.device("cuda")
    else:
        dev = torch.device("cpu")
    limit_threads()
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    elif precision == "fp16" and dev.type == "cpu":
        raise ParamsError(f"precision 'fp16' needs a CUDA GPU (the device here is the CPU); use 'fp32', 'bf16' or 'auto'")
    return Hardware(dev, precision)
