"""`medtl cv run --by site` and `medtl cv report --by site`: leave-one-site-out as DVC experiments.

One experiment per site sets `preprocess.cv.held_out_site` (medtl.prepare.loso): that
site is the test set, the other sites train and validate. The report gives
each held-out site's test metrics with patient-bootstrap intervals, the
pooled out-of-site result (every site's images predicted by the model that
never saw the site, each at its own experiment's operating point), the spread
across sites and, for multi-class tasks, per-class figures.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from medtl.errors import MedtlError
from medtl.evaluate import predictions as preds
from medtl.evaluate import reports
from medtl.evaluate.predictions import parse_predictions, project_path
from medtl.experiments.cv import (_arrays, _cv_params, _show, _spread, interval_chart, interval_report, interval_text,
                                  one_run, queue_experiments)
from medtl.ingest.manifest import PROJECT_MANIFEST
from medtl.io import atomic_dir, write_json

SUMMARY_FORMAT = "medtl-cv-site-summary/1"
SITE_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]+?)-site-(?P<site>[A-Za-z0-9_.-]+)$")
PLAIN = re.compile(r"[A-Za-z0-9_.-]+")
TEST_PREDICTIONS = project_path(preds.PREDICTIONS)


def site_name(prefix: str, site: str) -> str:
    return f"{prefix}-site-{site}"


def workspace_sites(manifest: Path = PROJECT_MANIFEST) -> list[str]:
    from medtl.ingest.manifest import iter_manifest
    from medtl.prepare.loso import sites_of

    if not manifest.is_file():
        raise MedtlError(f"--by site reads the sites from {manifest}, which does not exist; run `dvc repro ingest` "
                         "(or the whole pipeline) first")
    return sites_of(iter_manifest(manifest))


def run_sites(jobs: int = 1, sets: list[str] = (), prefix: str | None = None, wait: bool = True) -> list[str]:
    """Queue one experiment per site with that site held out as the test set; return the names."""
    for s in sets:
        if "=" not in s or s.split("=", 1)[0].startswith("preprocess.cv"):
            raise MedtlError(f"-S {s!r}: expected key=value for a params key other than preprocess.cv "
                             "(which `medtl cv run --by site` sets per site)")
    prefix = prefix or "loso"
    if not PLAIN.fullmatch(prefix):
        raise MedtlError(f"--name {prefix!r}: expected letters, digits, '.', '_' or '-'")
    sites = workspace_sites()
    if len(sites) < 2:
        found = f"one site ({sites[0]})" if sites else "no 'site' column"
        raise MedtlError(f"--by site: {PROJECT_MANIFEST} has {found}; leaving one site out needs at least two sites "
                         "(ingest.sources, or a csv metadata column named 'site')")
    odd = [s for s in sites if not PLAIN.fullmatch(s)]
    if odd:
        raise MedtlError(f"--by site: site name(s) {', '.join(map(repr, odd))} cannot name an experiment; "
                         "expected letters, digits, '.', '_' or '-'")
    # Quoted, so that a site named like a number or `null` stays a string in params.yaml.
    runs = [(site_name(prefix, s), ["preprocess.cv.folds=0", f"preprocess.cv.held_out_site='{s}'", *sets])
            for s in sites]
    return queue_experiments(runs, jobs, wait, what="medtl cv")


def site_experiments(prefix: str | None, rev: str) -> tuple[str, dict[str, str]]:
    """(prefix, {site: experiment commit}) among the successful experiments of commit `rev`."""
    prefix, runs = one_run(rev, SITE_NAME, prefix, "one leave-one-site-out run", "-site-<site>",
                           "medtl cv run --by site")
    return prefix, {m["site"]: commit for m, commit in runs}


def _read_output(rev: str, path: str) -> str:
    """A DVC-cached output of experiment `rev`, from the local cache."""
    import dvc.api

    try:
        return dvc.api.read(path, repo=".", rev=rev)
    except Exception as e:  # dvc raises many kinds: missing cache, path not an output, ...
        raise MedtlError(f"cannot read {path} of experiment commit {rev[:10]} from the DVC cache: {e}") from e


def _per_class(y, p, groups, classes, n_resamples, seed, alpha) -> dict:
    """One-vs-rest figures per class: ROC AUC, and sensitivity ... f1 at the arg-max call, with intervals."""
    import numpy as np

    from medtl.metrics import per_class_metrics, roc_auc

    rows, _ = per_class_metrics(y, p, groups, n_resamples=n_resamples, seed=seed, alpha=alpha)
    out = {}
    for c, (name, r) in enumerate(zip(classes, rows)):
        onehot = (y == c).astype(np.int64)
        auc = roc_auc(onehot, np.stack([1 - p[:, c], p[:, c]], axis=1)) if 0 < onehot.sum() < len(y) else None
        out[name] = {"roc_auc": auc, **r}
    return out


def site_report(prefix: str | None = None, out: Path = Path("reports/cv-site"), n_resamples: int | None = None,
                seed: int | None = None, alpha: float | None = None, rev: str = "HEAD") -> dict:
    from medtl.evaluate.evaluation import EvaluateParams
    from medtl.metrics import headline_metrics
    from medtl.params import load_section

    boot = load_section("evaluate", EvaluateParams).bootstrap
    n_resamples = boot.n_resamples if n_resamples is None else n_resamples
    seed, alpha = (boot.seed if seed is None else seed), (boot.alpha if alpha is None else alpha)
    prefix, revs = site_experiments(prefix, rev)
    if len(revs) < 2:
        raise MedtlError(f"leave-one-site-out {prefix} has {len(revs)} successful experiment(s); it needs one per "
                         "site, at least two (dvc exp show, dvc queue logs)")
    per_site, pooled_rows, classes = [], [], None
    for site in sorted(revs):
        exp = revs[site]
        held = _cv_params(_show(exp, "params.yaml")).get("held_out_site")
        if str(held) != site:
            raise MedtlError(f"experiment {site_name(prefix, site)} has preprocess.cv.held_out_site {held!r}, "
                             f"not {site!r}")
        site_classes, rows = parse_predictions(_read_output(exp, TEST_PREDICTIONS))
        if classes is not None and site_classes != classes:
            raise MedtlError(f"experiment {site_name(prefix, site)} has classes {site_classes}, others {classes}")
        classes = site_classes
        metrics = reports.parse_metrics(_show(exp, reports.PROJECT_METRICS))
        y, p, groups = _arrays(rows, classes)
        entry = {"site": site, "experiment": site_name(prefix, site), "commit": exp,
                 "threshold": metrics.get("threshold"),
                 "test": interval_report(y, p, groups, rows, n_resamples, seed, alpha)}
        if len(classes) > 2:
            entry["per_class"] = _per_class(y, p, groups, classes, n_resamples, seed, alpha)
        per_site.append(entry)
        pooled_rows += [{**r, "site": site} for r in rows]
    y, p, groups = _arrays(pooled_rows, classes)
    names = list(headline_metrics(len(classes)))
    worst = min((s for s in per_site if s["test"].get("roc_auc") is not None), key=lambda s: s["test"]["roc_auc"],
                default=None)
    summary = {
        "format": SUMMARY_FORMAT, "name": prefix, "sites": [s["site"] for s in per_site], "classes": classes,
        "bootstrap": {"unit": "group", "n_resamples": n_resamples, "seed": seed, "alpha": alpha},
        "pooled_out_of_site": interval_report(y, p, groups, pooled_rows, n_resamples, seed, alpha),
        "across_sites": {m: _spread([s["test"].get(m) for s in per_site]) for m in names},
        "worst_site": worst and {"site": worst["site"], "roc_auc": worst["test"]["roc_auc"]},
        "per_site": per_site,
    }
    if len(classes) > 2:
        summary["pooled_per_class"] = _per_class(y, p, groups, classes, n_resamples, seed, alpha)
    with atomic_dir(out) as tmp:
        write_json(tmp / "summary.json", summary)
        cols = ["site", "image_id", "group", "label", "predicted", "above_threshold"] + [f"prob_{c}" for c in classes]
        with open(tmp / "out_of_site_predictions.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(pooled_rows)
        write_json(tmp / "sites.json", [
            {"site": s["site"], **{m: s["test"].get(m) for m in ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high")}}
            for s in per_site])
        bars = [(f"held out: {s['site']}", s["test"]) for s in per_site]
        bars.append(("pooled out-of-site", summary["pooled_out_of_site"]))
        (tmp / "chart.html").write_text(interval_chart(
            bars, "roc_auc", f"{prefix}: test ROC AUC of each held-out site, "
                             f"{100 * (1 - alpha):.0f}% patient-bootstrap intervals"), encoding="utf-8")
    return summary


def describe_sites(summary: dict, metric: str = "roc_auc") -> list[str]:
    def fmt(r):
        return interval_text(r, metric)

    lines = [f"{summary['name']}: leave one site out over {len(summary['sites'])} sites"]
    lines += [f"  held out {s['site']}: test {metric} {fmt(s['test'])}" for s in summary["per_site"]]
    lines.append(f"  pooled out-of-site {metric}: {fmt(summary['pooled_out_of_site'])}")
    spread = summary["across_sites"][metric]
    if spread["mean"] is not None:
        lines.append(f"  across sites: mean {spread['mean']:.3f}, sd {spread['sd']:.3f}, worst "
                     f"{summary['worst_site']['site']} {summary['worst_site']['roc_auc']:.3f}")
    for c, r in (summary.get("pooled_per_class") or {}).items():
        auc = "n/a" if r["roc_auc"] is None else f"{r['roc_auc']:.3f}"
        lines.append(f"  class {c}: one-vs-rest ROC AUC {auc}, sensitivity {r['sensitivity']:.3f} (pooled)")
    return lines
