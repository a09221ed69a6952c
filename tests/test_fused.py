"""Fused inference (medtl.model.fused) gives the eager model's probabilities and the same operating-point calls."""
import json

import numpy as np
import torch

from medtl import hardware
from medtl.metrics import apply_temperature, predict_labels
from medtl.model.classifier import load_classifier
from medtl.model.inference import predict_logits, prepare_model, use_fused
from medtl.prepare.prepared import load_split


def test_fused_matches_eager_on_the_demo_test_split(tiny_run):
    model, _ = load_classifier(tiny_run.path / "models/model.pt")
    hw = hardware.select("cpu", "auto")
    prepare_model(model, hw)
    test = load_split(tiny_run.path / "data/prepared", "test")
    eager = apply_temperature(predict_logits(model, test.images, 4, hw, "eager"), 1.0)
    fused = use_fused(model, hw, "auto", len(test.labels))
    fused.forced = "trace-freeze"  # the demo split is too small for fusing to repay its build (see below)
    # batches of 4 leave a short last batch: the fused graph must take it too
    probs = apply_temperature(predict_logits(model, test.images, 4, hw, "fused"), 1.0)
    assert fused.record["mode"] == "trace-freeze" and fused.record["batch_norm_folded"], fused.record
    # bf16 rounds the folded weights differently from the unfolded ones: on this model that moves a
    # probability by up to ~1.5e-3, twice bf16's own distance from fp32 (docs/performance.md)
    tolerance = 1e-3 if hw.precision == "fp32" else 2e-3
    assert np.abs(probs - eager).max() <= tolerance
    threshold = json.loads((tiny_run.path / "reports/operating_point.json").read_text())["threshold"]
    assert (predict_labels(probs, threshold) == predict_labels(eager, threshold)).all()
    # the evaluate stage of the run recorded what it ran, and why
    record = json.loads((tiny_run.path / "reports/evaluation.json").read_text())["inference"]
    assert record["mode"] == "eager" and "no fused form repays its build" in record["why"], record


def test_the_forward_work_is_counted_on_the_meta_device_as_on_the_cpu():
    from torch.utils.flop_counter import FlopCounterMode

    from medtl.model.classifier import Classifier
    from medtl.model.fused import forward_tflop
    from medtl.model.start import build_backbone

    model = Classifier(build_backbone("resnet18", 1, "none"), 2, [0.5], [0.25]).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    assert forward_tflop(model, x, 10) == counter.get_total_flops() * 10 / 1e12 > 0
    # a model that cannot run on the meta device is counted on the CPU
    assert forward_tflop(_MetaRefusing(), torch.rand(2, 4), 5) == 2 * 4 * 3 * 5 / 1e12


class _MetaRefusing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x):
        if x.device.type == "meta":
            raise RuntimeError("no meta")
        return self.linear(x)


def test_the_first_batch_is_inferred_once_and_checked_on_its_first_images():
    from medtl.model.fused import CHECK_IMAGES, FusedForward

    seen = []  # batch sizes the eager forward ran on (outside the module: freeze keeps tensors only)

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x):
            seen.append(len(x))
            return self.linear(x)

    model = Counting().eval()
    fused = FusedForward(model, hardware.Hardware(torch.device("cpu"), "fp32"), mode="trace-freeze")
    x = torch.rand(CHECK_IMAGES * 4, 4)
    with torch.no_grad():
        out = fused(x)
        assert torch.allclose(out, model(x), atol=1e-6)  # the last entry of `seen`
    # traced on the first images, run eagerly on them for the check; the whole batch only by the fused graph
    assert fused.record["mode"] == "trace-freeze", fused.record
    assert seen == [CHECK_IMAGES, CHECK_IMAGES, len(x)], seen


def test_the_fused_form_follows_the_size_of_the_run():
    from medtl.model.fused import choose_mode, COMPILE_MIN_TFLOP, FUSE_MIN_TFLOP, c_compiler

    cpu = torch.device("cpu")
    assert choose_mode("auto", cpu, FUSE_MIN_TFLOP / 2)[0] == "eager"
    assert choose_mode("auto", cpu, FUSE_MIN_TFLOP * 2)[0] == "trace-freeze"
    assert choose_mode("auto", cpu, COMPILE_MIN_TFLOP * 2)[0] == ("compile" if c_compiler() else "trace-freeze")
    assert choose_mode("bf16", cpu, COMPILE_MIN_TFLOP * 2)[0] == "eager"


def test_explicit_precision_stays_eager_and_says_why(tiny_run):
    model, _ = load_classifier(tiny_run.path / "models/model.pt")
    hw = hardware.select("cpu", "fp32")
    fused = use_fused(model, hw, "fp32", 10)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))
    assert fused.record["mode"] == "eager" and "precision set to 'fp32'" in fused.record["why"]


class _Untraceable(torch.nn.Module):
    """A model torch.jit.trace refuses (it returns a non-tensor), standing for any graph that cannot be fused."""

    def forward(self, x):
        return x.flatten(1), "not a tensor"


def test_a_model_that_cannot_be_fused_runs_eager_and_the_fallback_is_recorded():
    model = _Untraceable()
    fused = use_fused(model, hardware.Hardware(torch.device("cpu"), "fp32"), "auto", 4)
    fused.forced = "trace-freeze"
    x = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        out = fused(x)
    assert torch.equal(out[0], x.flatten(1))
    assert fused.record["mode"] == "eager" and fused.record["fallback"] is True
    assert "trace-freeze failed" in fused.record["why"]
