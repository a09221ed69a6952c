"""The evaluate stage through the real dvc, once, on a folder of DICOM and PNG files: plots, metrics, predict.

The DICOMs are read with a CT window other than their own (ingest.read.window) and the PNGs are gray
images saved as RGB: `medtl predict` must reproduce the stage's probabilities with no flags, and accept
the model's own test images.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medtl.intake import demo
from medtl.intake.phi import source_ref
from medtl.intake.readers import read
from tests.project import TINY_PARAMS, deep_update, make_project

# The demo files carry a window of about (300, 1400); this one differs, so a predict that ignored it would differ.
WINDOW = [300.0, 800.0]
PARAMS = deep_update(TINY_PARAMS, {
    "ingest": {"source": "folder", "data": "source", "folder": {"root": "source", "layout": "classes"},
               "read": {"window": WINDOW}},
    # fp32 on both sides, so predict and the stage agree to the printed digit on any CPU
    "evaluate": {"precision": "fp32", "bootstrap": {"n_resamples": 100}, "min_subgroup_size": 5,
                 "saliency": {"per_case": 1, "image_size": 96}, "failures": {"count": 2, "image_size": 64},
                 "robustness": {"enabled": True, "perturbations": ["blur", "fgsm"], "pgd_steps": 2}},
})


def write_source(root) -> None:
    """Demo patients as DICOM (even patients) and as 8-bit RGB PNG of gray content (odd), one folder per class."""
    for p in demo.fake_patients(24, 0.5, 11):
        label = demo.CLASSES[int(p.diseased)]
        paths = demo.write_patient_images(p, 2, (48, 64), 11, root / label)
        if p.index % 2:
            for path in paths:
                gray = np.round(read(path)[0].pixels * 255).astype(np.uint8)
                Image.fromarray(np.stack([gray] * 3, axis=2), "RGB").save(path.with_suffix(".png"))
                path.unlink()


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    p = make_project(tmp_path_factory.mktemp("evaluate-dvc") / "project", PARAMS)
    write_source(p.path / "source")
    p.dvc("repro")
    return p


def test_dvc_plots_show_renders_every_declared_plot(ran):
    declared = yaml.safe_load((ran.path / "dvc.yaml").read_text())["plots"]
    titles = [next(iter(d)) for d in declared]
    saliency = sorted(f.name for f in (ran.path / "reports/saliency").glob("*.png"))
    assert len(saliency) >= 2 and {n.split("_")[0] for n in saliency} <= {"TP", "FP", "TN", "FN"}

    shown = json.loads(ran.dvc("plots", "show", "--json").stdout)
    assert not shown.get("errors"), shown.get("errors")
    for title in titles:
        rendered = shown["data"][title]
        assert rendered and rendered[0]["content"]["data"]["values"], title
    assert {f"reports/saliency/{n}" for n in saliency} <= set(shown["data"])

    ran.dvc("plots", "show", "-o", "html")
    page = (ran.path / "html/index.html").read_text()
    for title in titles:
        assert title in page, title
    for name in saliency:
        assert re.search(re.escape(name), page), name


def test_metrics_columns_and_operating_point(ran):
    m = json.loads((ran.path / "reports/metrics.json").read_text())
    op = json.loads((ran.path / "reports/operating_point.json").read_text())
    assert op["threshold"] == m["threshold"]
    # RGB files of gray content are gray: colour is decided by the pixels, as predict decides it
    assert op["data"] == {"modalities": ["CT"], "colour": ["gray"]}
    assert Image.open(next((ran.path / "source").rglob("*.png"))).mode == "RGB"
    header = ran.dvc("exp", "show", "--csv", "--no-pager").stdout.splitlines()[0].split(",")
    for col in ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "sensitivity_ci_low", "specificity_ci_high"):
        assert col in header, col
    assert not [c for c in header if c.startswith(("detail", "per_class", "subgroups."))]


def test_the_preprocessing_record_goes_from_stats_json_into_the_model_unchanged(ran):
    from medtl.io import load_torch

    stats = json.loads((ran.path / "data/prepared/stats.json").read_text())
    assert stats["format"] == "medtl-prepared/2"
    record = stats["preprocessing"]
    assert record["read"] == {"window": WINDOW, "frame": "middle", "axis": 2, "slice": "middle"}
    assert record["image_size"] == PARAMS["preprocess"]["image_size"] and sorted(record["classes"]) == ["lesion", "normal"]
    ckpt = load_torch(ran.path / "models/model.pt")
    assert ckpt["format"] == "medtl-model/2" and ckpt["preprocessing"] == record


def test_the_threshold_is_the_rule_applied_to_the_validation_split(ran):
    import torch

    from medtl import hardware
    from medtl.metrics import apply_temperature, choose_threshold
    from medtl.model.classifier import load_classifier
    from medtl.model.inference import predict_logits
    from medtl.prepare.prepared import load_split

    op = json.loads((ran.path / "reports/operating_point.json").read_text())
    val = load_split(ran.path / "data/prepared", "val")
    model, _ = load_classifier(ran.path / "models/model.pt")
    hw = hardware.Hardware(torch.device("cpu"), "fp32")
    probs = apply_temperature(predict_logits(model, val.images, 64, hw, "val"), 1.0)
    assert op["rule"] == "youden" and op["n_val"] == len(val.labels) > 0
    assert op["threshold"] == pytest.approx(choose_threshold(val.labels, probs[:, 1], "youden"), abs=1e-6)


def test_predict_on_source_dicom_and_png_matches_the_evaluate_stage(ran, tmp_path):
    # Source files are found by the sha256 the manifest records for each image.
    by_hash = {hashlib.sha256(f.read_bytes()).hexdigest(): f for f in (ran.path / "source").rglob("*") if f.is_file()}
    manifest = {r["image_id"]: by_hash[r["sha256"]] for r in csv.DictReader(open(ran.path / "data/ingested/manifest.csv"))}
    stage = {manifest[r["image_id"]]: r for r in csv.DictReader(open(ran.path / "reports/predictions.csv"))}
    kinds = {s.suffix for s in stage}
    assert kinds == {".dcm", ".png"}, kinds
    # The project's own code, the operating point the stage recorded (found in reports/ by default), and no
    # read options: the window comes from the model.
    ran.run(sys.executable, "-m", "medtl.cli", "predict", "models/model.pt", *map(str, stage),
            "--out", str(tmp_path / "p.csv"), "--precision", "fp32", "--batch-size", "5")
    got = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert len(got) == len(stage)
    for source, expected in stage.items():
        row = got[str(source)]
        assert row["status"] == "ok", row["error"]
        assert abs(float(row["prob_lesion"]) - float(expected["prob_lesion"])) <= 2e-6, source
        assert row["above_threshold"] == expected["above_threshold"] and row["predicted"] == expected["predicted"]


def test_robustness_and_failure_cases_reach_dvc_plots_and_the_audit_report(ran):
    from medtl.cli import main

    r = json.loads((ran.path / "reports/robustness.json").read_text())
    assert r["enabled"] and [(c["perturbation"], c["severity"]) for c in r["conditions"]] == \
        [("blur", 1), ("blur", 2), ("blur", 3), ("fgsm", 1), ("fgsm", 2), ("fgsm", 3)]
    shown = json.loads(ran.dvc("plots", "show", "--json").stdout)
    values = shown["data"]["Robustness (test), ROC AUC vs severity (0 = clean)"][0]["content"]["data"]["values"]
    assert {v["severity"] for v in values} == {0, 1, 2, 3}
    # failure cases are named by image id and the manifest's source ref, never by path
    failures = json.loads((ran.path / "reports/failures/failures.json").read_text())
    refs = {row["image_id"]: row["source_ref"] for row in csv.DictReader(open(ran.path / "data/ingested/manifest.csv"))}
    assert failures["cases"] and all(c["source_ref"] == refs[c["image_id"]] for c in failures["cases"])
    assert "source/" not in json.dumps(failures)

    ran.commit("run")
    cwd = Path.cwd()
    os.chdir(ran.path)
    try:
        assert main(["audit"]) == 0
    finally:
        os.chdir(cwd)
    html = (ran.path / "reports/audit/report.html").read_text()
    assert 'id="robustness"' in html and "ROC AUC against severity" in html and "fgsm" in html
    assert 'id="failures"' in html and failures["cases"][0]["image_id"] in html
    md = (ran.path / "reports/audit/report.md").read_text()
    assert "## Robustness" in md and "## Failure cases" in md
