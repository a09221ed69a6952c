"""The robustness report: perturbations fixed, seeded and monotone; evaluate re-scores the test split under them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medtl.errors import ParamsError
from medtl.evaluate.evaluation import EvaluateParams, run_evaluate
from medtl.evaluate.robustness import ALL, PERTURBATIONS, perturb
from medtl.params import build
from tests.test_evaluation import params, write_model, write_prepared


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second intra-op thread only adds waiting, badly so on a shared machine.
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synthetic_image(side: int = 48, channels: int = 1) -> np.ndarray:
    """Two images with edges, a gradient and texture, as (N, C, S, S) in [0, 1]."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    img = 0.2 + 0.3 * xx + 0.1 * np.sin(12 * yy) * np.cos(9 * xx)
    img[side // 4:side // 2, side // 3:2 * side // 3] += 0.35
    rng = np.random.default_rng(0)
    texture = 0.05 * rng.standard_normal((side, side))
    gray = np.stack([img, img[::-1] + texture])[:, None]
    tint = np.array([1.0, 0.8, 0.6][:channels]).reshape(1, -1, 1, 1)
    return np.clip(gray * tint, 0, 1).astype(np.float32)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_each_perturbation_is_seeded_and_monotone_in_severity(name, channels):
    x = synthetic_image(channels=channels)
    change = []
    for severity in (1, 2, 3):
        out = perturb(name, x, severity, seed=3)
        assert out.shape == x.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        assert np.array_equal(out, perturb(name, x, severity, seed=3))
        change.append(float(np.abs(out - x).mean()))
    assert 0 < change[0] < change[1] < change[2], change


def test_unknown_perturbation_and_bad_epsilons_are_refused_with_the_allowed_values():
    with pytest.raises(ParamsError, match="evaluate.robustness.perturbations.*'snow'.*gaussian_noise, blur.*fgsm, pgd"):
        build(EvaluateParams, {"robustness": {"perturbations": ["blur", "snow"]}}, "evaluate")
    with pytest.raises(ParamsError, match=r"evaluate.robustness.epsilons.*\(0, 1\]"):
        build(EvaluateParams, {"robustness": {"epsilons": [0.0, 0.01]}}, "evaluate")
    with pytest.raises(ParamsError, match="evaluate.robustness.pgd_steps"):
        build(EvaluateParams, {"robustness": {"pgd_steps": 0}}, "evaluate")
    assert not build(EvaluateParams, {}, "evaluate").robustness.enabled
    assert list(build(EvaluateParams, {}, "evaluate").robustness.perturbations) == list(ALL)


def test_evaluate_writes_robustness_against_the_clean_operating_point(tmp_path):
    model, prepared = write_model(tmp_path / "model.pt"), write_prepared(tmp_path / "prepared")
    p = params(robustness={"enabled": True, "perturbations": ["contrast", "fgsm", "pgd"], "epsilons": [0.0005, 0.002],
                           "pgd_steps": 2})
    metrics = run_evaluate(p, model, prepared, tmp_path / "reports")
    r = json.loads((tmp_path / "reports/robustness.json").read_text())
    assert r["enabled"] and r["threshold"] == metrics["threshold"] and r["n"] == metrics["n"]
    assert r["clean"]["roc_auc"] == pytest.approx(metrics["roc_auc"])
    assert [(c["perturbation"], c["severity"]) for c in r["conditions"]] == \
        [("contrast", 1), ("contrast", 2), ("contrast", 3), ("fgsm", 1), ("fgsm", 2), ("pgd", 1), ("pgd", 2)]
    for c in r["conditions"]:
        assert c["roc_auc_drop"] == pytest.approx(r["clean"]["roc_auc"] - c["roc_auc"])
        assert 0 <= c["flipped"] <= 1 and c["n_flipped"] == round(c["flipped"] * r["n"])
        assert c["roc_auc_ci_low"] <= c["roc_auc"] <= c["roc_auc_ci_high"]
    attacks = {(c["perturbation"], c["severity"]): c for c in r["conditions"] if c["kind"] == "attack"}
    # attacks against the true labels lower the AUC, the larger epsilon more
    assert attacks[("fgsm", 2)]["roc_auc"] < attacks[("fgsm", 1)]["roc_auc"] < r["clean"]["roc_auc"]
    assert attacks[("pgd", 2)]["roc_auc"] < r["clean"]["roc_auc"]
    curve = json.loads((tmp_path / "reports/plots/robustness.json").read_text())
    assert [row["severity"] for row in curve] == [0, 1, 2, 3]
    assert curve[0]["fgsm"] == r["clean"]["roc_auc"] and curve[3]["fgsm"] is None and curve[1]["blur"] is None
    # the same seed gives the same report
    run_evaluate(p, model, prepared, tmp_path / "again")
    assert json.loads((tmp_path / "again/robustness.json").read_text()) == r
