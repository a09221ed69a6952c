"""`medtl export`: the command around medtl.deploy.export (the file), medtl.deploy.export_check (its
checks against the audited model), medtl.deploy.export_card and medtl.deploy.int8."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medtl.deploy.export import DEFAULT_OPERATING_POINT, FORMATS, PARITY_TOLERANCE, SUFFIX, export, parity
from medtl.deploy.export_card import evaluation_of
from medtl.deploy.export_check import audited_probabilities, compare, reference_pair, reference_path, test_images
from medtl.deploy.int8 import cmd_export_int8
from medtl.errors import MedtlError
from medtl.evaluate.predictions import PREDICTIONS
from medtl.io import atomic_path
from medtl.model.model_file import PROJECT_MODEL


def _fits(images, meta: dict[str, str]) -> bool:
    """The prepared images have the shape the export takes."""
    return list(images.shape[1:]) == json.loads(meta["medtl.input"])["shape"][1:]


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write the model as ONNX or TorchScript, with its metadata",
                              description="Export a model written by the pipeline to ONNX (run with onnxruntime) or TorchScript. "
                                          "Input: float32 (N, C, S, S) prepared pixels in [0, 1]; outputs: logits and probabilities. "
                                          "Classes, the preprocessing record and the operating point travel inside the file.")
    p.add_argument("model", type=Path, nargs="?", default=PROJECT_MODEL, help="model file written by fine-tune (default: %(default)s)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="(default: %(default)s)")
    p.add_argument("--out", help="output file, or - for stdout (default: the model path with .onnx or .torchscript.pt)")
    p.add_argument("--operating-point", type=Path,
                   help=f"operating point to carry (default: {DEFAULT_OPERATING_POINT} when it was fitted for this model)")
    p.add_argument("--check", type=Path, default=Path("data/prepared"),
                   help="prepared arrays to compare the export with the PyTorch model on (default: %(default)s, when present)")
    # INT8 (medtl.deploy.int8): calibrated on validation, its test AUC change measured, refused beyond the tolerance
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
        reference_pair(reference_path(out), data, args.format, *reference)
        checked += f"; reference inputs and outputs of {len(reference[0])} test images: {reference_path(out)}"
    print(f"{out}: {args.format} {args.precision}, classes {', '.join(json.loads(meta['medtl.classes']))}; {checked}")
    return 0


def _check_against_audit(args: argparse.Namespace, data: bytes, meta: dict[str, str], reports: Path):
    """(the message, the reference pair's (images, ids, audited) or None); raises when the export is not the model."""
    found = test_images(args.check, max(16, args.reference)) if args.check and args.check.is_dir() else None
    if not found or not len(found[0]) or not _fits(found[0], meta):
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
    predictions = reports / PREDICTIONS
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
