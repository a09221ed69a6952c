"""Fused inference: batch norm folded into the convolutions and the graph run as one piece, or eager with the reason.

Eager mode runs batch norm, ReLU and the residual adds one at a time between
the convolutions (about half of a ResNet's bf16 inference time on a CPU).
Two fused forms, both built from the trained classifier on its first batch:

- `trace-freeze`: torch.jit.trace under the precision's autocast, then
  torch.jit.freeze (which folds batch norm into the preceding convolution and
  bakes the bf16 weights in) and optimize_for_inference. Builds in about a
  second.
- `compile`: torch.compile (inductor, generated C++ with its own fused
  kernels), where a C compiler exists. Faster per image (docs/performance.md),
  but 20-40 s to build on a 2-core CPU, so only chosen when the run is large
  enough to earn that back: COMPILE_MIN_TFLOP of forward work. Below FUSE_MIN_TFLOP
  neither repays its build and the run stays eager.

The first CHECK_IMAGES images of the first batch are also run eagerly and the
fused probabilities must match them (FUSED_TOLERANCE); any failure to build, or
a mismatch, falls back to eager. The fused output of that first batch is the
batch's result (it is not computed twice), and trace-freeze traces on those few
images, not the whole batch: with a large model the build otherwise costs
several batches of forward work.
What was used and why is the `record`, written into the outputs.
"""
from __future__ import annotations

import shutil
from typing import Callable

import torch

# Forward work (images x FLOPs per image) above which compile's build cost is repaid: measured on a
# 2-core AVX-512 BF16 EPYC, compile built in 20-32 s and ran ResNet-18/50 at 224 px 1.45-1.65x eager,
# trace-freeze 1.03-1.35x; at ~250 GFLOP/s of eager bf16 that is ~80 s of eager work, about 20 TFLOP.
COMPILE_MIN_TFLOP = 20.0
# Below this much forward work even trace-freeze's build (0.3-1.2 s with its check batch) is not repaid:
# at ~250 GFLOP/s of eager bf16 and 1.03-1.35x, about 1.5 TFLOP (~400 ResNet-18 or ~180 ResNet-50 images
# at 224 px); small runs (tests, a handful of files) stay eager.
FUSE_MIN_TFLOP = 1.5
# A sanity bound on |fused - eager| probabilities on the first batch: catches a wrong graph, not rounding.
FUSED_TOLERANCE = 1e-2
# Images of the first batch that trace-freeze traces on and that are run eagerly for the check above.
CHECK_IMAGES = 8


def c_compiler() -> str | None:
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def forward_tflop(model: torch.nn.Module, sample: torch.Tensor, images: int) -> float:
    """FLOPs of the forward pass over `images` images like `sample`'s first, in TFLOP (deterministic).

    Counted on the meta device (shapes only, no arithmetic: 20-60 ms for ResNet-18/50 at 224 px against
    0.05-1.4 s for a real fp32 forward of one image); a model that cannot run there is counted on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _meta_forward(model, sample[:1])
    except Exception:  # noqa: BLE001  (an op without a meta kernel, or a model that looks at devices)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(sample[:1].float())
    return counter.get_total_flops() * images / 1e12


def _meta_forward(model: torch.nn.Module, sample: torch.Tensor) -> None:
    """`model` on a meta copy of `sample` with meta stand-ins for its weights (nothing copied or computed).

    A medtl Classifier is run part by part: its forward asks autocast about the input's device, which has no
    answer for meta."""
    from torch.func import functional_call

    def meta(module: torch.nn.Module) -> dict:
        return {k: torch.empty_like(v, device="meta") for k, v in [*module.named_parameters(), *module.named_buffers()]}

    x = torch.empty_like(sample, dtype=torch.float32, device="meta")
    parts = [getattr(model, k, None) for k in ("normalize", "backbone", "head")]
    for part in parts if all(isinstance(p, torch.nn.Module) for p in parts) else [model]:
        x = functional_call(part, meta(part), (x,))


def choose_mode(precision_param: str, device: torch.device, work_tflop: float | None) -> tuple[str, str]:
    """(mode, why): eager, trace-freeze or compile."""
    if precision_param != "auto":
        return "eager", f"precision set to {precision_param!r}: fused inference is used with precision auto only"
    if device.type != "cpu":
        return "eager", f"fused inference is measured on the CPU only; eager on {device.type}"
    if work_tflop is not None and work_tflop < FUSE_MIN_TFLOP:
        return "eager", f"{work_tflop:.2f} TFLOP of forward work < {FUSE_MIN_TFLOP}: no fused form repays its build"
    if work_tflop is not None and work_tflop >= COMPILE_MIN_TFLOP:
        if c_compiler():
            return "compile", f"{work_tflop:.0f} TFLOP of forward work >= {COMPILE_MIN_TFLOP:.0f}: compile repays its build"
        return "trace-freeze", "no C compiler for torch.compile"
    return "trace-freeze", (f"{work_tflop:.1f} TFLOP of forward work < {COMPILE_MIN_TFLOP:.0f}: torch.compile "
                            "would not repay its build" if work_tflop is not None else "size of the run unknown")


class FusedForward:
    """A drop-in forward for `forward_batches`: fused on the first batch it sees, eager if that fails."""

    def __init__(self, model: torch.nn.Module, hw, precision_param: str = "auto", images: int | None = None,
                 mode: str | None = None):
        self.model, self.hw, self.images, self.forced = model, hw, images, mode  # mode: the benchmarks' choice
        self.precision_param = precision_param
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._batch = 0
        self.record: dict = {"mode": "eager", "why": "no batch seen yet"}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            first = self._build(x)
            if first is not None:  # the fused output of this batch, computed for the check
                return first
        return self._fn(x)

    def _build(self, x: torch.Tensor) -> torch.Tensor | None:
        """Choose and build the form; returns the fused output of `x` when a fused form was kept."""
        if self.forced:
            mode, why = self.forced, "chosen by the caller"
        else:
            work = forward_tflop(self.model, x, self.images) if self.images else None
            mode, why = choose_mode(self.precision_param, x.device, work)
        self._fn, self.record = self.model, {"mode": "eager", "why": why}
        if mode == "eager":
            return None
        head = x[:CHECK_IMAGES]
        try:
            with torch.no_grad():
                fn = self._trace_freeze(head) if mode == "trace-freeze" else self._compile(x)
                out = fn(x)
                eager = self.model(head).float().softmax(1)
                diff = float((out[:len(head)].float().softmax(1) - eager).abs().max())
        except Exception as e:  # any failure to build leaves the eager model, which always works
            self.record = {"mode": "eager", "why": f"{mode} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                                                   "fell back to eager", "fallback": True}
            return None
        if not diff <= FUSED_TOLERANCE:
            self.record = {"mode": "eager", "why": f"{mode} probabilities differed from eager by {diff:.2e} > "
                                                   f"{FUSED_TOLERANCE} on the first batch; fell back to eager",
                           "fallback": True}
            return None
        self._fn, self.record = fn, {"mode": mode, "why": why, "batch_norm_folded": True}
        return out

    def _trace_freeze(self, x: torch.Tensor):
        import copy
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about the input check (it holds for every batch)
            # a copy without gradients: frozen weights become constants, and the eager model keeps its own
            model = copy.deepcopy(self.model).requires_grad_(False)
            model.__dict__.pop("fused_forward", None)
            traced = torch.jit.trace(model, x, check_trace=False)
            # deprecated in favour of torch.compile, which does not repay its build on small runs (see above)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

        def run(t: torch.Tensor) -> torch.Tensor:
            # the casts of the precision are recorded in the graph; autocast around it would only add more
            with torch.autocast(t.device.type, enabled=False):
                return frozen(t)
        return run

    def _compile(self, x: torch.Tensor):
        import torch._inductor.config as inductor

        inductor.freezing = True  # constant-folds the weights: batch norm into the convolutions
        compiled = torch.compile(self.model, dynamic=False)
        self._batch = len(x)

        def run(t: torch.Tensor) -> torch.Tensor:
            n = len(t)
            self._batch = max(self._batch, n)  # a first batch cut short (predict flushes early) builds once more
            if n < self._batch:  # a short batch is padded to the largest seen: one shape, one build
                t = torch.cat([t, t[-1:].expand(self._batch - n, *t.shape[1:])]).contiguous(
                    memory_format=torch.channels_last if self.hw.channels_last else torch.contiguous_format)
            return compiled(t)[:n]
        return run
