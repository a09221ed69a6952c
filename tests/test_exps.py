"""The experiment comparison fits a 120-column terminal: `medtl exps` and the README's `dvc exp show` line."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medtl.experiments.exps import records, render, render_csv, rows_from_dvc_json, table
from tests.project import VENV_BIN, copy_project

ROOT = Path(__file__).resolve().parents[1]


def _record(name, lr, extra):
    params = {"pretrain": {"arch": "resnet18", "weights": "none", "adapt": "none"},
              "finetune": {"strategy": "full", "lr": lr, **extra}}
    metrics = {"reports/metrics.json": {"data": {"roc_auc": 0.8123, "roc_auc_ci_low": 0.7, "roc_auc_ci_high": 0.9,
                                                 "sensitivity": 0.75, "specificity": 0.8}},
               "dvclive/metrics.json": {"data": {"val_auc": 0.85}}}
    return {"rev": "a" * 40, "name": name, "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}


def test_changed_params_that_do_not_fit_are_listed_not_squeezed():
    extra_a = {f"a_rather_long_parameter_name_{i}": i for i in range(8)}
    extra_b = {f"a_rather_long_parameter_name_{i}": i + 1 for i in range(8)}
    baseline = _record("main", 0.001, extra_a)
    baseline["experiments"] = [{"revs": [_record("exp-lr", 0.0003, extra_b)]}]
    rows = rows_from_dvc_json([baseline])
    assert [r["name"] for r in rows] == ["main", "exp-lr"]
    headers, cells, shared, left_out = table(rows, 120)
    text = render(headers, cells)
    assert max(map(len, text.splitlines())) <= 120
    assert headers[:7] == ["Experiment", "test ROC AUC (95% CI)", "sens", "spec", "val AUC", "ext AUC", "worst subgroup AUC"]
    # The key params both rows share are said once; the one that differs (lr) is a column.
    assert shared == [("arch", "resnet18"), ("weights", "none"), ("adapt", "none"), ("strategy", "full")]
    assert headers[7] == "lr"
    assert cells[0][1] == "0.812 (0.700-0.900)" and cells[1][headers.index("lr")] == "0.0003"
    assert left_out and all(k.startswith("finetune.a_rather_long") for k in left_out)
    assert len(left_out) + sum(h.startswith("finetune.a_rather") for h in headers) == 8
    # Unchanged params other than the key ones are not shown at all.
    assert not any(h.startswith("pretrain.") for h in headers)


def test_external_sets_and_the_weakest_subgroup_are_columns_and_records():
    baseline = _record("main", 0.001, {})
    exp = _record("exp-ext", 0.0003, {})
    exp["data"]["metrics"]["reports/metrics.json"]["data"].update({
        "external.site_b.roc_auc": 0.61, "external.same_scanner.roc_auc": 0.79,
        "subgroups_worst": "sex=F", "subgroups_worst_roc_auc": 0.7})
    baseline["experiments"] = [{"revs": [exp]}]
    rows = rows_from_dvc_json([baseline])
    headers, cells, _, _ = table(rows, 120)
    ext, worst = headers.index("ext AUC"), headers.index("worst subgroup AUC")
    assert [c[ext] for c in cells] == ["-", "0.610 site_b"]  # the lowest set, named when there are several
    assert [c[worst] for c in cells] == ["-", "0.700 sex=F"]
    recs = records(rows)
    assert recs[1]["external_roc_auc"] == {"site_b": 0.61, "same_scanner": 0.79} and recs[1]["worst_subgroup_roc_auc"] == 0.7
    assert recs[0]["params"]["finetune.lr"] == 0.001 and recs[1]["test_roc_auc_ci_low"] == 0.7
    import csv
    import io

    table_rows = list(csv.DictReader(io.StringIO(render_csv(rows))))
    assert [r["experiment"] for r in table_rows] == ["main", "exp-ext"]
    assert table_rows[1]["external.site_b.roc_auc"] == "0.61" and table_rows[0]["external.site_b.roc_auc"] == ""
    assert table_rows[1]["finetune.lr"] == "0.0003" and table_rows[1]["worst_subgroup"] == "sex=F"


def _readme_dvc_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("dvc exp show --") and "120 columns" in l)
    return shlex.split(line.split("#")[0])


@pytest.mark.e2e
def test_both_views_fit_120_columns_on_the_tiny_run(tiny_run, tmp_path):
    p = copy_project(tiny_run, tmp_path / "project")
    p.dvc("exp", "run", "-S", "evaluate.bootstrap.n_resamples=50")  # reruns evaluate only
    res = p.run(str(VENV_BIN / "medtl"), "exps")
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 120, res.stdout
    assert lines[0].startswith("same in every row: arch resnet18, weights none, adapt none, strategy full, lr ")
    header = lines[1]
    for column in ("test ROC AUC (95% CI)", "sens", "spec", "val AUC", "evaluate.bootstrap.n_resamples"):
        assert column in header, column
    body = lines[3:]
    assert len(body) == 3 and {l.split()[0] for l in body} >= {"workspace"}  # workspace, the commit, the experiment
    assert any(re.search(r"\b50$", l) for l in body) and any(re.search(r"\b1000$", l) for l in body)
    assert all(re.search(r"\d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\)", l) for l in body)

    import csv
    import io
    import json

    doc = json.loads(p.run(str(VENV_BIN / "medtl"), "exps", "--json").stdout)
    assert doc["format"] == "medtl-exps/1" and len(doc["experiments"]) == 3
    assert all(isinstance(e["test_roc_auc"], float) and "worst_subgroup_roc_auc" in e for e in doc["experiments"])
    table_rows = list(csv.DictReader(io.StringIO(p.run(str(VENV_BIN / "medtl"), "exps", "--csv").stdout)))
    assert len(table_rows) == 3 and {"50", "1000"} <= {r["evaluate.bootstrap.n_resamples"] for r in table_rows}
    help_text = p.run(str(VENV_BIN / "medtl"), "exps", "--help").stdout
    assert re.search(r"95%\s+interval", help_text) and "95%%" not in help_text

    # The README's plain dvc line: wide terminal, so any truncation would be DVC's own ("…").
    cmd = _readme_dvc_command()
    assert cmd[:3] == ["dvc", "exp", "show"]
    p.env["COLUMNS"] = "300"
    res = p.run(str(VENV_BIN / "dvc"), *cmd[1:], "--no-pager")
    lines = [l.rstrip() for l in res.stdout.splitlines() if l.strip()]
    assert max(map(len, lines)) <= 120, res.stdout
    assert "…" not in res.stdout
    header = next(l for l in lines if "Experiment" in l)
    for column in ("roc_auc", "sensitivity", "specificity", "val_auc", "finetune.lr", "pretrain.adapt"):
        assert column in header, (column, header)


def test_the_worst_site_is_shown_beside_the_pooled_auc():
    one_site = _record("main", 0.001, {})
    several = _record("exp-sites", 0.0003, {})
    several["data"]["metrics"]["reports/metrics.json"]["data"].update(
        {"worst_site": "b", "worst_site_roc_auc": 0.6125, "site.a.roc_auc": 0.9, "site.b.roc_auc": 0.6125})
    one_site["experiments"] = [{"revs": [several]}]
    headers, cells, _, _ = table(rows_from_dvc_json([one_site]), 120)
    assert headers[1:3] == ["test ROC AUC (95% CI)", "worst site AUC"]
    assert [c[2] for c in cells] == ["-", "0.613 (b)"]
    # without sites the table is as before
    assert "worst site AUC" not in table(rows_from_dvc_json([_record("main", 0.001, {})]), 120)[0]
