"""The whole pipeline through the real dvc on a temporary git repository."""
from __future__ import annotations

import csv
import json
import math
import re

import pytest

from medtl.intake import demo
from tests.project import copy_project

DECLARED_OUTPUTS = [
    "data/ingested/manifest.csv", "data/ingested/pixels.u16", "data/ingested/report.json",
    "data/prepared/train.npy", "data/prepared/val.npy", "data/prepared/test.npy", "data/prepared/stats.json",
    "models/backbone.pt", "models/model.pt", "dvclive/metrics.json",
    "reports/metrics.json", "reports/predictions.csv",
]


@pytest.fixture(scope="module")
def ran(tiny_run, tmp_path_factory):
    return copy_project(tiny_run, tmp_path_factory.mktemp("e2e") / "project")


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def test_every_declared_output_exists_and_metrics_are_numbers(ran):
    for rel in DECLARED_OUTPUTS:
        assert (ran.path / rel).is_file(), rel
    m = json.loads((ran.path / "reports/metrics.json").read_text())
    for key in ("roc_auc", "accuracy", "balanced_accuracy"):
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0 and not math.isnan(m[key]), key
    assert m["n"] > 0
    shown = json.loads(ran.dvc("metrics", "show", "--json").stdout)
    assert "reports/metrics.json" in json.dumps(shown)


def test_no_patient_appears_in_two_splits(ran):
    with open(ran.path / "data/ingested/manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_fake_phi_from_the_demo_headers_reaches_no_artifact(ran):
    d = ran.params["ingest"]["demo"]
    patients = demo.fake_patients(d["patients"], d.get("prevalence", 0.4), d.get("seed", 7))
    needles = set()
    for p in patients:
        needles |= {p.patient_id, p.birth_date, p.name, p.name.replace("^", " "), p.name.split("^")[1]}
    needles = {n.encode() for n in needles}
    files = [f for top in ("data", "models", "reports", "dvclive") for f in (ran.path / top).rglob("*") if f.is_file()]
    files += list(ran.path.glob("*.provenance.json")) + [ran.path / "dvc.lock"]
    assert len(files) > 10
    for f in files:
        data = f.read_bytes()
        leaked = [n for n in needles if n in data]
        assert not leaked, f"{f} contains {leaked[:3]}"


def test_changing_finetune_lr_reruns_only_fine_tune_and_evaluate(ran):
    assert "up to date" in ran.dvc("status").stdout.lower() or ran.dvc("status").stdout.strip() == ""
    ran.update_params({"finetune": {"lr": 0.002}})
    # dvc status names the stage whose own deps changed; its downstream stage reruns with it
    status = json.loads(ran.dvc("status", "--json").stdout)
    assert set(status) == {"fine-tune"}
    assert "params.yaml" in json.dumps(status["fine-tune"])
    out = ran.dvc("repro").stdout
    assert stages_run(out) == ["fine-tune", "evaluate"]
    ran.commit("lr 0.002")


def test_experiments_with_different_lr_are_listed_with_metrics(ran):
    for lr in ("0.0005", "0.003"):
        ran.dvc("exp", "run", "-S", f"finetune.lr={lr}")
    shown = json.loads(ran.dvc("exp", "show", "--json").stdout)
    exps = []

    def walk(node):
        if isinstance(node, dict):
            if "name" in node and isinstance(node.get("data"), dict):
                exps.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    lrs = {}
    for e in exps:
        data = e["data"]
        params = data.get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {})
        lr = params.get("finetune", {}).get("lr")
        if metrics and lr is not None:
            lrs[lr] = metrics["roc_auc"]
    assert 0.0005 in lrs and 0.003 in lrs, lrs
