"""`medtl exps`: the experiment comparison in one screen.

`dvc exp show` lists every param and metric (about 190 columns); this reads
its `--json` output and shows, per experiment, the kept model's test metrics
(ROC AUC with its interval, the worst site's ROC AUC when the data has
several sites, sensitivity and specificity at the operating threshold), the validation AUC, the key params, and the params that differ
between the rows, within a width (120 columns by default). Changed params
that do not fit are listed under the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from typing import Any

from medtl.errors import MedtlError
from medtl.evaluate.reports import PROJECT_METRICS

# Always shown, under short headers: what an experiment is about at a glance.
KEY_PARAMS = {"pretrain.arch": "arch", "pretrain.weights": "weights", "pretrain.adapt": "adapt",
              "finetune.strategy": "strategy", "finetune.lr": "lr"}
TEST_METRICS = PROJECT_METRICS
TRAIN_METRICS = "dvclive/metrics.json"
DEFAULT_WIDTH = 120
GAP = 2


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _file_data(files: dict | None, name: str) -> dict:
    entry = (files or {}).get(name) or {}
    return entry.get("data") or {}


def rows_from_dvc_json(records: list[dict]) -> list[dict]:
    """One row per baseline and experiment of `dvc exp show --json`: name, flattened params, metrics."""
    rows = []

    def add(name: str, data: dict | None) -> None:
        if not data:
            return
        params = _flatten(_file_data(data.get("params"), "params.yaml"))
        test = _file_data(data.get("metrics"), TEST_METRICS)
        train = _file_data(data.get("metrics"), TRAIN_METRICS)
        rows.append({"name": name, "params": params, "test": test, "train": train})

    def label(entry: dict) -> str:
        rev = entry.get("rev") or "?"
        return entry.get("name") or (rev[:7] if len(rev) == 40 else rev)  # a commit's short sha, or "workspace"

    for baseline in records:
        add(label(baseline), baseline.get("data"))
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(label(rev), rev.get("data"))
    return rows


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def _param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 24 else text[:23] + "~"


def table(rows: list[dict], width: int = DEFAULT_WIDTH) -> tuple[list[str], list[list[str]], list[tuple[str, str]], list[str]]:
    """Headers, cells, the key params every row shares (name, value) and the changed params that did not fit in `width`.

    A key param that differs between rows gets a column (under its short
    name), as does every other param that differs; key params that all rows
    share are said once, above the table.
    """
    headers = ["Experiment", "test ROC AUC (95% CI)", "sens", "spec", "val AUC"]
    cells = []
    for r in rows:
        t = r["test"]
        auc = _num(t.get("roc_auc"))
        if t.get("roc_auc_ci_low") is not None and t.get("roc_auc_ci_high") is not None:
            auc += f" ({_num(t['roc_auc_ci_low'])}-{_num(t['roc_auc_ci_high'])})"
        cells.append([r["name"], auc, _num(t.get("sensitivity")), _num(t.get("specificity")), _num(r["train"].get("val_auc"))])
    if any(r["test"].get("worst_site_roc_auc") is not None for r in rows):  # several sites: the worst beside the pooled
        headers.insert(2, "worst site AUC")
        for c, r in zip(cells, rows):
            t = r["test"]
            c.insert(2, f"{_num(t['worst_site_roc_auc'])} ({t.get('worst_site')})" if t.get("worst_site_roc_auc") is not None else "-")
    add_shift_columns(rows, headers, cells)

    def varies(key: str) -> bool:
        return len({json.dumps(r["params"].get(key), sort_keys=True) for r in rows}) > 1

    present = [k for k in KEY_PARAMS if any(k in r["params"] for r in rows)]
    shared = [(KEY_PARAMS[k], _param(rows[0]["params"].get(k))) for k in present if not varies(k)]
    names = sorted({k for r in rows for k in r["params"]})
    changed = [k for k in present if varies(k)] + [k for k in names if k not in KEY_PARAMS and varies(k)]
    left_out = []
    for key in changed:
        column = [_param(r["params"].get(key)) for r in rows]
        header = KEY_PARAMS.get(key, key)
        used = sum(max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)) + GAP * len(headers)
        if used + max(len(header), *map(len, column)) > width:
            left_out.append(key)
            continue
        headers.append(header)
        for c, v in zip(cells, column):
            c.append(v)
    return headers, cells, shared, left_out


# ---- how the model holds up away from the test split: external sets and the weakest subgroup ----

def external_aucs(test: dict) -> dict[str, Any]:
    """{set name: ROC AUC} of the external sets evaluate ran (metrics.json's `external.<set>.roc_auc`)."""
    out = {}
    for key, value in test.items():
        if key.startswith("external.") and key.endswith(".roc_auc"):
            out[key[len("external."):-len(".roc_auc")]] = value
    return out


def worst_subgroup(test: dict) -> tuple[str | None, Any]:
    """(subgroup, ROC AUC) of the weakest subgroup large enough to judge (metrics.json's `subgroups_worst*`)."""
    return test.get("subgroups_worst"), test.get("subgroups_worst_roc_auc")


def _worst_external(test: dict) -> str:
    aucs = {k: v for k, v in external_aucs(test).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not aucs:
        return "-"
    name = min(aucs, key=aucs.get)
    return _num(aucs[name]) + (f" {name}" if len(aucs) > 1 else "")


def add_shift_columns(rows: list[dict], headers: list[str], cells: list[list[str]]) -> None:
    """The lowest external-set ROC AUC (named when there are several sets) and the weakest subgroup's ROC AUC."""
    headers += ["ext AUC", "worst subgroup AUC"]
    for r, c in zip(rows, cells):
        name, auc = worst_subgroup(r["test"])
        c += [_worst_external(r["test"]), f"{_num(auc)} {name}" if name and auc is not None else "-"]


def records(rows: list[dict]) -> list[dict]:
    """One JSON-ready record per experiment for scripts (`--json`, `--csv`): its metrics and every param."""
    out = []
    for r in rows:
        t = r["test"]
        name, auc = worst_subgroup(t)
        out.append({
            "experiment": r["name"],
            "test_roc_auc": t.get("roc_auc"), "test_roc_auc_ci_low": t.get("roc_auc_ci_low"),
            "test_roc_auc_ci_high": t.get("roc_auc_ci_high"),
            "test_sensitivity": t.get("sensitivity"), "test_specificity": t.get("specificity"),
            "val_auc": r["train"].get("val_auc"),
            "external_roc_auc": external_aucs(t),
            "worst_subgroup": name, "worst_subgroup_roc_auc": auc,
            "params": r["params"],
        })
    return out


def render_csv(rows: list[dict]) -> str:
    """The records as CSV: one column per metric, per external set and per param that differs between rows."""
    import csv
    import io

    recs = records(rows)
    sets = sorted({k for rec in recs for k in rec["external_roc_auc"]})
    varying = sorted(k for k in {k for r in rows for k in r["params"]}
                     if len({json.dumps(r["params"].get(k), sort_keys=True) for r in rows}) > 1)
    shown = [k for k in KEY_PARAMS if any(k in r["params"] for r in rows)] + [k for k in varying if k not in KEY_PARAMS]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fixed = [k for k in recs[0] if k not in ("external_roc_auc", "params")] if recs else []
    w.writerow(fixed + [f"external.{s}.roc_auc" for s in sets] + shown)
    for rec in recs:
        cell = lambda v: "" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v  # noqa: E731
        w.writerow([cell(rec[k]) for k in fixed] + [cell(rec["external_roc_auc"].get(s)) for s in sets]
                   + [cell(rec["params"].get(k)) for k in shown])
    return buf.getvalue()


def render(headers: list[str], cells: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    fmt = lambda row: (" " * GAP).join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells])


def dvc_exp_json(extra: list[str]) -> list[dict]:
    dvc = shutil.which("dvc")
    if dvc is None:
        raise MedtlError("dvc is not on PATH; run medtl exps in the project's environment (source .venv/bin/activate)")
    res = subprocess.run([dvc, "exp", "show", "--json", *extra], capture_output=True, text=True)
    if res.returncode != 0:
        raise MedtlError(f"dvc exp show failed ({res.returncode}): {res.stderr.strip()[-1000:]}")
    try:
        return json.loads(res.stdout)
    except ValueError as e:
        raise MedtlError(f"dvc exp show --json printed something that is not JSON ({e})") from None


def _cmd(args: argparse.Namespace) -> int:
    if args.width < 60:
        raise MedtlError(f"--width {args.width}: expected at least 60 columns")
    extra = (["-A"] if args.all_commits else []) + (["-n", str(args.num)] if args.num else [])
    rows = rows_from_dvc_json(dvc_exp_json(extra))
    if args.json:
        print(json.dumps({"format": "medtl-exps/1", "experiments": records(rows)}, indent=2, allow_nan=False, default=str))
        return 0
    if args.csv:
        print(render_csv(rows), end="")
        return 0
    if not rows:
        print("no experiments: run the pipeline (dvc repro) or an experiment (dvc exp run -S key=value)")
        return 0
    headers, cells, shared, left_out = table(rows, args.width)
    if shared:
        print(_wrap("same in every row: " + ", ".join(f"{k} {v}" for k, v in shared), args.width))
    print(render(headers, cells, args.md))
    if left_out:
        print(_wrap(f"also changed (no room in {args.width} columns): {', '.join(left_out)}", args.width))
    return 0


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, subsequent_indent="  ", break_long_words=False))


def register(subparsers) -> None:
    p = subparsers.add_parser("exps", help="compare experiments in one screen (key params and the model's metrics)",
                              description="A compact `dvc exp show`: per experiment, the test ROC AUC with its 95% "
                                          "interval, sensitivity and specificity, validation AUC, the lowest external-set "
                                          "ROC AUC, the weakest subgroup's ROC AUC, the key params and the params that "
                                          "differ between rows, within --width columns.")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="widest line (default: %(default)s)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--md", action="store_true", help="a Markdown table")
    fmt.add_argument("--json", action="store_true", help="one JSON object for scripts: every experiment's metrics and params")
    fmt.add_argument("--csv", action="store_true", help="CSV: one row per experiment, metrics and the params that differ")
    p.add_argument("-A", "--all-commits", action="store_true", help="experiments of all commits (dvc exp show -A)")
    p.add_argument("-n", "--num", type=int, default=None, help="experiments of the last N commits (dvc exp show -n)")
    p.set_defaults(func=_cmd)
