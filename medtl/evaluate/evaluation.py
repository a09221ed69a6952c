"""evaluate: the model on validation and test -> metrics with intervals, operating point, plots, saliency.

Everything fitted (the operating threshold, the temperature) is fitted on the
validation split and applied unchanged to the reported split, so the test
split is looked at exactly once, by the final numbers.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medtl import hardware
from medtl.errors import MedtlError
from medtl.evaluate import external as ext
from medtl.evaluate import robustness as rob
from medtl.evaluate import predictions as preds
from medtl.evaluate.failures import FailureParams, source_refs, write_failures
from medtl.evaluate.metrics_report import curve_points, evaluate_split, site_summary, subgroup_columns
from medtl.evaluate.operating_point import OPERATING_POINT, data_profile, operating_point_record, write_operating_point
from medtl.evaluate.reports import FAILURES_DIR, write_reports
from medtl.io import atomic_dir, atomic_path, write_json
from medtl.metrics import apply_temperature, fit_temperature, operating_point, predict_labels, threshold_rule_problem
from medtl.model.classifier import load_classifier, model_preprocessing
from medtl.model.inference import predict_logits, prepare_model, use_fused
from medtl.params import Device, Precision, require, require_batch_size
from medtl.prepare.prepared import PreparedSplit, images_path, load_split, load_stats, stats_path



@dataclass(frozen=True)
class ThresholdParams:
    """How the operating threshold on the positive-class probability is chosen on validation."""

    rule: Literal["youden", "sensitivity", "specificity", "fixed"] = "youden"
    target: float | None = None  # the sensitivity/specificity to reach, or the fixed threshold

    def check(self, key: str) -> None:
        problem = threshold_rule_problem(self.rule, self.target)
        require(problem is None, f"{key}.target", self.target, f"{problem} (rule {self.rule!r})")


@dataclass(frozen=True)
class BootstrapParams:
    n_resamples: int = 1000
    seed: int = 0
    alpha: float = 0.05

    def check(self, key: str) -> None:
        require(self.n_resamples >= 10, f"{key}.n_resamples", self.n_resamples, "an integer of at least 10")
        require(0 < self.alpha < 0.5, f"{key}.alpha", self.alpha, "a number in (0, 0.5); 0.05 gives 95% intervals")


@dataclass(frozen=True)
class SaliencyParams:
    enabled: bool = True
    per_case: int = 2  # images per case (TP, FP, TN, FN)
    image_size: int = 256  # side of the written overlay in pixels

    def check(self, key: str) -> None:
        require(0 <= self.per_case <= 50, f"{key}.per_case", self.per_case, "an integer between 0 and 50")
        require(64 <= self.image_size <= 1024, f"{key}.image_size", self.image_size, "a side in pixels between 64 and 1024")


@dataclass(frozen=True)
class EvaluateParams:
    split: str = "test"
    batch_size: int = 64
    device: Device = "auto"
    precision: Precision = "auto"
    threshold: ThresholdParams = field(default_factory=ThresholdParams)
    temperature_scaling: bool = False
    bootstrap: BootstrapParams = field(default_factory=BootstrapParams)
    subgroups: list[str] = field(default_factory=lambda: ["sex", "age_band", "manufacturer", "view_position", "site"])
    min_subgroup_size: int = 30
    calibration_bins: int = 10
    saliency: SaliencyParams = field(default_factory=SaliencyParams)
    external: list[ext.ExternalSet] = field(default_factory=list)  # labelled external sets (medtl.evaluate.external)
    external_data: str = "medtl/intake/demo.py"  # what dvc tracks as their data: the folder that holds them
    shift: ext.ShiftParams = field(default_factory=ext.ShiftParams)
    robustness: rob.RobustnessParams = field(default_factory=rob.RobustnessParams)  # medtl.evaluate.robustness
    failures: FailureParams = field(default_factory=FailureParams)  # medtl.evaluate.failures

    def check(self, key: str) -> None:
        require(self.split in ("val", "test"), f"{key}.split", self.split, "'test' (or 'val' while developing)")
        require_batch_size(self.batch_size, f"{key}.batch_size")
        require(self.min_subgroup_size >= 1, f"{key}.min_subgroup_size", self.min_subgroup_size, "a positive integer")
        require(2 <= self.calibration_bins <= 100, f"{key}.calibration_bins", self.calibration_bins,
                "an integer between 2 and 100")
        require(len(set(self.subgroups)) == len(self.subgroups), f"{key}.subgroups", self.subgroups,
                "a list of distinct metadata column names")
        ext.check_external(self.external, self.external_data, key)


def _load_model(model_path: Path, prepared: Path, hw: hardware.Hardware):
    """The model, checked against the prepared data it is evaluated on: same record, same input."""
    model, ckpt = load_classifier(model_path)
    stats = load_stats(prepared)
    differ = model_preprocessing(ckpt, model_path).same_input(stats.preprocessing)
    if differ or stats.classes != list(ckpt["classes"]):
        what = ", ".join(differ + ([] if stats.classes == list(ckpt["classes"]) else ["classes"]))
        raise MedtlError(f"{model_path} was trained on other preprocessing than {stats_path(prepared)} records "
                         f"({what} differ); rerun the pipeline (dvc repro) so model and data match")
    return prepare_model(model, hw), ckpt, stats


def fit_operating_point(params: EvaluateParams, val_labels: np.ndarray, val_probs: np.ndarray) -> dict | None:
    """The operating point from the VALIDATION split only; None for K > 2 (argmax)."""
    if val_probs.shape[1] != 2:
        return None
    t = params.threshold
    return operating_point(val_labels, val_probs, t.rule, t.target)


def split_report(report: dict, params: EvaluateParams, skipped_subgroups: list[str]) -> tuple[dict, dict]:
    """(metrics, details). metrics.json holds only scalars, so that `dvc exp show` and `dvc metrics diff`
    show the headline numbers and their bounds as a handful of readable columns; everything nested
    (per class, confusion, calibration bins, subgroups) goes to evaluation.json."""
    nested = ("operating_point", "bootstrap", "per_class", "confusion_matrix", "confusion_matrix_normalized",
              "calibration", "subgroups", "classes")
    flags = {
        f"{col}={value}": entry["reason"]
        for col, table in report["subgroups"].items() for value, entry in table.items() if entry["too_small"]
    }
    metrics = {"split": params.split, **{k: v for k, v in report.items() if k not in nested}}
    metrics["temperature"] = report["calibration"]["temperature"]
    metrics["subgroups_too_small"] = len(flags)
    metrics.update(worst_subgroup(report["subgroups"]))
    details = {"split": params.split, **report, "subgroups_skipped": skipped_subgroups, "subgroups_too_small": flags}
    return metrics, details


def worst_subgroup(subgroups: dict, metric: str = "roc_auc") -> dict:
    """The subgroup with the lowest ROC AUC among those large enough to judge (`medtl exps` shows it); none: null."""
    judged = [(entry[metric], f"{col}={value}") for col, table in subgroups.items() for value, entry in table.items()
              if not entry.get("too_small") and isinstance(entry.get(metric), (int, float))]
    auc, name = min(judged) if judged else (None, None)
    return {"subgroups_worst": name, f"subgroups_worst_{metric}": auc}


def run_evaluate(params: EvaluateParams, model_path: Path, prepared: Path, out_dir: Path,
                 manifest: Path | None = None) -> dict:
    """Write metrics.json, evaluation.json, operating_point.json, predictions.csv, plots/, saliency/, failures/ and
    robustness.json into out_dir; `manifest` (ingest's) names the failure cases' source files by ref."""
    hw = hardware.select(params.device, params.precision, key="evaluate.device")
    model, ckpt, stats = _load_model(model_path, prepared, hw)
    classes = list(ckpt["classes"])
    val = load_split(prepared, "val", stats)
    data = val if params.split == "val" else load_split(prepared, params.split, stats)
    if len(data.labels) == 0:
        raise MedtlError(f"{images_path(prepared, params.split)} has no images; evaluate needs a non-empty {params.split} split")
    if len(val.labels) == 0:
        raise MedtlError(f"{images_path(prepared, 'val')} has no images; the operating threshold and temperature are fitted "
                         "on validation, so ingest.split.val must be above 0")
    fused = use_fused(model, hw, params.precision, len(val.labels) + (0 if data is val else len(data.labels)))
    val_logits = predict_logits(model, val.images, params.batch_size, hw, "evaluate val")
    logits = val_logits if data is val else predict_logits(model, data.images, params.batch_size, hw, f"evaluate {params.split}")

    temperature = fit_temperature(val_logits, val.labels) if params.temperature_scaling else None
    t = 1.0 if temperature is None else temperature
    val_probs, probs = apply_temperature(val_logits, t), apply_temperature(logits, t)
    op = fit_operating_point(params, val.labels, val_probs)

    subgroups, skipped = subgroup_columns(data.rows, params.subgroups)
    report = evaluate_split(
        data.labels, probs, classes, groups=[r["group"] for r in data.rows], subgroups=subgroups, operating=op,
        n_resamples=params.bootstrap.n_resamples, seed=params.bootstrap.seed, alpha=params.bootstrap.alpha,
        n_bins=params.calibration_bins, min_subgroup_size=params.min_subgroup_size, temperature=temperature,
    )
    metrics, details = split_report(report, params, skipped)
    site_metrics, site_detail = site_summary(report)  # per-site, from the `site` subgroup
    if site_detail:
        metrics.update(site_metrics)
        details["sites"] = site_detail
    details["hardware"] = hw.describe()  # the precision behind every probability written below
    threshold = report["threshold"]
    # External sets are decoded and prepared by the model's own record, never by today's params.
    external = ext.run_external(params, model, hw, classes, model_preprocessing(ckpt, model_path), temperature, op,
                                stats, prepared, params.split, data.images, data.labels, probs, report,
                                target_digests=(ckpt.get("target") or {}).get("pixel_digests", ()))
    metrics.update(external.metrics)
    details.update(external.details)
    details["inference"] = fused.record  # fused or eager, and why (docs/performance.md)
    robustness = _robustness(params, model, hw, data, probs, t, threshold)

    with atomic_dir(out_dir / "plots") as plots:
        write_plots(plots, data.labels, probs, classes, threshold, report["calibration"]["reliability"])
        write_json(plots / "sets.json", external.plot_rows)
        write_json(plots / "robustness.json", rob.curve_rows(robustness))
    with atomic_path(out_dir / preds.EXTERNAL_PREDICTIONS) as tmp:
        preds.write_table(tmp, preds.external_header(classes), external.predictions)
    with atomic_path(out_dir / preds.PREDICTIONS) as tmp:
        write_predictions(tmp, data, probs, classes, threshold)
    with atomic_path(out_dir / preds.VAL_PREDICTIONS) as tmp:  # out-of-fold predictions for `medtl cv report`
        write_predictions(tmp, val, val_probs, classes, threshold)
    with atomic_dir(out_dir / "saliency") as sal:
        details["saliency"] = _saliency(params, model, hw, data, probs, classes, threshold, sal)
    with atomic_dir(out_dir / FAILURES_DIR) as fail:
        details["failures"] = write_failures(params.failures, model, data, probs, classes, threshold, fail, hw.device,
                                             source_refs(manifest))
    profile = data_profile([load_split(prepared, s, stats) for s in ("train", "val", "test")])
    write_operating_point(out_dir / OPERATING_POINT,
                          operating_point_record(model_path, classes, op, temperature, profile))
    write_reports(out_dir, metrics, details, robustness)
    return metrics


def _robustness(params, model, hw, data, probs, temperature: float, threshold: float | None) -> dict:
    if not params.robustness.enabled:
        return rob.disabled_record()
    return rob.run_robustness(params.robustness, params.bootstrap, model, hw, data.images, data.labels,
                              [r["group"] for r in data.rows], probs, temperature, threshold, params.batch_size,
                              params.split)


def _saliency(params, model, hw, data, probs, classes, threshold, out: Path) -> dict:
    from medtl.evaluate import saliency

    if not params.saliency.enabled or params.saliency.per_case == 0:
        (out / "README.txt").write_text("saliency disabled (evaluate.saliency)\n")
        return {"enabled": False}
    try:
        written = saliency.write_overlays(model, data, probs, classes, threshold, out, params.saliency.per_case,
                                          params.saliency.image_size, hw.device)
    except saliency.NoTargetLayer as e:
        (out / "README.txt").write_text(f"no saliency maps: {e}\n")
        return {"enabled": True, "maps": 0, "note": str(e)}
    return {"enabled": True, "method": "grad-cam", "maps": len(written), "files": written}


def write_predictions(path: Path, data: PreparedSplit, probs: np.ndarray, classes: list[str],
                      threshold: float | None) -> None:
    pred = predict_labels(probs, threshold)
    above = lambda p: "" if threshold is None else str(bool(p[1] >= threshold)).lower()  # noqa: E731
    preds.write_table(path, preds.split_header(classes),
                      ([row["image_id"], row["group"], classes[y], classes[yp], above(p)] + [f"{v:.6f}" for v in p]
                       for row, y, yp, p in zip(data.rows, data.labels, pred, probs)))


def write_plots(plots: Path, labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None,
                reliability: list[dict]) -> None:
    """JSON rows for the templates named in dvc.yaml's top-level `plots`."""
    pred = predict_labels(probs, threshold)
    write_json(plots / "confusion.json", [{"actual": classes[a], "predicted": classes[b]} for a, b in zip(labels, pred)])
    curves = curve_points(labels, probs, classes) if len(np.unique(labels)) > 1 else {"roc": [], "pr": []}
    # Vega-Lite draws a missing value as a gap; the curve's end points carry no threshold.
    write_json(plots / "roc.json", [{**r, "threshold": r["threshold"] if r["threshold"] is not None else 1.0}
                                    for r in curves["roc"]])
    write_json(plots / "pr.json", [{**r, "threshold": r["threshold"] if r["threshold"] is not None else 1.0}
                                   for r in curves["pr"]])
    write_json(plots / "reliability.json", [
        {"mean_predicted": r["mean_predicted"], "observed": r["observed"], "perfect": r["mean_predicted"],
         "count": r["count"], "bin_centre": r["bin_centre"]}
        for r in reliability if r["count"]
    ])
