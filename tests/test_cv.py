"""Cross-validation by patient: the fold partition (unit), and `medtl cv run` / `report` through the real dvc queue."""
from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest

from medtl.errors import MedtlError, ParamsError
from medtl.ingest.manifest import read_manifest
from medtl.params import build
from medtl.prepare.folds import CvParams, assign_fold
from medtl.prepare.preprocess import PreprocessParams
from tests.project import TINY_PARAMS, deep_update, make_project


def test_folds_partition_development_patients_and_leave_test_alone(tiny_run):
    ingested = tiny_run.path / "data/ingested"
    rows = read_manifest(ingested / "manifest.csv")
    val_groups: list[set] = []
    for fold in range(3):
        out, summary = assign_fold(rows, CvParams(folds=3, fold=fold, seed=1), ingested)
        again, _ = assign_fold(rows, CvParams(folds=3, fold=fold, seed=1), ingested)
        assert out == again  # deterministic given the seed
        assert [(a["image_id"], a["split"]) for a, b in zip(out, rows) if b["split"] == "test"] == \
               [(b["image_id"], "test") for b in rows if b["split"] == "test"]
        val = {r["group"] for r in out if r["split"] == "val"}
        train = {r["group"] for r in out if r["split"] == "train"}
        assert val and not val & train, "a patient in both train and val"
        assert {r["label"] for r in out if r["split"] == "val"} == {"normal", "lesion"}
        assert sum(f["images"] for f in summary["per_fold"]) == sum(r["split"] != "test" for r in rows)
        val_groups.append(val)
    dev = {r["group"] for r in rows if r["split"] != "test"}
    assert set().union(*val_groups) == dev and sum(len(v) for v in val_groups) == len(dev)
    other, _ = assign_fold(rows, CvParams(folds=3, fold=0, seed=2), ingested)
    assert {r["group"] for r in other if r["split"] == "val"} != val_groups[0]

    with pytest.raises(MedtlError, match="fewer patient groups than folds"):
        assign_fold(rows, CvParams(folds=len(dev) - 1, fold=0), ingested)


def test_cv_params_are_checked():
    with pytest.raises(ParamsError, match=r"preprocess\.cv\.fold"):
        build(PreprocessParams, {"cv": {"folds": 3, "fold": 3}}, "preprocess")
    with pytest.raises(ParamsError, match=r"preprocess\.cv\.folds"):
        build(PreprocessParams, {"cv": {"folds": 1}}, "preprocess")
    assert build(PreprocessParams, {}, "preprocess").cv.folds == 0


# The smallest run that still shows the point: more patients than the shared tiny run (one or two
# images each, so that a single split's validation holds enough patients for an interval at all),
# 16-pixel images and one epoch, so that the single split and three fold experiments take under two minutes.
CV_PARAMS = deep_update(TINY_PARAMS, {
    "ingest": {"split": {"train": 0.6, "val": 0.2, "test": 0.2},
               "demo": {"patients": 40, "min_images_per_patient": 1, "max_images_per_patient": 2,
                        "min_size": 24, "max_size": 32}},
    "preprocess": {"image_size": 16},
    "finetune": {"epochs": 1, "patience": 1},
    "evaluate": {"bootstrap": {"n_resamples": 50}, "saliency": {"enabled": False}},
})


@pytest.mark.e2e
def test_cv_run_queues_fold_experiments_and_report_pools_them(tmp_path):
    p = make_project(tmp_path / "project", CV_PARAMS)
    p.dvc("repro")
    p.commit("single split")
    medtl = (sys.executable, "-m", "medtl.cli")
    p.run(*medtl, "cv", "run", "--folds", "3", "-j", "1")

    shown = p.dvc("exp", "show", "--csv", "--no-pager").stdout
    for i in range(3):
        assert f"cv3-fold{i}," in shown, shown[-2000:]

    res = p.run(*medtl, "cv", "report")
    print(res.stdout)
    out = p.path / "reports/cv"
    summary = json.loads((out / "summary.json").read_text())
    pooled, single = summary["pooled_out_of_fold"], summary["single_split"]
    widths = summary["roc_auc_interval_width"]
    print("pooled out-of-fold ROC AUC interval width", widths["pooled_out_of_fold"],
          "single split val", widths["single_split_val"], "single split test", widths["single_split_test"])
    # Every development image is predicted once, by the fold that held it out.
    dev = sum(1 for line in (p.path / "data/prepared/train.csv").open()) - 1 + \
        sum(1 for line in (p.path / "data/prepared/val.csv").open()) - 1
    assert pooled["n"] == dev and pooled["n_groups"] > single["val"]["n_groups"]
    assert widths["pooled_out_of_fold"] < widths["single_split_val"]
    assert widths["pooled_out_of_fold"] < widths["single_split_test"]
    assert summary["across_folds"]["test"]["roc_auc"]["n"] == 3
    folds_of = Counter(line.split(",")[0] for line in (out / "oof_predictions.csv").read_text().splitlines()[1:])
    assert set(folds_of) == {"0", "1", "2"}
    assert "pooled out-of-fold" in (out / "chart.html").read_text()

    # Deterministic given the seeds: a second report is identical.
    p.run(*medtl, "cv", "report", "--out", "reports/cv-again")
    assert json.loads((p.path / "reports/cv-again/summary.json").read_text()) == summary

    again = p.run(*medtl, "cv", "run", "--folds", "3", check=False)
    assert again.returncode == 2 and "already exist" in again.stderr

    # After a later commit the folds belong to the earlier one: the report says how to reach them.
    run_on = p.git("rev-parse", "HEAD").stdout.strip()
    (p.path / "NOTES.md").write_text("a later commit\n")
    p.commit("later")
    later = p.run(*medtl, "cv", "report", "--out", "reports/cv-later", check=False)
    assert later.returncode == 2 and "--rev" in later.stderr, later.stderr
    p.run(*medtl, "cv", "report", "--rev", run_on, "--out", "reports/cv-rev")
    assert json.loads((p.path / "reports/cv-rev/summary.json").read_text()) == summary


def test_pooled_calls_use_each_folds_own_threshold():
    from medtl.experiments.cv import interval_report

    rng = np.random.default_rng(3)
    n = 40
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    thresholds = np.where(np.arange(n) < 20, 0.4, 0.6)  # two folds, two thresholds
    rows = [{"above_threshold": str(bool(p >= t)).lower()} for p, t in zip(p1, thresholds)]
    probs = np.stack([1 - p1, p1], axis=1)
    r = interval_report(y, probs, [f"g{i // 2}" for i in range(n)], rows, 50, 0, 0.05)
    called = p1 >= thresholds
    assert r["sensitivity"] == pytest.approx(called[y == 1].mean())
    assert r["specificity"] == pytest.approx((~called[y == 0]).mean())
    assert r["n_groups"] == 20 and r["roc_auc_ci_low"] <= r["roc_auc"] <= r["roc_auc_ci_high"]
