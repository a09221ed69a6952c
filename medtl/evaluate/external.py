"""External validation: labelled sets from elsewhere, evaluated exactly as the test split, and shift statistics.

Each set in `evaluate.external` is any ingest source (folder, csv, dicom,
medmnist, demo). Its files are decoded and prepared by the preprocessing
record the model carries (`medtl.prepare.imaging`: the read options ingest used, the
image side, channels and resize rule), exactly as `medtl predict` does, and
the model is applied with the threshold and temperature fitted on validation:
nothing is refitted on external data. Every set, the internal test split
included, gets shift statistics: how far its intensity distribution lies from
the training images', its true and predicted prevalence, and whether the
threshold's validation sensitivity or specificity falls outside the set's own
interval.
"""
from __future__ import annotations

import csv
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medtl.errors import MedtlError
from medtl.evaluate.metrics_report import evaluate_split
from medtl.intake import decode as intake, phi
from medtl.intake.sources import SOURCES, SourceName, check_source_paths, open_source_as, source_inputs
from medtl.intake.sources.sections import SourceRequest, SourceSections
from medtl.metrics import apply_temperature, predict_labels
from medtl.model.inference import predict_logits
from medtl.params import require
from medtl.prepare.imaging import Preprocessing, model_input
from medtl.prepare.prepared import PreparedStats, load_images

HIST_BINS = 100  # intensity histogram bins over [0, 1]
MAX_HIST_IMAGES = 2000  # images sampled (evenly) for an intensity histogram, so memory and time stay flat
RESERVED_NAMES = {"val", "test", "train"}
SET_METRICS = ("n", "n_groups", "threshold", "threshold_rule")


@dataclass(frozen=True)
class ShiftParams:
    # Wasserstein-1 distance between a set's and the training images' intensity distributions (intensities in
    # [0, 1], as the model sees them) above which the set is flagged.
    max_intensity_distance: float = 0.05

    def check(self, key: str) -> None:
        require(0 < self.max_intensity_distance <= 1, f"{key}.max_intensity_distance", self.max_intensity_distance,
                "a distance in (0, 1] on the [0, 1] intensity scale")


@dataclass(frozen=True)
class ExternalSet(SourceSections):
    """One labelled external set: a name and an ingest source with that source's params."""

    name: str = ""
    source: SourceName = "folder"
    split: Literal["train", "val", "test"] | None = None  # only what the source puts in this split; null: all

    def check(self, key: str) -> None:
        require(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)) and self.name not in RESERVED_NAMES,
                f"{key}.name", self.name, "a name of letters, digits, '.', '_' or '-', other than train, val and test")
        require(self.source in SOURCES, f"{key}.source", self.source, "one of " + ", ".join(SOURCES))
        check_source_paths(self, key)

    def source_inputs(self) -> list[str]:
        """Files or folders the source reads; the demo reads none."""
        return source_inputs(self)


def check_external(sets: list[ExternalSet], data: str, key: str) -> None:
    """Distinct names, and every set's files inside `data`, the one path dvc tracks for them."""
    names = [s.name for s in sets]
    require(len(set(names)) == len(names), f"{key}.external", names, "sets with distinct names")
    root = Path(data).resolve()
    for i, s in enumerate(sets):
        intake.check_data_paths(data, [(f"{key}.external[{i}].{s.source}", p) for p in s.source_inputs()],
                                f"{key}.external_data")
        for path in s.source_inputs():
            require(Path(path).resolve().is_relative_to(root), f"{key}.external[{i}].{s.source}", path,
                    f"a path inside {key}.external_data ({data!r}), which dvc tracks so that evaluate reruns when "
                    "an external set changes; set external_data to the folder holding your external sets")


# ---------------------------------------------------------------- shift statistics


def intensity_histogram(images: np.ndarray) -> np.ndarray:
    """Normalised histogram of the pixel intensities of (N, C, S, S) images in [0, 1], up to MAX_HIST_IMAGES of them."""
    counts = np.zeros(HIST_BINS, dtype=np.float64)
    if len(images) == 0:
        return counts
    for i in np.unique(np.linspace(0, len(images) - 1, min(len(images), MAX_HIST_IMAGES)).astype(np.int64)):
        counts += np.histogram(np.asarray(images[i], dtype=np.float32), bins=HIST_BINS, range=(0.0, 1.0))[0]
    return counts / max(counts.sum(), 1.0)


def distribution_distance(a: np.ndarray, b: np.ndarray) -> dict:
    """Wasserstein-1 (area between the CDFs, intensity units) and Kolmogorov-Smirnov (largest CDF gap)."""
    gap = np.abs(np.cumsum(a) - np.cumsum(b))
    return {"intensity_wasserstein": float(gap.sum() / HIST_BINS), "intensity_ks": float(gap.max())}


def shift_statistics(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, report: dict, op: dict | None,
                     train_hist: np.ndarray, params: ShiftParams) -> dict:
    """Intensity distance to train, true vs predicted prevalence, and the flags, for one evaluated set."""
    out = distribution_distance(intensity_histogram(images), train_hist)
    out["intensity_shift"] = out["intensity_wasserstein"] > params.max_intensity_distance
    binary = probs.shape[1] == 2
    called = predict_labels(probs, report["threshold"])
    out["prevalence"] = float(np.mean(labels == 1)) if binary else None
    out["predicted_prevalence"] = float(np.mean(called == 1)) if binary else None
    out["mean_probability"] = float(np.mean(probs[:, 1])) if binary else None
    moved = {}
    for m in ("sensitivity", "specificity"):
        val, low, high = (op or {}).get(f"val_{m}"), report.get(f"{m}_ci_low"), report.get(f"{m}_ci_high")
        if val is None or low is None or high is None:
            continue
        moved[m] = {"val": val, "low": low, "high": high, "outside": not low <= val <= high}
    out["operating_point_shift"] = any(v["outside"] for v in moved.values()) if moved else None
    out["operating_point_moves"] = moved
    return out


# ---------------------------------------------------------------- loading a set


@dataclass
class ExternalData:
    images: np.ndarray  # (N, C, S, S) float16, prepared as the model's own data
    labels: np.ndarray  # (N,) int64
    rows: list[dict]  # image_id, group (pseudonymous), whitelisted metadata
    skipped: dict[str, int]  # files not used, by reason
    grouping: dict[str, int]  # images per kind of group (patient_id, column, rule, source, image), as ingest names them
    warnings: dict[str, int]  # decoder warnings by kind (never their text, which may quote header values)


def check_pseudonym_key(spec: ExternalSet, key: str) -> None:
    """As ingest: real DICOM ids pseudonymised with the public key could be reversed by anyone, so refuse."""
    phi.pseudonym_key()  # a short key is refused before any work
    phi.refuse_demo_key(spec.source, f"{key} ({spec.name})")
    if spec.source == "dicom" and phi.uses_default_key():
        raise MedtlError(f"{key} ({spec.name}) is a dicom source and no pseudonym key is set, so its patient ids "
                         f"would be pseudonymised with the public demo key, which anyone can use to reverse them; "
                         f"{phi.HOW_TO_SET_KEY}")


def load_external(spec: ExternalSet, key: str, classes: list[str], pre: Preprocessing) -> ExternalData:
    """Decode and prepare every labelled image of the set; unreadable files are counted, unknown labels refused."""
    check_pseudonym_key(spec, key)
    index = {c: i for i, c in enumerate(classes)}
    options = pre.read_options()
    allowed = spec.csv.allow_columns if spec.source == "csv" else []  # identifying columns the user chose to keep
    workdir = Path(tempfile.mkdtemp(prefix="medtl-external-"))
    images, labels, rows, skipped, kinds, caught_kinds = [], [], [], Counter(), Counter(), Counter()
    try:
        source = open_source_as(SourceRequest.of(spec, classes), workdir, key, f"{key} ({spec.name})")
        try:
            for item in source.items:
                if spec.split is not None and item.split != spec.split:
                    continue
                if item.problem:
                    skipped[item.problem] += 1
                    continue
                res = intake.decode_item(item, options)  # burned-in text is refused, as in ingest
                caught_kinds.update(res.warnings)
                if res.problem:
                    skipped[res.problem] += 1
                    continue
                label, group, kind = item.label, item.group, item.group_kind
                if source.resolve is not None:
                    found = source.resolve(item, res.identity)
                    if found.problem:
                        skipped[found.problem] += 1
                        continue
                    label, group = found.label, found.group
                    if group and group != item.group:
                        kind = "patient_id" if source.header_group == "PatientID" else "source"
                label = (label or "").strip()
                if not label:
                    skipped["no_label"] += 1
                    continue
                if label not in index:  # the file is named by its ref, never by its path
                    raise MedtlError(f"{key} ({spec.name}) has label {label!r} (file {phi.source_ref(item.ref_key)}), "
                                     f"which the model does not know; its classes are {', '.join(classes)}")
                identity = res.identity
                if not group and identity.get("PatientID"):
                    group, kind = identity["PatientID"], "patient_id"
                if not group:  # no group information: the file is its own group, as in ingest
                    group, kind = "image:" + item.ref_key, "image"
                for image in res.images:
                    images.append(model_input(image.pixels, pre))
                    labels.append(index[label])
                    kinds[kind] += 1
                    rows.append({**phi.filter_metadata({**image.metadata, **item.extra}, sorted(item.extra), allowed),
                                 "image_id": f"{spec.name}-{len(rows):06d}", "group": phi.pseudonymise(group),
                                 "source_ref": res.ref, "sha256": res.sha256, "index": item.index or ""})
        finally:
            if source.cleanup:
                source.cleanup()
        if source.description.get("hidden_files"):  # not read, but counted like every file not used
            skipped["hidden_file"] += source.description["hidden_files"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not images:
        raise MedtlError(f"{key} ({spec.name}) has no usable labelled image (skipped: {dict(skipped) or 'none'})")
    return ExternalData(np.stack(images), np.array(labels, dtype=np.int64), rows, dict(sorted(skipped.items())),
                        dict(sorted(kinds.items())), dict(sorted(caught_kinds.items())))


# ---------------------------------------------------------------- evaluation


@dataclass
class ExternalResults:
    # For metrics.json, flat like the rest of it: "shift.<stat>" for the reported split, "external.<set>.<column>"
    # per external set, which `dvc exp show` shows as columns beside the test split's.
    metrics: dict
    details: dict  # for evaluation.json
    predictions: list[list]  # rows for external_predictions.csv
    plot_rows: list[dict]  # per set and metric, for reports/plots/sets.json


def set_metrics(report: dict, shift: dict) -> dict:
    """The scalar columns of one set: counts, threshold, headline metrics with bounds, shift statistics and flags."""
    out = {k: report[k] for k in SET_METRICS}
    out.update({k: v for k, v in report.items() if k.endswith(("_ci_low", "_ci_high")) or f"{k}_ci_low" in report})
    out.update({k: v for k, v in shift.items() if k != "operating_point_moves"})
    return out


def run_external(params, model, hw, classes: list[str], pre: Preprocessing, temperature: float | None,
                 op: dict | None, stats: PreparedStats, prepared: Path, test_name: str, test_images: np.ndarray,
                 test_labels: np.ndarray, test_probs: np.ndarray, test_report: dict,
                 target_digests=()) -> ExternalResults:
    """Shift statistics of the reported split, and every external set evaluated with the validation-fitted operating point.

    `pre` is the model's preprocessing record: every external file is decoded and prepared by it alone.
    `target_digests`: pixel digests of the unlabelled target images the model was adapted on; a set sharing
    any is flagged `transductive`."""
    from medtl.train.target import shared_images

    from medtl.evaluate.metrics_report import subgroup_columns

    train_hist = intensity_histogram(load_images(prepared, "train", stats))
    test_shift = shift_statistics(test_images, test_labels, test_probs, test_report, op, train_hist, params.shift)
    metrics = {f"shift.{k}": v for k, v in test_shift.items() if k != "operating_point_moves"}
    details = {"shift": test_shift, "external": {}}
    predictions, plot_rows = [], _plot_rows(test_name, test_report)
    boot = params.bootstrap
    for i, spec in enumerate(params.external):
        key = f"evaluate.external[{i}]"
        data = load_external(spec, key, classes, pre)
        logits = predict_logits(model, data.images, params.batch_size, hw, f"evaluate {spec.name}")
        probs = apply_temperature(logits, 1.0 if temperature is None else temperature)
        subgroups, skipped_subgroups = subgroup_columns(data.rows, params.subgroups)
        report = evaluate_split(
            data.labels, probs, classes, groups=[r["group"] for r in data.rows], subgroups=subgroups, operating=op,
            n_resamples=boot.n_resamples, seed=boot.seed, alpha=boot.alpha, n_bins=params.calibration_bins,
            min_subgroup_size=params.min_subgroup_size, temperature=temperature,
        )
        shift = shift_statistics(data.images, data.labels, probs, report, op, train_hist, params.shift)
        shared = shared_images(data.images, target_digests)
        shift.update(transductive=shared > 0, transductive_images=shared)
        metrics.update({f"external.{spec.name}.{k}": v for k, v in set_metrics(report, shift).items()})
        details["external"][spec.name] = {"source": spec.source, "skipped_files": data.skipped,
                                          "grouping": data.grouping, "decoder_warnings": data.warnings,
                                          "shift": shift, "subgroups_skipped": skipped_subgroups, **report}
        called = predict_labels(probs, report["threshold"])
        for row, y, yp, p in zip(data.rows, data.labels, called, probs):
            above = "" if report["threshold"] is None or len(classes) != 2 else str(bool(p[1] >= report["threshold"])).lower()
            predictions.append([spec.name, row["image_id"], row["group"], classes[y], classes[yp], above] +
                               [f"{v:.6f}" for v in p] + [row["source_ref"], row["sha256"], row["index"]])
        plot_rows += _plot_rows(spec.name, report)
    return ExternalResults(metrics, details, predictions, plot_rows)


def set_columns(metrics: dict, name: str) -> dict:
    """One external set's columns from metrics.json, without their "external.<set>." prefix."""
    prefix = f"external.{name}."
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def _plot_rows(name: str, report: dict) -> list[dict]:
    return [{"set": name, "metric": m, "label": f"{name}: {m}", "value": report[m],
             "low": report.get(f"{m}_ci_low"), "high": report.get(f"{m}_ci_high")}
            for m in ("roc_auc", "sensitivity", "specificity") if report.get(m) is not None]
