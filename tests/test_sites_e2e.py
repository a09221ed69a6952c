"""Two labelled sites through the real dvc, ingest -> evaluate: the site column carried to the prepared rows,
training with the site-balanced sampler, and per-site metrics with patient-bootstrap intervals."""
from __future__ import annotations

import csv
import json

import pytest

from tests.project import TINY_PARAMS, deep_update, make_project

SITE = {"patients": 12, "prevalence": 0.5, "min_images_per_patient": 2, "max_images_per_patient": 2,
        "min_size": 40, "max_size": 48}
PARAMS = deep_update(TINY_PARAMS, {
    "ingest": {"sources": [
        {"name": "north", "source": "demo", "demo": {**SITE, "seed": 1}},
        {"name": "south", "source": "demo", "demo": {**SITE, "seed": 2, "sites": [
            {"name": "scanner_b", "gamma": 1.8, "noise": 0.09, "resolution": 0.5, "monochrome1": 0.7,
             "collimation": 0.1}]}},
    ]},
    "finetune": {"epochs": 1, "sampler": "site_balanced", "class_weighting": False},
    "evaluate": {"bootstrap": {"n_resamples": 50}, "min_subgroup_size": 5, "saliency": {"enabled": False}},
})


@pytest.mark.e2e
def test_two_sites_ingest_to_evaluate(tmp_path):
    p = make_project(tmp_path / "project", PARAMS)
    p.dvc("repro")
    with open(p.path / "data/ingested/manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert {r["site"] for r in manifest} == {"north", "south"}
    with open(p.path / "data/prepared/test.csv", newline="") as f:
        test_rows = list(csv.DictReader(f))
    assert {r["site"] for r in test_rows} == {"north", "south"}

    m = json.loads((p.path / "reports/metrics.json").read_text())
    for site in ("north", "south"):
        n = sum(r["site"] == site for r in test_rows)
        assert m[f"site.{site}.n"] == n
        low, auc, high = m[f"site.{site}.roc_auc_ci_low"], m[f"site.{site}.roc_auc"], m[f"site.{site}.roc_auc_ci_high"]
        assert 0 <= low <= auc <= high <= 1
    worst = min(("north", "south"), key=lambda s: m[f"site.{s}.roc_auc"])
    assert m["worst_site"] == worst and m["worst_site_roc_auc"] == m[f"site.{worst}.roc_auc"]

    detail = json.loads((p.path / "reports/evaluation.json").read_text())["sites"]
    assert detail["pooled_roc_auc"] == m["roc_auc"] and set(detail["sites"]) == {"north", "south"}
    groups = {s: len({r["group"] for r in test_rows if r["site"] == s}) for s in ("north", "south")}
    assert {s: e["n_groups"] for s, e in detail["sites"].items()} == groups  # patients, not images, resampled
