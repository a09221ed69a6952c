"""Leave-one-site-out: the split rule, and `medtl cv run/report --by site` through DVC experiments."""
import json
import sys

import pytest

from medtl.errors import MedtlError, ParamsError
from medtl.ingest.splits import SPLITS
from medtl.prepare.folds import CvParams
from medtl.prepare.loso import DROPPED, KEEP, site_splits
from tests.project import TINY_PARAMS, copy_project, deep_update, make_project

TRAIN, VAL, TEST = (SPLITS.index(s) for s in SPLITS)


def rows(*spec):
    return [{"site": s, "group": g, "split": sp, "label": "x"} for s, g, sp in spec]


def test_held_out_site_is_test_and_its_patients_leave_the_other_sites():
    r = rows(("a", "p1", "train"), ("a", "p2", "test"), ("b", "p1", "val"), ("b", "q0", "quarantine"))
    # Other sites: ten patients of two classes, each with two images, in whatever splits ingest chose.
    r += [{"site": "bc"[i % 2], "group": f"p{i}", "split": "test", "label": "xy"[i % 2]}
          for i in range(3, 13) for _ in range(2)]
    codes, summary = site_splits(r, "a")
    assert codes[:4].tolist() == [TEST, TEST, DROPPED, KEEP]
    other = codes[4:]
    assert set(other.tolist()) == {TRAIN, VAL} and (other == VAL).sum() == 4  # one fifth of the patients
    val_labels = {row["label"] for row, c in zip(r[4:], other) if c == VAL}
    assert val_labels == {"x", "y"}
    for g in {row["group"] for row in r[4:]}:  # a patient's images stay together
        assert len({c for row, c in zip(r[4:], other) if row["group"] == g}) == 1
    assert summary["per_site"]["b"]["left_out"] == 1 and summary["per_site"]["a"]["test"] == 2
    with pytest.raises(MedtlError, match="'z', not a site .* sites: a, b, c"):
        site_splits(r, "z")
    with pytest.raises(MedtlError, match="one site"):
        site_splits(rows(("a", "p1", "train"), ("a", "p2", "val")), "a")
    with pytest.raises(MedtlError, match="no 'site' column"):
        site_splits([{"group": "p1", "split": "train"}], "a")
    with pytest.raises(ParamsError, match="held_out_site"):
        CvParams(folds=3, held_out_site="a").check("preprocess.cv")


MEDTL = (sys.executable, "-m", "medtl.cli")
SITES_PARAMS = deep_update(TINY_PARAMS, {
    "ingest": {"demo": {"patients": 20, "sites": 2}},
    "finetune": {"epochs": 1, "patience": 1},
    "evaluate": {"bootstrap": {"n_resamples": 50}, "saliency": {"enabled": False}},
})


def test_by_site_with_one_site_is_refused_before_any_experiment(tiny_run, tmp_path):
    p = copy_project(tiny_run, tmp_path / "one-site")
    res = p.run(*MEDTL, "cv", "run", "--by", "site", check=False)
    assert res.returncode == 2 and "--by site" in res.stderr and "no 'site' column" in res.stderr, res.stderr
    assert "loso-site" not in p.dvc("exp", "show", "--csv", "--no-pager").stdout


@pytest.mark.e2e
def test_cv_by_site_runs_one_experiment_per_site_and_reports_each(tmp_path):
    p = make_project(tmp_path / "project", SITES_PARAMS)
    p.dvc("repro")
    p.commit("two sites")
    p.run(*MEDTL, "cv", "run", "--by", "site", "-j", "1")
    res = p.run(*MEDTL, "cv", "report", "--by", "site")
    print(res.stdout)
    summary = json.loads((p.path / "reports/cv-site/summary.json").read_text())
    assert summary["sites"] == ["a", "b"]
    pooled = summary["pooled_out_of_site"]
    # Every image of every site is predicted once, by the model that never saw its site.
    ingested = (p.path / "data/ingested/manifest.csv").read_text().splitlines()
    assert pooled["n"] == sum(s["test"]["n"] for s in summary["per_site"]) == len(ingested) - 1
    for s in summary["per_site"]:
        assert s["test"]["roc_auc_ci_low"] <= s["test"]["roc_auc"] <= s["test"]["roc_auc_ci_high"]
    assert "held out: b" in (p.path / "reports/cv-site/chart.html").read_text()
    assert "pooled out-of-site" in res.stdout


def test_per_class_figures_for_a_multi_class_task():
    import numpy as np

    from medtl.experiments.cv_sites import _per_class

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    p = rng.dirichlet([1, 1, 1], size=60)
    p[np.arange(60), y] += 1.0  # informative: each image's own class scores higher
    p /= p.sum(1, keepdims=True)
    out = _per_class(y, p, [f"g{i // 2}" for i in range(60)], ["a", "b", "c"], 100, 0, 0.05)
    assert list(out) == ["a", "b", "c"]
    for r in out.values():
        assert 0.5 < r["roc_auc"] <= 1 and r["support"] == 20
        assert r["sensitivity_ci_low"] <= r["sensitivity"] <= r["sensitivity_ci_high"]
