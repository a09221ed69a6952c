"""`medtl cv`: cross-validation by patient, one DVC experiment per fold, and the report across folds.

`medtl cv run --folds k` queues k experiments (`dvc exp run --queue`), each
setting `preprocess.cv` to one fold, and starts DVC's queue workers (`dvc
queue start -j N`); ingest is not rerun, so the images are decoded once.
`medtl cv report` reads each fold experiment's metrics and validation-split
predictions from git, and writes the spread of every metric across folds, the
pooled out-of-fold predictions with patient-bootstrap intervals, and a chart.
"""
from __future__ import annotations

import csv
import html
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from medtl.errors import MedtlError
from medtl.evaluate import predictions as preds
from medtl.evaluate import reports
from medtl.evaluate.predictions import parse_predictions, project_path
from medtl.io import atomic_dir, write_json

if TYPE_CHECKING:
    import numpy as np

# numpy, the metrics and dvc are imported in the functions that use them: building `medtl`'s parser
# imports this module, and must stay fast and work without the training stack (medtl.cli).

SUMMARY_FORMAT = "medtl-cv-summary/1"
FOLD_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]+?)-fold(?P<fold>\d+)$")
RANKING = ("roc_auc", "pr_auc", "brier", "ece")  # read from probabilities, not from decisions
VAL_PREDICTIONS, METRICS, PARAMS = project_path(preds.VAL_PREDICTIONS), reports.PROJECT_METRICS, "params.yaml"
DEFAULT_OUT = Path("reports/cv")


def _run(cmd: list[str], what: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip())[-1500:]
        raise MedtlError(f"{what} failed ({' '.join(cmd[2:] if cmd[:2] == [sys.executable, '-m'] else cmd)}): {tail}")
    return res.stdout


def _dvc(*args: str, what: str = "dvc") -> str:
    return _run([sys.executable, "-m", "dvc", *args], what)


def _git(*args: str) -> str:
    return _run(["git", *args], "git")


def fold_name(prefix: str, fold: int) -> str:
    return f"{prefix}-fold{fold}"


# ---------------------------------------------------------------- run


def _queue_tasks() -> dict[str, tuple[str, str]]:
    """{task rev: (experiment name, status)} of DVC's experiment queue."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return {t["rev"]: (t.get("name") or "", t["status"]) for t in repo.experiments.celery_queue.status()}


def _check_data_paths() -> None:
    """Queued experiments run from a copy of the project in .dvc/tmp, where DVC itself fails on a relative data
    path out of the project (before any stage runs): refuse it here, with what to do instead."""
    from medtl.ingest.ingest import IngestParams
    from medtl.params import load_section

    load_section("ingest", IngestParams)


def run_folds(folds: int, jobs: int = 1, seed: int = 0, sets: list[str] = (), prefix: str | None = None,
              wait: bool = True, poll_s: float = 5.0) -> list[str]:
    """Queue one experiment per fold, start `jobs` queue workers and (by default) wait for them; return the names."""
    if folds < 2:
        raise MedtlError(f"--folds must be at least 2, got {folds}")
    if jobs < 1:
        raise MedtlError(f"-j/--jobs must be a positive integer, got {jobs}")
    for s in sets:
        if "=" not in s or s.split("=", 1)[0].startswith("preprocess.cv"):
            raise MedtlError(f"-S {s!r}: expected key=value for a params key other than preprocess.cv "
                             "(which `medtl cv run` sets per fold)")
    _check_data_paths()
    prefix = prefix or f"cv{folds}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise MedtlError(f"--name {prefix!r}: expected letters, digits, '.', '_' or '-'")
    runs = [(fold_name(prefix, i), [f"preprocess.cv.folds={folds}", f"preprocess.cv.fold={i}",
                                     f"preprocess.cv.seed={seed}", *sets]) for i in range(folds)]
    return queue_experiments(runs, jobs, wait, "medtl cv", poll_s)


def queue_experiments(runs: list[tuple[str, list[str]]], jobs: int, wait: bool = True, what: str = "medtl",
                      poll_s: float = 5.0) -> list[str]:
    """Queue each (name, `-S key=value` overrides) as a DVC experiment, start `jobs` workers, optionally wait."""
    if jobs < 1:
        raise MedtlError(f"-j/--jobs must be a positive integer, got {jobs}")
    names = [n for n, _ in runs]
    existing = set(_dvc("exp", "list", "--name-only", what="dvc exp list").split())
    taken = [n for n in names if n in existing]
    if taken:
        raise MedtlError(f"experiment(s) {', '.join(taken)} already exist for this commit; pass --name to choose "
                         f"another prefix, or remove them first (dvc exp remove {' '.join(taken)})")
    before = set(_queue_tasks())  # older tasks may carry the same names (other commits)
    for name, sets in runs:
        _dvc("exp", "run", "--queue", "-n", name, *[a for s in sets for a in ("-S", s)], what=f"queueing {name}")
    _dvc("queue", "start", "-j", str(jobs), what="dvc queue start")
    print(f"{what}: queued {', '.join(names)}; {jobs} worker(s) started (dvc queue status)")
    if not wait:
        return names
    while True:
        status = {name: state for rev, (name, state) in _queue_tasks().items() if rev not in before and name in names}
        if not any(status.get(n) in ("Queued", "Running") for n in names):
            break
        time.sleep(poll_s)
    failed = [n for n in names if status.get(n) == "Failed"]
    if failed:
        raise MedtlError(f"experiment(s) {', '.join(failed)} failed; see `dvc queue logs {failed[0]}`")
    return names


# ---------------------------------------------------------------- report


def one_run(rev: str, name: re.Pattern, prefix: str | None, what: str, named: str,
            run: str) -> tuple[str, list[tuple[re.Match, str]]]:
    """(prefix, [(name match, experiment commit)]) of the finished experiments of one run of commit `rev` (its
    folds, held-out sites or curve arms): the run called `prefix`, or the only one there is. Queued, running
    and failed experiments are left out."""
    found: dict[str, list[tuple[re.Match, str]]] = {}
    for row in json.loads(_dvc("exp", "show", "--json", "--no-fetch", "--rev", rev, what="dvc exp show") or "[]"):
        for exp in row.get("experiments") or []:
            m = name.match(exp.get("name") or "")
            revs = exp.get("revs") or []
            state = (exp.get("executor") or {}).get("state", "success")
            if m and revs and not revs[0].get("error") and state == "success":
                found.setdefault(m["prefix"], []).append((m, revs[0]["rev"]))
    elsewhere = (f"run `{run}` on this commit, or pass --rev with the commit it ran on "
                 "(`dvc exp show -A` lists every commit's experiments)")
    if prefix is None:
        if len(found) != 1:
            raise MedtlError(f"expected the experiments of {what} among those of commit {rev} (found prefixes: "
                             f"{', '.join(sorted(found)) or 'none'}); {elsewhere}, or pass --name to pick one")
        prefix = next(iter(found))
    if prefix not in found:
        raise MedtlError(f"no experiments named {prefix}{named} for commit {rev} (dvc exp show); {elsewhere}")
    return prefix, found[prefix]


def fold_experiments(prefix: str | None = None, rev: str = "HEAD") -> tuple[str, dict[int, str]]:
    """(prefix, {fold: experiment commit}) among the experiments whose baseline is commit `rev`."""
    prefix, runs = one_run(rev, FOLD_NAME, prefix, "one cross-validation", "-fold<i>", "medtl cv run")
    return prefix, {int(m["fold"]): commit for m, commit in runs}


def _show(rev: str, path: str) -> str:
    return _git("show", f"{rev}:{path}")


def _cv_params(params_text: str) -> dict:
    import yaml

    raw = yaml.safe_load(params_text) or {}
    return ((raw.get("preprocess") or {}).get("cv") or {}) if isinstance(raw, dict) else {}


def _arrays(rows: list[dict], classes: list[str]):
    import numpy as np

    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows], dtype=np.float64)
    return y, p, [r["group"] for r in rows]


def _decisions(rows: list[dict], probs: np.ndarray) -> np.ndarray | None:
    """Each image's call at its own fold's threshold, as probabilities a 0.5 threshold reproduces exactly."""
    import numpy as np

    if probs.shape[1] != 2:
        return None
    above = np.array([r["above_threshold"] == "true" for r in rows])
    q = np.where(above, 0.75, 0.25)
    return np.stack([1 - q, q], axis=1)


def interval_report(y, p, groups, rows, n_resamples: int, seed: int, alpha: float) -> dict:
    """Point estimates and patient-bootstrap intervals: ranking metrics on probabilities, the rest on the calls."""
    from medtl.metrics import bootstrap_ci, headline_metrics, point_estimates

    names = list(headline_metrics(p.shape[1]))
    decided = _decisions(rows, p)
    if decided is None:
        point = point_estimates(y, p, names)
        ci = bootstrap_ci(y, p, groups, names, n_resamples, seed, None, alpha)
    else:
        ranking = [m for m in names if m in RANKING]
        calls = [m for m in names if m not in RANKING]
        point = {**point_estimates(y, p, ranking), **point_estimates(y, decided, calls, threshold=0.5)}
        ci = {**bootstrap_ci(y, p, groups, ranking, n_resamples, seed, None, alpha),
              **bootstrap_ci(y, decided, groups, calls, n_resamples, seed, 0.5, alpha)}
    out = {"n": len(y), "n_groups": len(set(groups))}
    for m in names:
        out[m], out[f"{m}_ci_low"], out[f"{m}_ci_high"] = point[m], ci[m]["low"], ci[m]["high"]
    return out


def _spread(values: list) -> dict:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v),
            "max": max(v), "n": len(v)}


def _width(r: dict | None, metric: str) -> float | None:
    if not r or r.get(f"{metric}_ci_low") is None or r.get(f"{metric}_ci_high") is None:
        return None
    return r[f"{metric}_ci_high"] - r[f"{metric}_ci_low"]


def single_split(rev: str, n_resamples: int, seed: int, alpha: float) -> dict | None:
    """The same development data with ingest's single train/val split (the commit's own run), for comparison."""
    from medtl.metrics import headline_metrics

    try:
        params = _show(rev, PARAMS)
        metrics = reports.parse_metrics(_show(rev, METRICS))
        classes, rows = parse_predictions(_show(rev, VAL_PREDICTIONS))
    except (MedtlError, ValueError):
        return None
    if _cv_params(params).get("folds") or not rows:
        return None
    y, p, groups = _arrays(rows, classes)
    test = {k: metrics.get(k) for k in ("n", "n_groups") + tuple(
        f"{m}{s}" for m in headline_metrics(len(classes)) for s in ("", "_ci_low", "_ci_high"))}
    return {"commit": _git("rev-parse", rev).strip(), "val": interval_report(y, p, groups, rows, n_resamples, seed, alpha),
            "test": test}


def cv_report(prefix: str | None = None, out: Path = DEFAULT_OUT, n_resamples: int | None = None,
              seed: int | None = None, alpha: float | None = None, rev: str = "HEAD") -> dict:
    from medtl.evaluate.evaluation import EvaluateParams
    from medtl.evaluate.metrics_report import curve_points
    from medtl.metrics import headline_metrics
    from medtl.params import load_section

    boot = load_section("evaluate", EvaluateParams).bootstrap
    n_resamples = boot.n_resamples if n_resamples is None else n_resamples
    seed, alpha = (boot.seed if seed is None else seed), (boot.alpha if alpha is None else alpha)
    prefix, revs = fold_experiments(prefix, rev)
    folds, per_fold, pooled_rows, classes = None, [], [], None
    for fold in sorted(revs):
        exp = revs[fold]
        cv = _cv_params(_show(exp, PARAMS))
        if cv.get("fold") != fold or not cv.get("folds"):
            raise MedtlError(f"experiment {fold_name(prefix, fold)} has preprocess.cv {cv}, not fold {fold}")
        if folds is None:
            folds, cv_seed = cv["folds"], cv.get("seed", 0)
        elif (cv["folds"], cv.get("seed", 0)) != (folds, cv_seed):
            raise MedtlError(f"experiment {fold_name(prefix, fold)} belongs to another cross-validation "
                             f"(preprocess.cv {cv}, fold 0 has folds {folds} seed {cv_seed}); pass --name to pick one")
        fold_classes, rows = parse_predictions(_show(exp, VAL_PREDICTIONS))
        if classes is not None and fold_classes != classes:
            raise MedtlError(f"experiment {fold_name(prefix, fold)} has classes {fold_classes}, fold 0 has {classes}")
        classes = fold_classes
        metrics = reports.parse_metrics(_show(exp, METRICS))
        y, p, groups = _arrays(rows, classes)
        per_fold.append({"fold": fold, "experiment": fold_name(prefix, fold), "commit": exp, "seed": cv.get("seed", 0),
                         "threshold": metrics.get("threshold"),
                         "val": interval_report(y, p, groups, rows, n_resamples, seed, alpha),
                         "test": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}})
        pooled_rows += [{**r, "fold": fold} for r in rows]
    missing = sorted(set(range(folds)) - set(revs))
    if missing:
        raise MedtlError(f"cross-validation {prefix} has {folds} folds but experiment(s) "
                         f"{', '.join(fold_name(prefix, i) for i in missing)} are missing or failed (dvc exp show)")
    groups_seen: dict[str, int] = {}
    for r in pooled_rows:
        if groups_seen.setdefault(r["group"], r["fold"]) != r["fold"]:
            raise MedtlError(f"patient group {r['group']} is in the validation split of two folds; "
                             "the experiments are not folds of one partition")
    y, p, groups = _arrays(pooled_rows, classes)
    pooled = interval_report(y, p, groups, pooled_rows, n_resamples, seed, alpha)
    names = list(headline_metrics(len(classes)))
    baseline = single_split(rev, n_resamples, seed, alpha)  # the commit the folds were run on
    summary = {
        "format": SUMMARY_FORMAT,
        "name": prefix,
        "folds": folds,
        "seed": per_fold[0]["seed"],
        "classes": classes,
        "bootstrap": {"unit": "group", "n_resamples": n_resamples, "seed": seed, "alpha": alpha},
        "pooled_out_of_fold": pooled,
        "across_folds": {
            "val": {m: _spread([f["val"][m] for f in per_fold]) for m in names},
            "test": {m: _spread([f["test"].get(m) for f in per_fold]) for m in names},
        },
        "per_fold": per_fold,
        "single_split": baseline,
        "roc_auc_interval_width": {
            "pooled_out_of_fold": _width(pooled, "roc_auc"),
            "mean_fold_val": _spread([_width(f["val"], "roc_auc") for f in per_fold])["mean"],
            "single_split_val": _width(baseline and baseline["val"], "roc_auc"),
            "single_split_test": _width(baseline and baseline["test"], "roc_auc"),
        },
    }
    with atomic_dir(out) as tmp:
        write_json(tmp / "summary.json", summary)
        _write_oof(tmp / "oof_predictions.csv", pooled_rows, classes)
        write_json(tmp / "folds.json", [
            {"fold": f"fold {f['fold']}", "set": s, **{m: f[s].get(m) for m in ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high")}}
            for f in per_fold for s in ("val", "test")])
        if len(classes) == 2 and len(set(y.tolist())) > 1:
            write_json(tmp / "roc.json", [{**r, "threshold": 1.0 if r["threshold"] is None else r["threshold"]}
                                          for r in curve_points(y, p, classes)["roc"]])
        (tmp / "chart.html").write_text(chart_html(summary), encoding="utf-8")
    return summary


def _write_oof(path: Path, rows: list[dict], classes: list[str]) -> None:
    cols = ["fold", "image_id", "group", "label", "predicted", "above_threshold"] + [f"prob_{c}" for c in classes]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def chart_html(summary: dict, metric: str = "roc_auc") -> str:
    """One self-contained page: each fold's validation and test interval, the pooled one, the single split."""
    bars = [(f"fold {f['fold']} val", f["val"]) for f in summary["per_fold"]]
    bars += [(f"fold {f['fold']} test", f["test"]) for f in summary["per_fold"]]
    bars.append(("pooled out-of-fold", summary["pooled_out_of_fold"]))
    if summary["single_split"]:
        bars += [("single split val", summary["single_split"]["val"]), ("single split test", summary["single_split"]["test"])]
    return interval_chart(bars, metric, f"{summary['name']}: {metric} with {100 * (1 - summary['bootstrap']['alpha']):.0f}% "
                          "patient-bootstrap intervals")


def interval_chart(bars: list[tuple[str, dict]], metric: str, title: str) -> str:
    """A self-contained page with one interval per (label, result) row; rows labelled 'pooled...' in red."""
    values = [v for _, r in bars for v in (r.get(metric), r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high"))
              if v is not None]
    lo, hi = (min(values + [0.5]), max(values + [1.0])) if values else (0.0, 1.0)
    w, left, row_h = 640, 170, 22

    def x(v: float) -> float:
        return left + (v - lo) / max(hi - lo, 1e-9) * (w - left - 60)  # the value is printed right of the axis

    parts = []
    for i, (label, r) in enumerate(bars):
        yy = 30 + i * row_h
        parts.append(f'<text x="{left - 8}" y="{yy + 4}" text-anchor="end" font-size="12">{html.escape(label)}</text>')
        if r.get(f"{metric}_ci_low") is not None and r.get(f"{metric}_ci_high") is not None:
            parts.append(f'<line x1="{x(r[metric + "_ci_low"]):.1f}" x2="{x(r[metric + "_ci_high"]):.1f}" y1="{yy}" '
                         f'y2="{yy}" stroke="#555" stroke-width="2"/>')
        if r.get(metric) is not None:
            colour = "#c0392b" if label.startswith("pooled") else "#2c6fbb"
            parts.append(f'<circle cx="{x(r[metric]):.1f}" cy="{yy}" r="4" fill="{colour}"/>'
                         f'<text x="{w - 10}" y="{yy + 4}" text-anchor="end" font-size="11">{r[metric]:.3f}</text>')
    height = 50 + len(bars) * row_h
    ticks = "".join(f'<text x="{x(t):.1f}" y="{height - 8}" text-anchor="middle" font-size="11">{t:.2f}</text>'
                    for t in (lo + (hi - lo) * i / 4 for i in range(5)))
    title = html.escape(title)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h3 style='font-family:sans-serif'>{title}</h3>"
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{height}' font-family='sans-serif'>"
            f"{''.join(parts)}{ticks}</svg></body></html>\n")


def interval_text(r: dict | None, metric: str, width: bool = False) -> str:
    """`metric` of a report with its interval (and the interval's width), images and patients, for the console."""
    if not r or r.get(metric) is None:
        return "n/a"
    low, high = r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high")
    bounds = (f" [{low:.3f}, {high:.3f}]" + (f" (width {high - low:.3f})" if width else "")
              if low is not None and high is not None else "")
    return f"{r[metric]:.3f}{bounds}, {r.get('n')} images / {r.get('n_groups')} patients"


def describe(summary: dict, metric: str = "roc_auc") -> list[str]:
    def fmt(r):
        return interval_text(r, metric, width=True)

    spread = summary["across_folds"]
    lines = [f"{summary['name']}: {summary['folds']} folds by patient, seed {summary['seed']}",
             f"  pooled out-of-fold {metric}: {fmt(summary['pooled_out_of_fold'])}"]
    for s in ("val", "test"):
        m = spread[s][metric]
        if m["mean"] is not None:
            lines.append(f"  {metric} across folds ({s}): mean {m['mean']:.3f}, sd {m['sd']:.3f}, "
                         f"range {m['min']:.3f}-{m['max']:.3f}")
    if summary["single_split"]:
        lines.append(f"  single split, val {metric}: {fmt(summary['single_split']['val'])}")
        lines.append(f"  single split, test {metric}: {fmt(summary['single_split']['test'])}")
    return lines
