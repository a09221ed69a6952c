"""Device and precision: auto picks what the machine does well; impossible choices are clear errors."""
import os

import pytest
import torch

from medtl import hardware
from medtl.errors import ParamsError
from medtl.params import build
from medtl.train.finetune import FinetuneParams


def test_auto_on_the_cpu_uses_bf16_only_with_native_bf16():
    if torch.cuda.is_available():
        assert hardware.select().device.type == "cuda"
        return
    flags = open("/proc/cpuinfo").read().split()
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    hw = hardware.select("auto", "auto")
    assert hw.precision == ("bf16" if native else "fp32")
    assert hw.describe()["cpu_bf16"] == hardware.cpu_bf16() and (hardware.cpu_bf16() is not None) == native
    assert hw.describe()["cpu_amx_bf16"] == ("amx_bf16" in flags)


def test_threads_and_processes_are_bounded_by_the_available_cores():
    cores = hardware.available_cores()
    assert 1 <= cores <= os.cpu_count()
    n, why = hardware.max_processes("cpu")
    assert n == cores and "CPU cores" in why
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores + 3)
        expected = cores + 3 if "OMP_NUM_THREADS" in os.environ else cores
        assert hardware.limit_threads() == expected == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_nproc_above_the_cores_is_refused_at_validation():
    cores = hardware.available_cores()
    with pytest.raises(ParamsError, match=rf"finetune.nproc.*{cores + 1}.*at most {cores}.*CPU cores"):
        build(FinetuneParams, {"nproc": cores + 1, "batch_size": 8 * (cores + 1), "device": "cpu"}, "finetune")
    assert build(FinetuneParams, {"nproc": cores, "batch_size": 8 * cores, "device": "cpu"}, "finetune").nproc == cores


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(ParamsError, match="fp16"):
        hardware.select("cpu", "fp16")


def test_cuda_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        assert hardware.select("cuda").device.type == "cuda"
    else:
        with pytest.raises(ParamsError, match="finetune.device"):
            hardware.select("cuda", key="finetune.device")


def test_bf16_autocast_on_the_cpu():
    hw = hardware.select("cpu", "bf16")
    with hw.autocast():
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == torch.bfloat16 and hw.channels_last


def test_idle_openmp_threads_sleep_unless_the_user_chose():
    """Spinning idle threads collapse on a busy machine; medtl sets the policy before torch loads OpenMP."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import medtl, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   check=True).stdout.strip()
    assert run(env) == "PASSIVE"
    assert run({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
