"""`medtl curve`: how many local labels are enough? Test AUC against the size of the training set.

`medtl curve run --sizes 25,50,100,all --repeats 3` queues one DVC experiment
per (size, repeat): `preprocess.train_subset` keeps that many training images
(nested, patient-grouped, class-stratified: medtl.prepare.subsets; the repeat is the
subset seed) while validation and test stay fixed. `--compare key=value`
adds a second arm with other params (e.g. `pretrain.weights=none`), run on the
same subsets. `medtl curve report` reads each experiment's test metrics and
training split, and writes the curve per arm with patient-bootstrap
intervals: a JSON summary, plot files for `dvc plots show`, and a chart.
"""
from __future__ import annotations

import csv
import html
import io
import json
import re
import statistics
from pathlib import Path

from medtl.errors import MedtlError
from medtl.evaluate import reports
from medtl.experiments.cv import _show, one_run, queue_experiments
from medtl.ingest.manifest import PROJECT_MANIFEST
from medtl.io import atomic_dir, write_json

SUMMARY_FORMAT = "medtl-curve-summary/1"
DEFAULT_OUT = Path("reports/curve")
ARMS = ("base", "compare")
EXP_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]+?)-(?P<arm>base|compare)-n(?P<size>\d+|all)-r(?P<repeat>\d+)$")


def parse_sizes(text: str) -> list[int]:
    """`25,50,all` -> [25, 50, 0] (0: the whole training split), sorted, without repeats."""
    sizes: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if part == "all":
            sizes.add(0)
        elif part.isdigit() and int(part) > 0:
            sizes.add(int(part))
        else:
            raise MedtlError(f"--sizes {text!r}: {part!r} is not a positive number of images or 'all'; "
                             "expected e.g. 25,50,100,all")
    return sorted(sizes, key=lambda n: (n == 0, n))


def _override(sets: list[str], key: str):
    import yaml

    for s in reversed(sets):
        k, _, v = s.partition("=")
        if k.strip() == key:
            return yaml.safe_load(v.strip().strip("'\"") or "null")
    return None


def training_images(sets: list[str] = ()) -> int:
    """Images in the training split the experiments will subset (ingest's, or another site's when one is held out)."""
    from medtl.ingest.manifest import iter_manifest
    from medtl.ingest.splits import SPLITS
    from medtl.params import read_params_file

    if not PROJECT_MANIFEST.is_file():
        raise MedtlError(f"medtl curve reads the training split from {PROJECT_MANIFEST}, which does not exist; run "
                         "`dvc repro` (or at least `dvc repro ingest`) first")
    cv = ((read_params_file().get("preprocess") or {}).get("cv") or {})
    held = _override(sets, "preprocess.cv.held_out_site") or cv.get("held_out_site")
    if held:
        from medtl.prepare.loso import site_splits

        codes, _ = site_splits(iter_manifest(PROJECT_MANIFEST), str(held), str(PROJECT_MANIFEST), int(cv.get("seed") or 0))
        return int((codes == SPLITS.index("train")).sum())
    return sum(1 for r in iter_manifest(PROJECT_MANIFEST) if r["split"] == "train")


def exp_name(prefix: str, arm: str, size: int, repeat: int) -> str:
    return f"{prefix}-{arm}-n{size or 'all'}-r{repeat}"


def run_curve(sizes: list[int], repeats: int = 3, compare: list[str] = (), sets: list[str] = (), prefix: str | None = None,
              jobs: int = 1, wait: bool = True) -> list[str]:
    """Queue the experiments of the curve; nothing is queued when an argument is wrong."""
    if repeats < 1:
        raise MedtlError(f"--repeats must be a positive integer, got {repeats}")
    for s in [*sets, *compare]:
        if "=" not in s or s.split("=", 1)[0].strip().startswith("preprocess.train_subset"):
            raise MedtlError(f"-S/--compare {s!r}: expected key=value for a params key other than "
                             "preprocess.train_subset (which `medtl curve run` sets per experiment)")
    prefix = prefix or "curve"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise MedtlError(f"--name {prefix!r}: expected letters, digits, '.', '_' or '-'")
    available = training_images(sets)
    too_big = [n for n in sizes if n > available]
    if too_big:
        raise MedtlError(f"--sizes: {', '.join(map(str, too_big))} exceed the training split's {available} images; "
                         f"use sizes up to {available}, or 'all'")
    arms = [("base", list(sets))] + ([("compare", [*sets, *compare])] if compare else [])
    runs = []
    for arm, arm_sets in arms:
        for n in sizes:
            for r in range(1 if n == 0 else repeats):  # the whole split is the same set for every repeat
                runs.append((exp_name(prefix, arm, n, r),
                             [f"preprocess.train_subset.images={n}", f"preprocess.train_subset.seed={r}", *arm_sets]))
    return queue_experiments(runs, jobs, wait, what="medtl curve")


# ---------------------------------------------------------------- report


def _experiments(prefix: str | None, rev: str) -> tuple[str, list[dict]]:
    prefix, runs = one_run(rev, EXP_NAME, prefix, "one curve", "-<arm>-n<size>-r<repeat>", "medtl curve run")
    return prefix, [{"name": m.string, "commit": commit, "arm": m["arm"],
                     "size": 0 if m["size"] == "all" else int(m["size"]), "repeat": int(m["repeat"])}
                    for m, commit in runs]


def _training_split(commit: str) -> tuple[int, int]:
    """(images, patients) of an experiment's training split, read from its data/prepared/train.csv."""
    from medtl.experiments.cv_sites import _read_output
    from medtl.prepare.prepared import PROJECT_PREPARED, rows_path

    rows = list(csv.DictReader(io.StringIO(_read_output(commit, rows_path(PROJECT_PREPARED, "train").as_posix()))))
    return len(rows), len({r["group"] for r in rows})


def curve_report(prefix: str | None = None, out: Path = DEFAULT_OUT, rev: str = "HEAD", metric: str = "roc_auc") -> dict:
    prefix, exps = _experiments(prefix, rev)
    points: dict[tuple[str, int], list[dict]] = {}
    for e in sorted(exps, key=lambda e: (e["arm"], e["size"] == 0, e["size"], e["repeat"])):
        m = reports.parse_metrics(_show(e["commit"], reports.PROJECT_METRICS))
        images, patients = _training_split(e["commit"])
        points.setdefault((e["arm"], e["size"]), []).append({
            "experiment": e["name"], "commit": e["commit"], "repeat": e["repeat"], "images": images,
            "patients": patients, metric: m.get(metric), f"{metric}_ci_low": m.get(f"{metric}_ci_low"),
            f"{metric}_ci_high": m.get(f"{metric}_ci_high"), "test_n": m.get("n"), "test_groups": m.get("n_groups")})
    arms: dict[str, dict] = {}
    base_params = _arm_differences(exps)
    for (arm, size), runs in points.items():
        vals = [r[metric] for r in runs if r[metric] is not None]
        mean = lambda key: statistics.fmean([r[key] for r in runs if r[key] is not None]) if vals else None  # noqa: E731
        arms.setdefault(arm, {"params": base_params.get(arm, {}), "points": []})["points"].append({
            "size": size or "all", "images": mean("images"), "patients": mean("patients"), "repeats": len(runs),
            metric: mean(metric), f"{metric}_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None,
            f"{metric}_ci_low": mean(f"{metric}_ci_low"), f"{metric}_ci_high": mean(f"{metric}_ci_high"),
            "runs": runs})
    summary = {"format": SUMMARY_FORMAT, "name": prefix, "metric": metric, "split": "test",
               "interval": "patient bootstrap of each run's test split (evaluate.bootstrap); shown: the mean over "
                           "repeats of the bounds, and the spread of the point estimate across repeats",
               "arms": arms}
    with atomic_dir(out) as tmp:
        write_json(tmp / "summary.json", summary)
        for arm, a in arms.items():  # one file per arm: `dvc plots show reports/curve/base.json reports/curve/compare.json`
            write_json(tmp / f"{arm}.json", [{k: p[k] for k in ("images", "patients", metric, f"{metric}_ci_low",
                                                                  f"{metric}_ci_high")} | {"arm": arm}
                                             for p in a["points"]])
        (tmp / "chart.html").write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(prefix)}</title></head><body>"
            f"{curve_svg(summary)}</body></html>\n", encoding="utf-8")
    return summary


def _arm_differences(exps: list[dict]) -> dict:
    """Each arm's values of the keys where the arms differ (the --compare keys)."""
    firsts = {}
    for e in exps:
        firsts.setdefault(e["arm"], e["commit"])
    if len(firsts) < 2:
        return {}
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    params = {arm: flat(yaml.safe_load(_show(c, "params.yaml"))) for arm, c in firsts.items()}
    keys = sorted(k for k in set().union(*params.values()) if not k.startswith("preprocess.train_subset")
                  and len({json.dumps(p.get(k)) for p in params.values()}) > 1)
    return {arm: {k: p.get(k) for k in keys} for arm, p in params.items()}


COLOURS = {"base": "#1f5fa8", "compare": "#c0392b"}


def curve_svg(summary: dict, w: int = 560, h: int = 320) -> str:
    """Test metric against training images (log scale), one line per arm, interval whiskers."""
    import math

    metric = summary["metric"]
    pts = [(arm, p) for arm, a in summary["arms"].items() for p in a["points"] if p[metric] is not None and p["images"]]
    if not pts:
        return "<p>No finished experiments.</p>"
    xs = [math.log10(p["images"]) for _, p in pts]
    x0, x1 = min(xs), max(xs) + 1e-9
    ys = [v for _, p in pts for v in (p[metric], p[f"{metric}_ci_low"], p[f"{metric}_ci_high"]) if v is not None]
    y0, y1 = min(ys + [0.5]), max(ys + [1.0])
    left, right, top, bottom = 56, w - 16, 30, h - 44

    def X(n):
        return left + (math.log10(n) - x0) / max(x1 - x0, 1e-9) * (right - left)

    def Y(v):
        return bottom - (v - y0) / max(y1 - y0, 1e-9) * (bottom - top)

    parts = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#9aa4b2"/>']
    for t in (y0 + (y1 - y0) * i / 4 for i in range(5)):
        parts.append(f'<text x="{left - 6}" y="{Y(t) + 3:.1f}" text-anchor="end" font-size="10">{t:.2f}</text>')
    for arm in summary["arms"]:
        mine = sorted((p for a, p in pts if a == arm), key=lambda p: p["images"])
        c = COLOURS.get(arm, "#555")
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                     + " ".join(f"{X(p['images']):.1f},{Y(p[metric]):.1f}" for p in mine) + '"/>')
        for p in mine:
            x = X(p["images"])
            if p[f"{metric}_ci_low"] is not None and p[f"{metric}_ci_high"] is not None:
                parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y(p[metric + "_ci_low"]):.1f}" '
                             f'y2="{Y(p[metric + "_ci_high"]):.1f}" stroke="{c}" stroke-opacity="0.5"/>')
            parts.append(f'<circle cx="{x:.1f}" cy="{Y(p[metric]):.1f}" r="3" fill="{c}"/>')
            parts.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" font-size="10">{p["images"]:.0f}</text>')
    legend = " ".join(f'<tspan fill="{COLOURS.get(a, "#555")}">&#9632; {html.escape(a)}'
                      f'{html.escape(" " + json.dumps(v["params"])) if v["params"] else ""}</tspan>'
                      for a, v in summary["arms"].items())
    title = html.escape(f"{summary['name']}: test {metric} vs labelled training images (mean over repeats, "
                        "bars: mean patient-bootstrap interval)")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif'>"
            f"<text x='{w / 2}' y='16' text-anchor='middle' font-size='12'>{title}</text>{''.join(parts)}"
            f"<text x='{(left + right) / 2}' y='{h - 20}' text-anchor='middle' font-size='11'>labelled training "
            f"images (log scale)</text><text x='{left}' y='{h - 4}' font-size='10'>{legend}</text></svg>")


def describe(summary: dict) -> list[str]:
    metric = summary["metric"]
    lines = [f"{summary['name']}: test {metric} by training set size"]
    for arm, a in summary["arms"].items():
        lines.append(f"  {arm}{' ' + json.dumps(a['params']) if a['params'] else ''}:")
        for p in a["points"]:
            v, lo, hi = p[metric], p[f"{metric}_ci_low"], p[f"{metric}_ci_high"]
            text = "n/a" if v is None else f"{v:.3f} (sd {p[f'{metric}_sd']:.3f} over {p['repeats']} repeat(s))"
            ci = f", interval [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
            lines.append(f"    {p['size']!s:>5}: {p['images']:.0f} images / {p['patients']:.0f} patients: {text}{ci}")
    return lines


# ---------------------------------------------------------------- command


def register(subparsers) -> None:
    p = subparsers.add_parser("curve", help="label-efficiency curve: test AUC vs training set size (docs/validation.md)")
    sub = p.add_subparsers(dest="curve_command", required=True)
    r = sub.add_parser("run", help="queue one DVC experiment per training set size and repeat")
    r.add_argument("--sizes", default="25,50,100,200,all", help="training images per point, or 'all' (default: %(default)s)")
    r.add_argument("--repeats", type=int, default=3, help="subsets drawn per size (default: %(default)s)")
    r.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                   help="a second arm with this params override, e.g. pretrain.weights=none (repeatable)")
    r.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="params override for every experiment, e.g. preprocess.cv.held_out_site=vienna")
    r.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once (dvc queue start -j)")
    r.add_argument("--name", default=None, help="experiment name prefix (default: curve)")
    r.add_argument("--no-wait", dest="wait", action="store_false", help="return once the queue is started")
    r.set_defaults(func=_run_main)
    s = sub.add_parser("report", help="the curve from the experiments of a commit (default: this one)")
    s.add_argument("--name", default=None, help="experiment name prefix (default: the only one found)")
    s.add_argument("--rev", default="HEAD", help="the commit the curve was run on (default: %(default)s)")
    s.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    s.set_defaults(func=_report_main)


def _run_main(args) -> int:
    names = run_curve(parse_sizes(args.sizes), args.repeats, args.compare, args.sets, args.name, args.jobs, args.wait)
    if args.wait:
        print(f"medtl curve: {len(names)} experiments done (dvc exp show); next: medtl curve report")
    return 0


def _report_main(args) -> int:
    summary = curve_report(args.name, args.out, args.rev)
    print("\n".join(describe(summary)))
    arms = " ".join(f"{args.out}/{a}.json" for a in summary["arms"])
    print(f"medtl curve: wrote {args.out}/summary.json, chart.html; plot: dvc plots show {arms} -x images -y roc_auc")
    return 0
