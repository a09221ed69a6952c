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

import argparse
import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

from medtl.errors import MedtlError
from medtl.io import atomic_path, sha256_file

EXPORT_FORMAT = "medtl-export/1"
FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
DEFAULT_OPERATING_POINT = Path("reports/operating_point.json")
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
    from medtl.export_check import check_precision
    from medtl.model import load_classifier

    if fmt not in FORMATS:
        raise MedtlError(f"--format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    check_precision(fmt, precision)
    classifier, ckpt = load_classifier(model_path)
    from medtl.operating_point import operating_point_for

    op = operating_point_for(operating_point, model_path, list(ckpt["classes"]), "export",
                             "rerun the evaluate stage for this model (dvc repro)", "exporting without an operating point")
    card = None
    if reports is not None:
        from medtl.export_card import model_card

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

    from medtl.model import load_classifier

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


def _check_images(prepared: Path, meta: dict[str, str], n: int = 16):
    """Up to n prepared test images (validation if there is no test split), for the parity check."""
    import numpy as np

    for split in ("test", "val", "train"):
        p = prepared / f"{split}.npy"
        if p.is_file():
            arr = np.load(p, mmap_mode="r")
            shape = json.loads(meta["medtl.input"])["shape"]
            if arr.ndim == 4 and list(arr.shape[1:]) == shape[1:]:
                return np.asarray(arr[:n], dtype=np.float32)
            return None
    return None


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write the model as ONNX or TorchScript, with its metadata",
                              description="Export a model written by the pipeline to ONNX (run with onnxruntime) or TorchScript. "
                                          "Input: float32 (N, C, S, S) prepared pixels in [0, 1]; outputs: logits and probabilities. "
                                          "Classes, the preprocessing record and the operating point travel inside the file.")
    p.add_argument("model", type=Path, nargs="?", default=Path("models/model.pt"), help="model file written by fine-tune (default: %(default)s)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="(default: %(default)s)")
    p.add_argument("--out", help="output file, or - for stdout (default: the model path with .onnx or .torchscript.pt)")
    p.add_argument("--operating-point", type=Path,
                   help=f"operating point to carry (default: {DEFAULT_OPERATING_POINT} when it was fitted for this model)")
    p.add_argument("--check", type=Path, default=Path("data/prepared"),
                   help="prepared arrays to compare the export with the PyTorch model on (default: %(default)s, when present)")
    # INT8 (medtl.int8): calibrated on validation, its test AUC change measured, refused beyond the tolerance
    p.add_argument("--int8", action="store_true",
                   help="write an INT8 ONNX model calibrated on the validation split of --check; exits 1 and writes "
                        "nothing when its test ROC AUC moves by more than --int8-tolerance")
    p.add_argument("--int8-tolerance", type=float, default=0.01,
                   help="largest accepted |test ROC AUC change| of the INT8 model (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="numeric precision of the exported graph; bf16 (TorchScript only) runs it under CPU bf16 "
                        "autocast as evaluate does on CPUs with native bf16 (default: %(default)s)")
    p.add_argument("--reference", type=int, default=4, metavar="N",
                   help="test images whose inputs and expected outputs are written beside the export as "
                        "<out>.reference.npz, to check another runtime (default: %(default)s; 0: none)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if getattr(args, "int8", False):
        from medtl.int8 import cmd_export_int8

        return cmd_export_int8(args)
    if not args.model.is_file():
        raise MedtlError(f"model {args.model} not found; run the pipeline (dvc repro) or name the model file")
    reports = (args.operating_point or DEFAULT_OPERATING_POINT).parent
    data, meta = export(args.model, args.format, args.operating_point, args.precision, reports)
    checked, reference = _check_against_audit(args, data, meta, reports)
    if args.out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        print(f"medtl export: {args.format} {checked}", file=sys.stderr)
        return 0
    out = Path(args.out) if args.out else args.model.with_name(args.model.name.removesuffix(".pt") + SUFFIX[args.format])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    if reference is not None:
        from medtl.export_check import reference_pair, reference_path

        reference_pair(reference_path(out), data, args.format, *reference)
        checked += f"; reference inputs and outputs of {len(reference[0])} test images: {reference_path(out)}"
    print(f"{out}: {args.format} {args.precision}, classes {', '.join(json.loads(meta['medtl.classes']))}; {checked}")
    return 0


def _check_against_audit(args: argparse.Namespace, data: bytes, meta: dict[str, str], reports: Path):
    """(the message, the reference pair's (images, ids, audited) or None); raises when the export is not the model."""
    from medtl.export_card import evaluation_of
    from medtl.export_check import audited_probabilities, compare, test_images

    found = test_images(args.check, max(16, args.reference)) if args.check and args.check.is_dir() else None
    if not found or not len(found[0]) or _check_images(args.check, meta, 1) is None:
        return "not compared with the PyTorch model (no prepared arrays; pass --check data/prepared)", None
    images, ids, split = found
    op = json.loads(meta["medtl.operating_point"])
    temperature = (op or {}).get("temperature")
    same = parity(args.model, data, args.format, images[:16], temperature, args.precision)
    if same > PARITY_TOLERANCE:
        raise MedtlError(f"the {args.format} export differs from {args.model} at {args.precision} by {same:.2e} on "
                         f"{len(images[:16])} prepared images (tolerance {PARITY_TOLERANCE:g}); nothing was written")
    evaluated = evaluation_of(args.model, reports)
    classes = json.loads(meta["medtl.classes"])
    predictions = reports / "predictions.csv"
    d = compare(args.model, data, args.format, images[:16], ids[:16] if ids is not None else None, classes, temperature,
                evaluated, predictions)
    msg = (f"matches the PyTorch model at {args.precision} on {d['images']} {split} images (max abs difference "
           f"{same:.1e}); to PyTorch fp32: {d['to_pytorch_fp32']:.1e}")
    if d["to_audited_predictions"] is not None:
        msg += (f"; to the audited {predictions} (evaluated at {d['evaluate_precision']} on {d['evaluate_device']}): "
                f"{d['to_audited_predictions']:.1e}")
        if d.get("pytorch_at_evaluate_precision_to_audited") is not None:
            msg += f" (PyTorch at {d['evaluate_precision']} reproduces them within {d['pytorch_at_evaluate_precision_to_audited']:.1e})"
    else:
        msg += f"; {d['note']}"
    if args.reference <= 0 or args.out == "-":
        return msg, None
    k = min(args.reference, len(images))
    ids = ids[:k] if ids is not None else None
    audited = audited_probabilities(predictions, ids, classes) if evaluated and split == "test" else None
    return msg, (images[:k], ids, audited)
