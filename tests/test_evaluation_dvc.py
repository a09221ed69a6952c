"""The evaluate stage through the real dvc, once, on a folder of DICOM and PNG files: plots, metrics, predict."""
from __future__ import annotations

import csv
import json
import re
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from medtl import demo
from medtl.phi import source_ref
from medtl.readers import read
from tests.project import TINY_PARAMS, deep_update, make_project

PARAMS = deep_update(TINY_PARAMS, {
    "ingest": {"source": "folder", "data": "source", "folder": {"root": "source", "layout": "classes"}},
    # fp32 on both sides, so predict and the stage agree to the printed digit on any CPU
    "evaluate": {"precision": "fp32", "bootstrap": {"n_resamples": 100}, "min_subgroup_size": 5,
                 "saliency": {"per_case": 1, "size": 96}},
})


def write_source(root) -> None:
    """Demo patients as DICOM (even patients) and as 8-bit PNG (odd patients), one folder per class."""
    for p in demo.fake_patients(24, 0.5, 11):
        label = demo.CLASSES[int(p.diseased)]
        paths = demo.write_patient_images(p, 2, (48, 64), 11, root / label)
        if p.index % 2:
            for path in paths:
                pixels = read(path)[0].pixels
                Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path.with_suffix(".png"))
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
    assert op["threshold"] == m["threshold"] and op["fitted_on"] == "validation"
    assert op["data"] == {"modalities": ["CT"], "colour": ["gray"]}
    header = ran.dvc("exp", "show", "--csv", "--no-pager").stdout.splitlines()[0].split(",")
    for col in ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "sensitivity_ci_low", "specificity_ci_high"):
        assert col in header, col
    assert not [c for c in header if c.startswith(("detail", "per_class", "subgroups."))]


def test_predict_on_source_dicom_and_png_matches_the_evaluate_stage(ran, tmp_path):
    by_ref = {source_ref(f.relative_to(ran.path / "source").as_posix()): f.relative_to(ran.path / "source").as_posix()
              for f in (ran.path / "source").rglob("*.*")}  # what `medtl locate` does
    manifest = {r["image_id"]: by_ref[r["source_ref"]] for r in csv.DictReader(open(ran.path / "data/ingested/manifest.csv"))}
    stage = {manifest[r["image_id"]]: r for r in csv.DictReader(open(ran.path / "reports/predictions.csv"))}
    kinds = {s.rsplit(".", 1)[-1] for s in stage}
    assert kinds == {"dcm", "png"}, kinds
    files = [str(ran.path / "source" / s) for s in stage]
    # The project's own code, and the operating point the stage recorded (found in reports/ by default).
    ran.run(sys.executable, "-m", "medtl.cli", "predict", "models/model.pt", *files,
            "--out", str(tmp_path / "p.csv"), "--precision", "fp32", "--batch-size", "5")
    got = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert len(got) == len(stage)
    for source_path, expected in stage.items():
        row = got[str(ran.path / "source" / source_path)]
        assert row["status"] == "ok"
        assert abs(float(row["prob_lesion"]) - float(expected["prob_lesion"])) <= 2e-6, source_path
        assert row["above_threshold"] == expected["above_threshold"] and row["predicted"] == expected["predicted"]
