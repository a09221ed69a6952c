"""`medtl export`: the fine-tuned model as ONNX or TorchScript, for deployment outside medtl.

The exported graph takes what the pipeline's prepared arrays hold: float32
images of shape (N, C, S, S) with pixels in [0, 1], already resized as the
model's preprocessing record says. Normalisation is inside the graph. It
returns `logits` and `probabilities` (softmax of logits / temperature, when
evaluation fitted a temperature). Everything a deployment needs to feed it
and to read its output (classes, the preprocessing record, the operating
point fitted on validation, the sha256 of the source model.pt) travels inside
the file: ONNX metadata_props, or TorchScript extra files.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

from medtl.errors import MedtlError
from medtl.evaluate.operating_point import DEFAULT_PATH
from medtl.io import sha256_file

EXPORT_FORMAT = "medtl-export/1"
FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
DEFAULT_OPERATING_POINT = DEFAULT_PATH
TORCHSCRIPT_METADATA = "medtl.json"  # the extra file holding the metadata in a TorchScript archive
ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAMES = "image", ("logits", "probabilities")
# torch and numpy are imported inside the functions: `medtl --help` and `medtl verify` load this module to list the subcommand


def exported_module(classifier, temperature: float | None, precision: str = "fp32"):
    """The classifier with its calibrated softmax attached: one graph from prepared pixels to probabilities.

    bf16: the classifier runs under CPU bf16 autocast, as the evaluate stage runs it; traced, the casts are kept.
    """
    import torch
    from torch import nn

    class Exported(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier
            self.temperature = float(temperature) if temperature else 1.0

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if precision == "bf16":
                # channels_last too, as evaluate runs bf16: the kernels (and so the rounding) are those it used
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = self.classifier(image.contiguous(memory_format=torch.channels_last)).float()
            else:
                logits = self.classifier(image)
            return logits, torch.softmax(logits / self.temperature, dim=1)

    if precision == "bf16":
        classifier.to(memory_format=torch.channels_last)
    return Exported().eval()


def metadata(ckpt: dict, model_path: Path, operating_point: dict | None, fmt: str, precision: str = "fp32",
             card: dict | None = None) -> dict[str, str]:
    """String key/value pairs (ONNX metadata_props accept nothing else); structured values as JSON."""
    pre = ckpt.get("preprocessing") or {}
    channels, size = _input_shape(ckpt)
    temperature = (operating_point or {}).get("temperature")
    return {
        "medtl.format": EXPORT_FORMAT,
        "medtl.export_format": fmt,
        "medtl.source_model": model_path.name,
        "medtl.source_model_sha256": sha256_file(model_path),
        "medtl.arch": str((ckpt.get("backbone") or {}).get("arch", ckpt.get("arch", "unknown"))),
        "medtl.classes": json.dumps(list(ckpt["classes"])),
        # the record is carried whole, whatever keys it holds, so newer records pass through unchanged
        "medtl.preprocessing": json.dumps(pre, sort_keys=True, default=str),
        "medtl.operating_point": json.dumps(operating_point, sort_keys=True) if operating_point else "null",
        "medtl.input": json.dumps({"name": INPUT_NAME, "shape": ["N", channels, size, size], "dtype": "float32",
                                   "range": [0.0, 1.0], "normalisation": "inside the graph"}),
        "medtl.outputs": json.dumps({"logits": "raw scores, one per class",
                                     "probabilities": "softmax(logits / temperature)", "temperature": temperature or 1.0}),
        "medtl.precision": precision,
        # intended use, classes, operating point, test metrics with CIs, training data, audit sha256, weights licence
        "medtl.model_card": json.dumps(card, sort_keys=True, default=str) if card else "null",
    }


@contextlib.contextmanager
def _quiet_tracer():
    """torch.jit's deprecation notices and the tracer's note on the backbone's input-shape check (a guard,
    constant for a fixed channel count) say nothing the user can act on."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _input_shape(ckpt: dict) -> tuple[int, int]:
    """(channels, side) of the prepared images the model takes, from its preprocessing record."""
    pre = ckpt.get("preprocessing") or {}
    try:
        return int(pre["channels"]), int(pre["image_size"] if "image_size" in pre else pre["size"])
    except (KeyError, TypeError, ValueError) as e:
        raise MedtlError(f"the model's preprocessing record {pre} lacks channels or image size ({e}); it cannot be exported") from None


def _example(ckpt: dict):
    import torch

    c, s = _input_shape(ckpt)
    return torch.rand(2, c, s, s, generator=torch.Generator().manual_seed(0))


def to_onnx(module, example, meta: dict[str, str]) -> bytes:
    import onnx
    import torch

    buf = io.BytesIO()
    # the TorchScript-based exporter: deterministic, no extra packages, and handles the torchvision backbones
    torch.onnx.export(module, (example,), buf, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                      dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
                      opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = f"medtl export of {meta['medtl.source_model']} (sha256 {meta['medtl.source_model_sha256']})"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def to_torchscript(module, example, meta: dict[str, str]) -> bytes:
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=True)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta, indent=2, sort_keys=True)})
    return buf.getvalue()


def export(model_path: Path, fmt: str, operating_point: Path | None = None, precision: str = "fp32",
           reports: Path | None = None) -> tuple[bytes, dict[str, str]]:
    """The exported file's bytes and the metadata carried in it (with the model card from `reports` when given)."""
    from medtl.model.classifier import load_classifier

    if fmt not in FORMATS:
        raise MedtlError(f"--format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    check_precision(fmt, precision)
    classifier, ckpt = load_classifier(model_path)
    from medtl.evaluate.operating_point import operating_point_for

    op = operating_point_for(operating_point, model_path, list(ckpt["classes"]), "export",
                             "rerun the evaluate stage for this model (dvc repro)", "exporting without an operating point")
    card = None
    if reports is not None:
        from medtl.deploy.export_card import model_card

        card = model_card(ckpt, model_path, op, reports=reports, audit_dir=reports / "audit")
    meta = metadata(ckpt, model_path, op, fmt, precision, card)
    module = exported_module(classifier, (op or {}).get("temperature"), precision)
    example = _example(ckpt)
    with _quiet_tracer():
        data = to_onnx(module, example, meta) if fmt == "onnx" else to_torchscript(module, example, meta)
    return data, meta


def run_export(data: bytes, fmt: str, images):
    """(logits, probabilities) of the exported file on `images`, with its own runtime (onnxruntime or torch.jit)."""
    import numpy as np
    import torch

    x = np.ascontiguousarray(images, dtype=np.float32)
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        logits, probs = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return logits, probs
    with _quiet_tracer():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        logits, probs = module(torch.from_numpy(x))
    return logits.numpy(), probs.numpy()


def parity(model_path: Path, data: bytes, fmt: str, images, temperature: float | None = None, precision: str = "fp32") -> float:
    """Largest absolute difference between the export and the PyTorch model at `precision`, over logits and probabilities."""
    import numpy as np
    import torch

    from medtl.model.classifier import load_classifier

    classifier, _ = load_classifier(model_path)
    with torch.no_grad():
        ref_logits, ref_probs = exported_module(classifier, temperature, precision)(torch.from_numpy(np.asarray(images, dtype=np.float32)))
    logits, probs = run_export(data, fmt, images)
    return float(max(np.abs(logits - ref_logits.numpy()).max(), np.abs(probs - ref_probs.numpy()).max()))


def read_metadata(path: Path) -> dict[str, str]:
    """The medtl metadata of an exported file, from either format."""
    data = Path(path).read_bytes()
    if data[:2] == b"PK":  # TorchScript archives are zip files
        import torch

        extra = {TORCHSCRIPT_METADATA: ""}
        with _quiet_tracer():
            torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
        return json.loads(extra[TORCHSCRIPT_METADATA])
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}


def check_precision(fmt: str, precision: str) -> None:
    if precision == "bf16" and fmt != "torchscript":
        raise MedtlError(f"--precision bf16 is not available for {fmt}: onnxruntime's CPU provider has no bf16 "
                         "convolutions; export --format torchscript --precision bf16, or export fp32 (docs/export.md "
                         "says how far its probabilities lie from the audited bf16 ones)")
