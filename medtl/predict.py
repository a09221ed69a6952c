"""`medtl predict`: apply a model to new image files, with exactly the pipeline's preprocessing.

The model file carries its preprocessing record (medtl.imaging): how files
were read (window, frame, NIfTI slice), the channels, size, resize rule and
normalisation. Each file is decoded with those read options and turned into
the model's input by `medtl.imaging.model_input`, the function preprocess
used for the evaluated arrays, so no setting has to be retyped. A file that
cannot be read, or an image that does not fit the model, gets an error row;
the other images are still predicted.

The CSV names only what the user typed: a file passed by name keeps its path;
a file found inside a passed folder is named by its keyed ref (as ingest names
source files; `medtl locate --folder` maps it back) and its sha256, because
folder and file names of clinical exports often carry names and record
numbers. `--name-files` writes the paths inside the folder instead.
"""
from __future__ import annotations

import csv
import functools
import multiprocessing
import sys
from dataclasses import dataclass
from typing import Iterator
from pathlib import Path

from medtl.errors import MedtlError, UnreadableImage
from medtl.io import atomic_path

# The training stack is imported where it is used: `medtl --help` imports this module.

DEFAULT_OPERATING_POINT = Path("reports/operating_point.json")


@dataclass
class Operating:
    threshold: float | None  # None for K > 2 (argmax)
    source: str  # where the threshold came from, written into every row
    temperature: float | None = None
    modalities: tuple[str, ...] = ()  # what the model was evaluated on; empty: unknown
    colour: tuple[str, ...] = ()  # "gray" and/or "colour"; empty: unknown


def misfit(pixels: np.ndarray, metadata: dict, op: Operating) -> str | None:
    """Why this image does not fit what the model was trained and evaluated on, or None."""
    from medtl.readers import colour_of

    modality = (metadata.get("modality") or "").upper()
    if op.modalities and modality and modality not in op.modalities:
        return (f"modality {modality} but the model was trained and evaluated on {', '.join(op.modalities)} images; "
                "pass --allow-mismatch to predict anyway")
    colour = colour_of(pixels)
    if op.colour and colour not in op.colour:
        return (f"a {colour} image but the model was trained and evaluated on {' and '.join(op.colour)} images "
                "only; pass --allow-mismatch to predict anyway")
    return None


def load_operating_point(path: Path | None, model_path: Path, classes: list[str], threshold: float | None) -> Operating:
    """Threshold and temperature for `model_path`: from --threshold, the evaluate stage's record, or 0.5."""
    from medtl.metrics import DEFAULT_THRESHOLD
    from medtl.operating_point import operating_point_for

    record = operating_point_for(path, model_path, classes, "predict",
                                 "rerun the evaluate stage (dvc repro) for this model, or pass --threshold", "it is not used")
    k = len(classes)
    if k > 2:
        if threshold is not None:
            raise MedtlError(f"--threshold applies to binary models; {model_path} has {k} classes and predicts by argmax")
        t, source = None, "argmax"
    elif threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise MedtlError(f"--threshold must be a probability in [0, 1], got {threshold}")
        t, source = float(threshold), "--threshold"
    elif record is not None:
        t, source = float(record["threshold"]), f"{record['rule']} on validation ({path or DEFAULT_OPERATING_POINT})"
    else:
        t, source = DEFAULT_THRESHOLD, "default 0.5 (no operating point found)"
        print("medtl predict: note: no operating point for this model; calling positive at p >= 0.5. Pass "
              "--operating-point reports/operating_point.json (from dvc repro) or --threshold", file=sys.stderr)
    if record is None:
        return Operating(t, source)
    data = record.get("data") or {}
    return Operating(t, source, record.get("temperature"), tuple(data.get("modalities") or ()),
                     tuple(data.get("colour") or ()))


@dataclass(frozen=True)
class InputFile:
    path: Path  # where it is read from
    given: str  # the command-line argument it came from, as typed
    relative: str = ""  # its path inside that argument when the argument is a folder

    def name(self, name_files: bool) -> str:
        """How the CSV names the file inside its folder: its ref, or with --name-files its path; "" if passed itself."""
        if not self.relative:
            return ""
        from medtl import phi

        return self.relative if name_files else phi.source_ref(self.relative)


def expand_inputs(inputs: list[str]) -> list[InputFile]:
    """Files as given, folders walked recursively (hidden files skipped), in a stable order."""
    from medtl.sources import iter_files

    out: list[InputFile] = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            out.extend(InputFile(f, name, f.relative_to(p).as_posix()) for f in iter_files(p))
        elif p.is_file():
            out.append(InputFile(p, name))
        else:
            raise MedtlError(f"input {name} does not exist; expected image files or folders of DICOM, NIfTI, PNG or JPEG")
    return out


def _decode_file(file: InputFile, pre: Preprocessing, op: Operating, allow_mismatch: bool):
    """Decode and prepare one file: (file, sha256, error or [(image, refusal or None, model input)])."""
    from medtl import phi
    from medtl.imaging import decode, model_input
    from medtl.io import sha256_file

    digest = ""
    try:
        digest = sha256_file(file.path)
        decoded = decode(file.path, pre)
    except UnreadableImage as e:  # its detail may quote the path, which names the patient in many exports
        return file, digest, phi.scrub_path(str(e), file.path, file.relative)
    except OSError as e:
        return file, "", f"unreadable_file: {phi.error_kind(e)}"
    out = []
    for k, d in enumerate(decoded):
        image = d.metadata.get("slice") or d.metadata.get("frame") or ("" if len(decoded) == 1 else str(k))
        why = None if allow_mismatch else misfit(d.pixels, d.metadata, op)
        out.append((image, why, None if why else model_input(d.pixels, pre)))
    return file, digest, out


def _decoded(files: list[InputFile], decode, workers: int) -> Iterator:
    """Decoded files in order; with workers, decoding runs in other processes while the model infers."""
    if workers < 1 or len(files) < 2:
        yield from map(decode, files)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(decode, files, chunksize=4)


def predict(model_path: Path, inputs: list[str], out: Path, batch_size: int = 32, *,
            operating_point: Path | None = None, threshold: float | None = None,
            hw: hardware.Hardware | None = None, allow_mismatch: bool = False, workers: int = 1,
            name_files: bool = False) -> dict:
    """Write one CSV row per image (or per unreadable file) to `out`; return counts."""
    import numpy as np
    from tqdm import tqdm

    from medtl import hardware
    from medtl.inference import predict_logits, prepare_model
    from medtl.metrics import apply_temperature, predict_labels
    from medtl.model import load_classifier, model_preprocessing

    if batch_size < 1:
        raise MedtlError(f"--batch-size must be a positive integer, got {batch_size}")
    hw = hw or hardware.select("auto", "auto")
    model, ckpt = load_classifier(model_path)
    classes = list(ckpt["classes"])
    pre = model_preprocessing(ckpt, model_path)
    op = load_operating_point(operating_point, model_path, classes, threshold)
    files = expand_inputs(inputs)
    if not files:
        raise MedtlError(f"no files found in {', '.join(inputs)}")
    if not name_files and any(f.relative for f in files):
        from medtl import phi

        if phi.uses_default_key():
            print(f"predict: warning: file refs use the public demo key (anyone can recompute them from guessed "
                  f"paths); set {phi.KEY_ENV} to a secret (docs/data.md)", file=sys.stderr)
    prepare_model(model, hw)

    header = ["path", "file", "sha256", "image", "status", "predicted"] + [f"prob_{c}" for c in classes] + \
             ["above_threshold", "threshold", "error"]
    counts = {"ok": 0, "error": 0, "refused": 0}
    pending: list[tuple[list[str], np.ndarray]] = []

    def row(named: list[str], status: str, error: str = "", probs=None) -> list:
        counts[status] += 1
        if probs is None:
            return [*named, status, ""] + [""] * len(classes) + ["", "" if op.threshold is None else op.threshold, error]
        predicted = classes[int(predict_labels(probs[None], op.threshold)[0])]
        above = "" if op.threshold is None else str(bool(probs[1] >= op.threshold)).lower()
        return [*named, status, predicted] + [f"{v:.6f}" for v in probs] + \
               [above, "" if op.threshold is None else op.threshold, ""]

    def flush(writer) -> None:
        if not pending:
            return
        # the per-file bar below is the command's one progress bar
        logits = predict_logits(model, np.stack([x for _, x in pending]), batch_size, hw, "predict", progress=False)
        probs = apply_temperature(logits, op.temperature or 1.0)
        for (named, _), p in zip(pending, probs):
            writer.writerow(row(named, "ok", probs=p))
        pending.clear()

    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        decode_one = functools.partial(_decode_file, pre=pre, op=op, allow_mismatch=allow_mismatch)
        for file, digest, result in tqdm(_decoded(files, decode_one, workers), total=len(files), desc="predict",
                                         unit="file"):
            named = [file.given, file.name(name_files), digest]
            if isinstance(result, str):
                flush(writer)
                writer.writerow(row([*named, ""], "error", result))
                continue
            for image, why, prepared in result:
                if why:
                    flush(writer)
                    writer.writerow(row([*named, image], "refused", why))
                    continue
                pending.append(([*named, image], prepared))
                if len(pending) >= batch_size:
                    flush(writer)
        flush(writer)
    return {**counts, "files": len(files), "threshold": op.threshold, "threshold_source": op.source}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="apply a model to image files and folders",
        description="Apply a model (models/model.pt) to DICOM, NIfTI, PNG or JPEG files and folders with the "
                    "preprocessing recorded in the model (read options such as the CT window included), and write "
                    "one CSV row per image. See docs/evaluation.md.")
    p.add_argument("model", type=Path, help="model file written by the fine-tune stage")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (walked recursively)")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--operating-point", type=Path, default=None,
                   help=f"threshold record from the evaluate stage (default: {DEFAULT_OPERATING_POINT} if it exists "
                        "and was fitted for this model)")
    p.add_argument("--threshold", type=float, default=None, help="positive-class threshold; overrides the operating point")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="predict images whose modality or colour differs from the model's data instead of refusing them")
    p.add_argument("--name-files", action="store_true",
                   help="name files found inside a folder by their path in it instead of a ref (f-...); such paths "
                        "often carry patient names or record numbers, so keep that CSV inside the hospital")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that decode files while the model predicts; 0 decodes in the main process "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from medtl import hardware

    hw = hardware.select(args.device, args.precision, key="--device")
    res = predict(args.model, args.inputs, args.out, args.batch_size, operating_point=args.operating_point,
                  threshold=args.threshold, hw=hw, allow_mismatch=args.allow_mismatch, workers=args.workers,
                  name_files=args.name_files)
    print(f"medtl predict: {res['ok']} image(s) predicted, {res['error']} unreadable, {res['refused']} refused, "
          f"threshold {res['threshold']} ({res['threshold_source']}) -> {args.out}")
    if res["ok"] == 0:
        raise MedtlError(f"no image could be predicted; see the error column of {args.out}")
    return 0
