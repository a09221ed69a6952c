"""Device and precision: auto picks what the machine does well; impossible choices are clear errors."""
import pytest
import torch

from medtl import hardware
from medtl.errors import ParamsError


def test_auto_on_the_cpu_uses_bf16_only_with_amx():
    if torch.cuda.is_available():
        assert hardware.select().device.type == "cuda"
        return
    hw = hardware.select("auto", "auto")
    assert hw.precision == ("bf16" if hardware.cpu_has_amx_bf16() else "fp32")
    assert hw.describe()["cpu_amx_bf16"] == hardware.cpu_has_amx_bf16()


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
