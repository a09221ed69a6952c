"""`medtl predict`: apply a model to new image files, with exactly the pipeline's preprocessing.

The model file carries its preprocessing record (medtl.prepare.imaging): how files
were read (window, frame, NIfTI slice), the channels, size, resize rule and
normalisation. Each file is decoded with those read options and turned into
the model's input by `medtl.prepare.imaging.model_input`, the function preprocess
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

import contextlib
import csv
import functools
import multiprocessing
import sys
from dataclasses import dataclass
from typing import Iterator
from pathlib import Path

from medtl.errors import MedtlError
from medtl.evaluate.operating_point import DEFAULT_PATH
from medtl.io import atomic_path, prefetch

# The training stack is imported where it is used: `medtl --help` imports this module.

DEFAULT_OPERATING_POINT = DEFAULT_PATH


@dataclass
class Operating:
    threshold: float | None  # None for K > 2 (argmax)
    source: str  # where the threshold came from, written into every row
    temperature: float | None = None
    modalities: tuple[str, ...] = ()  # what the model was evaluated on; empty: unknown
    colour: tuple[str, ...] = ()  # "gray" and/or "colour"; empty: unknown


def misfit(pixels: np.ndarray, metadata: dict, op: Operating) -> str | None:
    """Why this image does not fit what the model was trained and evaluated on, or None."""
    from medtl.intake.readers.base import colour_of

    modality = (metadata.get("modality") or "").upper()
    if op.modalities and modality and modality not in op.modalities:
        return (f"modality {modality} but the model was trained and evaluated on {', '.join(op.modalities)} images; "
                "pass --allow-mismatch to predict anyway")
    if not op.colour:  # the model's record does not say what it was evaluated on: nothing to compare
        return None
    colour = colour_of(pixels)
    if colour not in op.colour:
        return (f"a {colour} image but the model was trained and evaluated on {' and '.join(op.colour)} images "
                "only; pass --allow-mismatch to predict anyway")
    return None


def load_operating_point(path: Path | None, model_path: Path, classes: list[str], threshold: float | None) -> Operating:
    """Threshold and temperature for `model_path`: from --threshold, the evaluate stage's record, or 0.5."""
    from medtl.evaluate.operating_point import operating_point_for
    from medtl.metrics import DEFAULT_THRESHOLD

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
    problem: str | None = None  # a link inside the folder that loops, dangles or leaves it (medtl.intake.decode)
    detail: str = ""

    def name(self, name_files: bool) -> str:
        """How the CSV names the file inside its folder: its ref, or with --name-files its path; "" if passed itself."""
        if not self.relative:
            return ""
        from medtl.intake import phi

        return self.relative if name_files else phi.source_ref(self.relative)


def expand_inputs(inputs: list[str], hidden=None) -> list[InputFile]:
    """Files as given, folders walked recursively by the intake, in a stable order.

    A link that loops, dangles or leaves the folder becomes an error row (named by its ref, like the folder's
    other files); hidden files are not read, but counted in `hidden`.
    """
    from medtl.intake.decode import folder_items

    out: list[InputFile] = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            out.extend(InputFile(item.path or p / item.relative, name, item.relative, item.problem, item.detail)
                       for item in folder_items(p, hidden))
        elif p.is_file():
            out.append(InputFile(p, name))
        else:
            raise MedtlError(f"input {name} does not exist; expected image files or folders of DICOM, NIfTI, PNG or JPEG")
    return out


def _decode_file(file: InputFile, pre: Preprocessing, op: Operating, allow_mismatch: bool):
    """Decode and prepare one file: (file, sha256, error or [(image, refusal or None, model input)]).

    The intake decodes and checks it (burned-in text refused, header values checked) and words its problems
    without the path or any header value."""
    from medtl.intake.decode import decode_item
    from medtl.intake.sources import SourceItem
    from medtl.prepare.imaging import model_input

    item = SourceItem(file.relative, path=None if file.problem else file.path, problem=file.problem,
                      detail=file.detail)
    res = decode_item(item, pre.read_options())
    if res.problem:
        return file, res.sha256, f"{res.problem}: {res.detail}" if res.detail else res.problem
    out = []
    for k, d in enumerate(res.images):
        image = d.metadata.get("slice") or d.metadata.get("frame") or ("" if len(res.images) == 1 else str(k))
        why = None
        if not allow_mismatch and "modality" in d.blanked and op.modalities:
            why = ("modality is not a defined DICOM term, but the model was trained and evaluated on "
                   f"{', '.join(op.modalities)} images; pass --allow-mismatch to predict anyway")
        why = why or (None if allow_mismatch else misfit(d.pixels, d.metadata, op))
        out.append((image, why, None if why else model_input(d.pixels, pre)))
    return file, res.sha256, out


def _decoded(files: list[InputFile], decode, workers: int, ahead: int = 64) -> Iterator:
    """Decoded files in order, decoded while the model infers: in other processes with workers, else in a
    thread that stays at most `ahead` files ahead (decoders and torch release the GIL while they work)."""
    if len(files) < 2:
        yield from map(decode, files)
    elif workers >= 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(decode, files, chunksize=4)
    else:
        yield from prefetch(map(decode, files), depth=ahead)


def decode_workers(requested: int | None) -> tuple[int, int | None]:
    """(decode processes, torch threads to use or None to leave them) so that together they fill the cores.

    Decoding is a tenth to a fifth of the work at 224 px. On two cores a decode process takes a core from
    torch's two threads, so by default decoding runs in a read-ahead thread of this process instead (torch
    keeps every core); from four cores up, one process per four cores decodes and torch gets the cores left.
    OMP_NUM_THREADS, when set, is the user's choice of torch threads.
    """
    import os

    from medtl.hardware import available_cores

    cores = available_cores()
    workers = requested if requested is not None else (0 if cores <= 2 else max(1, cores // 4))
    if workers < 0:
        raise MedtlError(f"--workers must be 0 (decode in this process) or a positive number of processes, got {workers}")
    threads = None if "OMP_NUM_THREADS" in os.environ or workers == 0 else max(1, cores - workers)
    return workers, threads


def predict(model_path: Path, inputs: list[str], out: Path, batch_size: int = 32, *,
            operating_point: Path | None = None, threshold: float | None = None,
            hw: hardware.Hardware | None = None, allow_mismatch: bool = False, workers: int | None = None,
            name_files: bool = False, precision: str = "auto") -> dict:
    """Write one CSV row per image (or per unreadable file) to `out`; return counts."""
    import numpy as np
    from tqdm import tqdm

    from medtl import hardware
    from medtl.metrics import apply_temperature, predict_labels
    from medtl.model.classifier import load_classifier, model_preprocessing
    from medtl.model.inference import predict_logits, prepare_model, use_fused

    if batch_size < 1:
        raise MedtlError(f"--batch-size must be a positive integer, got {batch_size}")
    workers, threads = decode_workers(workers)
    hw = hw or hardware.select("auto", "auto")
    model, ckpt = load_classifier(model_path)
    classes = list(ckpt["classes"])
    pre = model_preprocessing(ckpt, model_path)
    op = load_operating_point(operating_point, model_path, classes, threshold)
    from collections import Counter

    hidden = Counter()
    files = expand_inputs(inputs, hidden)
    if not files:
        raise MedtlError(f"no files found in {', '.join(inputs)}")
    if not name_files and any(f.relative for f in files):
        from medtl.intake import phi

        if phi.uses_default_key():
            print(f"predict: warning: file refs use the public demo key (anyone can recompute them from guessed "
                  f"paths); set {phi.KEY_ENV} to a secret (docs/data.md)", file=sys.stderr)
    prepare_model(model, hw)
    fused = use_fused(model, hw, precision, len(files))  # `precision`: what the user asked for (auto fuses)

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

    with _torch_threads(threads if len(files) > 1 else None), atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
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
    return {**counts, "files": len(files), "threshold": op.threshold, "threshold_source": op.source,
            "hidden": hidden["hidden_file"], "inference": fused.record}


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """At most `n` torch threads inside, the caller's count again after."""
    import torch

    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(min(n, saved))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


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
    p.add_argument("--workers", type=int, default=None,
                   help="processes that decode files while the model predicts; 0 decodes in a read-ahead thread of "
                        "this process (default: 0 on one or two cores, else one per four cores with torch on the rest)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from medtl import hardware

    hw = hardware.select(args.device, args.precision, key="--device")
    res = predict(args.model, args.inputs, args.out, args.batch_size, operating_point=args.operating_point,
                  threshold=args.threshold, hw=hw, allow_mismatch=args.allow_mismatch, workers=args.workers,
                  name_files=args.name_files, precision=args.precision)
    print(f"medtl predict: {res['ok']} image(s) predicted, {res['error']} unreadable, {res['refused']} refused, "
          f"threshold {res['threshold']} ({res['threshold_source']}); inference {res['inference']['mode']} -> {args.out}"
          + (f"; {res['hidden']} hidden file(s) not read" if res["hidden"] else ""))
    if res["ok"] == 0:
        raise MedtlError(f"no image could be predicted; see the error column of {args.out}")
    return 0
