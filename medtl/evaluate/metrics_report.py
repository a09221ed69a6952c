"""The evaluation report of one split, built on the metrics engine (`medtl.metrics`).

Headline metrics with patient-bootstrap intervals, per-class values with
their intervals, the operating point, confusion matrices, calibration,
subgroups, and the ROC / precision-recall rows `dvc plots` draws. Everything
returned is JSON-ready: undefined values are None.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from medtl.errors import MedtlError
from medtl.metrics import (
    DEFAULT_THRESHOLD, _check_bootstrap_args, _check_n_bins, _check_threshold, _div, _labels_and_probs, _metric_names,
    _nan_to_none, _units, bootstrap_ci, check_binary_scores, headline_metrics, per_class_metrics, point_estimates,
    reliability_diagram,
)


# ---------------------------------------------------------------- subgroups


def _subgroup_label(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value) in ("", "nan", "None"):
        return "missing"
    return str(value)


def subgroup_metrics(y_true, probs, groups, subgroup_values, *, classes: Sequence[str] | None = None,
                     metrics: Sequence[str] | None = None, threshold: float | None = None,
                     n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05, n_bins: int = 15,
                     min_size: int = 30) -> dict[str, dict]:
    """Headline metrics with bootstrap intervals per subgroup (e.g. sex, site, scanner).

    `subgroup_values` (N,) gives each image's subgroup; empty or missing values
    form the subgroup "missing". A subgroup is flagged `too_small` when it has
    fewer than `min_size` images or lacks a class: its numbers are reported
    but should not be read as evidence.
    """
    y, p = _labels_and_probs(y_true, probs)
    k = p.shape[1]
    names, custom = _metric_names(metrics, k)
    if custom:
        raise ValueError("subgroup_metrics takes built-in metric names only")
    values = np.asarray(subgroup_values, dtype=object)
    if values.shape != (y.size,):
        raise ValueError(f"subgroup_values must be 1-D with one entry per image ({y.size}), got shape {values.shape}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
    class_names = list(classes) if classes is not None else [str(i) for i in range(k)]
    if len(class_names) != k:
        raise ValueError(f"classes has {len(class_names)} names but probs has {k} columns")
    g = None if groups is None else np.asarray(groups)
    labels = np.array([_subgroup_label(v) for v in values], dtype=object)
    out: dict[str, dict] = {}
    for value in sorted(set(labels.tolist())):
        mask = labels == value
        ys, ps = y[mask], p[mask]
        gs = None if g is None else g[mask]
        counts = np.bincount(ys, minlength=k)
        reasons = []
        if mask.sum() < min_size:
            reasons.append(f"{int(mask.sum())} images < min_size {min_size}")
        missing = [class_names[c] for c in range(k) if counts[c] == 0]
        if missing:
            reasons.append("no images of class " + ", ".join(missing))
        entry: dict = {
            "n": int(mask.sum()),
            "n_groups": int(mask.sum()) if gs is None else int(np.unique(gs.astype(str)).size),
            "class_counts": {class_names[c]: int(counts[c]) for c in range(k)},
            "too_small": bool(reasons),
            "reason": "; ".join(reasons) or None,
        }
        point = point_estimates(ys, ps, names, threshold=threshold, n_bins=n_bins)
        ci = bootstrap_ci(ys, ps, gs, names, n_resamples, seed, threshold, alpha, n_bins=n_bins)
        for name in names:
            entry[name] = point[name]
            entry[f"{name}_ci_low"] = ci[name]["low"]
            entry[f"{name}_ci_high"] = ci[name]["high"]
        out[value] = entry
    return _nan_to_none(out)


# ---------------------------------------------------------------- curves


def _downsample(n: int, max_points: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(np.int64))


def roc_points(y_true, p_pos, max_points: int = 200) -> list[dict]:
    """ROC curve rows {fpr, tpr, threshold}, from (0, 0) to (1, 1), at most `max_points` rows.

    Each row is the rate when p_pos >= threshold; the (0, 0) row has threshold None.
    """
    y, s = check_binary_scores(y_true, p_pos, "(one-vs-rest for K > 2)")
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return []
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thr = np.r_[np.nan, s_sorted[last]]
    keep = _downsample(fpr.size, max_points)
    return _nan_to_none([{"fpr": fpr[i], "tpr": tpr[i], "threshold": thr[i]} for i in keep])


def pr_points(y_true, p_pos, max_points: int = 200) -> list[dict]:
    """Precision-recall rows {recall, precision, threshold} by increasing recall, at most `max_points` rows."""
    y, s = check_binary_scores(y_true, p_pos, "(one-vs-rest for K > 2)")
    n_pos = int(y.sum())
    if n_pos == 0:
        return []
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps = np.cumsum(y_sorted)[last]
    recall = np.r_[0.0, tps / n_pos]
    precision = np.r_[1.0, tps / (last + 1)]  # recall 0 is drawn at precision 1, as scikit-learn does
    thr = np.r_[np.nan, s_sorted[last]]
    keep = _downsample(recall.size, max_points)
    return _nan_to_none([{"recall": recall[i], "precision": precision[i], "threshold": thr[i]} for i in keep])


def curve_points(y_true, probs, classes: Sequence[str], max_points: int = 200) -> dict[str, list[dict]]:
    """{"roc": rows, "pr": rows} for `dvc plots`; binary: the positive class, K > 2: one-vs-rest rows tagged with "class"."""
    y, p = _labels_and_probs(y_true, probs)
    k = p.shape[1]
    if len(classes) != k:
        raise ValueError(f"classes has {len(classes)} names but probs has {k} columns")
    if k == 2:
        return {"roc": roc_points(y == 1, p[:, 1], max_points), "pr": pr_points(y == 1, p[:, 1], max_points)}
    roc, pr = [], []
    for c, name in enumerate(classes):
        roc += [{"class": name, **row} for row in roc_points(y == c, p[:, c], max_points)]
        pr += [{"class": name, **row} for row in pr_points(y == c, p[:, c], max_points)]
    return {"roc": roc, "pr": pr}


# ---------------------------------------------------------------- reports


def evaluate_split(y_true, probs, classes: Sequence[str], *, groups=None,
                   subgroups: Mapping[str, Sequence] | None = None, operating: dict | float | None = None,
                   n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05, n_bins: int = 15,
                   min_subgroup_size: int = 30, temperature: float | None = None) -> dict:
    """The full, JSON-serialisable evaluation report of one split, laid out for `dvc exp show`.

    `operating` is an `operating_point(...)` dict fitted on validation data, a
    bare threshold, or None (0.5); it is ignored for K > 2 (argmax).
    `temperature` only records the temperature the probabilities were scaled
    with. Top level: n, n_groups, threshold, threshold_rule and, per headline
    metric, `<metric>`, `<metric>_ci_low`, `<metric>_ci_high`; detail lives in
    operating_point, bootstrap, per_class, confusion_matrix(_normalized),
    calibration and subgroups.
    """
    y, p = _labels_and_probs(y_true, probs)
    k = p.shape[1]
    classes = [str(c) for c in classes]
    if len(classes) != k:
        raise ValueError(f"classes has {len(classes)} names but probs has {k} columns")
    if y.size == 0:
        raise MedtlError("cannot evaluate an empty split: y_true has no images")
    _check_bootstrap_args(n_resamples, alpha)
    n_bins = _check_n_bins(n_bins)

    if k > 2:
        op = {"rule": "argmax", "target": None, "threshold": None, "fitted_on": None}
    elif operating is None:
        op = {"rule": "fixed", "target": DEFAULT_THRESHOLD, "threshold": DEFAULT_THRESHOLD, "fitted_on": "fixed"}
    elif isinstance(operating, Mapping):
        if "threshold" not in operating or "rule" not in operating:
            raise ValueError("operating must be a dict from operating_point() with keys 'rule' and 'threshold'")
        op = dict(operating)
    else:
        t = float(operating)
        op = {"rule": "fixed", "target": t, "threshold": t, "fitted_on": "fixed"}
    threshold = _check_threshold(op["threshold"], k)

    names = list(headline_metrics(k))
    _, n_units = _units(groups, y.size)
    point = point_estimates(y, p, names, threshold=threshold, n_bins=n_bins)
    ci = bootstrap_ci(y, p, groups, names, n_resamples, seed, threshold, alpha, n_bins=n_bins)

    report: dict = {
        "n": int(y.size),
        "n_groups": n_units,
        "classes": classes,
        "positive_class": classes[1] if k == 2 else None,
        "threshold": threshold,
        "threshold_rule": op["rule"],
    }
    for name in names:
        report[name] = point[name]
        report[f"{name}_ci_low"] = ci[name]["low"]
        report[f"{name}_ci_high"] = ci[name]["high"]
    per_class_rows, cm = per_class_metrics(y, p, groups, threshold=threshold, n_resamples=n_resamples, seed=seed,
                                           alpha=alpha)
    per_class = dict(zip(classes, per_class_rows))
    report["operating_point"] = op
    report["bootstrap"] = {
        "method": "percentile",
        "unit": "image" if groups is None else "group",
        "n_units": n_units,
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "alpha": float(alpha),
        "skipped": {name: ci[name]["skipped"] for name in names},
    }
    report["per_class"] = per_class
    report["confusion_matrix"] = cm.tolist()
    report["confusion_matrix_normalized"] = _div(cm, cm.sum(axis=1, keepdims=True))
    report["calibration"] = {
        "n_bins": n_bins,
        "ece": point["ece"],
        "brier": point["brier"],
        "temperature": None if temperature is None else float(temperature),
        "reliability": reliability_diagram(y, p, n_bins),
    }
    report["subgroups"] = {
        str(attr): subgroup_metrics(y, p, groups, values, classes=classes, threshold=threshold,
                                    n_resamples=n_resamples, seed=seed, alpha=alpha, n_bins=n_bins,
                                    min_size=min_subgroup_size)
        for attr, values in (subgroups or {}).items()
    }
    return _nan_to_none(report)


# Metadata columns that may be asked for as subgroups; age_band is derived from `age`.
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 65, "40-64"), (65, 200, "65+"))


def age_band(value: str) -> str:
    try:
        years = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(years):
        return ""
    return next(label for lo, hi, label in AGE_BANDS if lo <= years < hi or hi == 200)


def subgroup_columns(rows: list[dict], wanted: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Values per requested column that the prepared CSV has (and that is not all empty), and the ones skipped."""
    out, skipped = {}, []
    for name in wanted:
        if name == "age_band":
            values = [age_band(r.get("age", "")) for r in rows]
        elif rows and name in rows[0]:
            values = [r.get(name, "") for r in rows]
        else:
            values = []
        if any(v not in ("", None) for v in values):
            out[name] = values
        else:
            skipped.append(name)
    return out, skipped


# ---------------------------------------------------------------- sites

SITE_COLUMN = "site"
SITE_METRICS = ("n", "n_groups", "roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "sensitivity", "specificity",
                "too_small")


def site_summary(report: dict) -> tuple[dict, dict | None]:
    """Per-site metrics from the report's `site` subgroup: flat metrics.json keys and evaluation.json's detail.

    metrics.json gets "site.<name>.<metric>" (ROC AUC with its patient-bootstrap
    bounds, sensitivity, specificity, counts) and the worst site's ROC AUC
    beside the pooled one, "worst_site_roc_auc" and "worst_site"; nothing when
    the split has no site column.
    """
    sites = (report.get("subgroups") or {}).get(SITE_COLUMN)
    if not sites:
        return {}, None
    flat = {f"site.{name}.{k}": entry[k] for name, entry in sites.items() for k in SITE_METRICS if k in entry}
    scored = {name: entry["roc_auc"] for name, entry in sites.items() if entry.get("roc_auc") is not None}
    worst = min(scored, key=lambda name: (scored[name], name)) if scored else None
    flat["worst_site"] = worst
    flat["worst_site_roc_auc"] = scored.get(worst)
    detail = {"column": SITE_COLUMN, "pooled_roc_auc": report.get("roc_auc"), "worst_site": worst,
              "worst_site_roc_auc": scored.get(worst), "sites": sites}
    return flat, detail
