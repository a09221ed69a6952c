import json

import numpy as np
import pytest
from sklearn import metrics as skm

from medtl import metrics as M
from medtl.errors import MedtlError
from medtl.evaluate import metrics_report as R

# A 10-image binary case small enough to check by hand.
# Negatives score 0.1 0.2 0.3 0.4 0.6 0.15, positives 0.35 0.7 0.8 0.9.
Y10 = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
P10 = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.15, 0.35, 0.7, 0.8, 0.9])
PROBS10 = np.stack([1 - P10, P10], axis=1)


def report(y, probs, classes, threshold=None):
    """The report's point values (a few resamples: intervals are tested on their own)."""
    return R.evaluate_split(y, probs, classes, operating=threshold, n_resamples=10)


def _binary_data(n, rng, signal=1.5):
    y = rng.integers(0, 2, n)
    logit = rng.normal(size=n) + signal * (2 * y - 1)
    return y, 1 / (1 + np.exp(-logit))


def test_binary_metrics_match_hand_computed_values():
    m = report(Y10, PROBS10, ["benign", "malignant"])
    # At 0.5: TP = 3 (0.7 0.8 0.9), FN = 1 (0.35), FP = 1 (0.6), TN = 5.
    assert m["n"] == 10
    assert m["confusion_matrix"] == [[5, 1], [1, 3]]
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["ppv"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(6 / 8)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    # p_o = 0.8, p_e = (6*6 + 4*4) / 100 = 0.52.
    assert m["kappa"] == pytest.approx((0.8 - 0.52) / (1 - 0.52))
    # 22 of 24 positive-negative pairs ordered correctly (0.35 beats 4 negatives, the others all 6).
    assert m["roc_auc"] == pytest.approx(22 / 24)
    # Ranked: P P P N N P ... -> precision at each positive 1, 1, 1, 4/6.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 1 + 4 / 6) / 4)
    # Squared errors: negatives 0.6825 in total, positives 0.5625.
    assert m["brier"] == pytest.approx((0.6825 + 0.5625) / 10)
    assert m["per_class"]["malignant"]["support"] == 4
    assert m["per_class"]["benign"]["sensitivity"] == pytest.approx(5 / 6)
    np.testing.assert_allclose(m["confusion_matrix_normalized"], [[5 / 6, 1 / 6], [1 / 4, 3 / 4]])


def test_ece_matches_hand_computed_bins():
    # Five bins of width 0.2: gaps 0.125 (2 images), 0.05 (3), 0.4 (1), 0.15 (2), 0.15 (2).
    assert M.expected_calibration_error(Y10, PROBS10, n_bins=5) == pytest.approx(1.4 / 10)
    rows = M.reliability_diagram(Y10, PROBS10, n_bins=5)
    assert [r["count"] for r in rows] == [2, 3, 1, 2, 2]
    assert rows[1] == {"bin_centre": pytest.approx(0.3), "mean_predicted": pytest.approx(0.85 / 3),
                       "observed": pytest.approx(1 / 3), "count": 3}


def test_threshold_changes_binary_operating_metrics():
    m = report(Y10, PROBS10, ["neg", "pos"], threshold=0.3)
    # At 0.3: TP = 4, FP = 3 (0.3 0.4 0.6).
    assert m["threshold"] == 0.3
    assert m["sensitivity"] == 1.0
    assert m["specificity"] == pytest.approx(3 / 6)
    assert m["ppv"] == pytest.approx(4 / 7)
    assert m["roc_auc"] == pytest.approx(22 / 24)  # threshold-free


def test_multiclass_metrics_match_hand_computed_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.6, 0.3, 0.1],
        [0.3, 0.5, 0.2],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.2, 0.7],
        [0.5, 0.1, 0.4],
    ])
    m = report(y, probs, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # p_o = 4/6, p_e = (2*2 + 2*3 + 2*1) / 36 = 1/3.
    assert m["kappa"] == pytest.approx(0.5)
    assert "sensitivity" not in m and m["threshold"] is None
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(np.eye(3)[y], probs, average="macro"))
    # Brier: mean over images and classes of the squared error to the one-hot label.
    assert m["brier"] == pytest.approx(((probs - np.eye(3)[y]) ** 2).mean())


def test_undefined_metrics_are_none_not_zero():
    m = report(np.zeros(4, dtype=int), np.full((4, 2), 0.5), ["neg", "pos"])
    assert m["roc_auc"] is None and m["sensitivity"] is None and m["pr_auc"] is None
    assert m["specificity"] == 0.0  # all four called positive at p_pos >= 0.5
    json.dumps(m, allow_nan=False)


def test_standalone_helpers_agree_with_report():
    y_pred = M.predict_labels(PROBS10)
    assert M.confusion_matrix(Y10, y_pred, 2).tolist() == [[5, 1], [1, 3]]
    assert M.cohen_kappa(Y10, y_pred, 2) == pytest.approx((0.8 - 0.52) / 0.48)
    assert M.roc_auc(Y10, P10) == pytest.approx(22 / 24)  # 1-D input is p_pos
    assert M.pr_auc(Y10, PROBS10) == pytest.approx(skm.average_precision_score(Y10, P10))
    assert M.brier_score(Y10, P10) == pytest.approx(0.1245)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="y_true has 3 entries but probs has 10 rows"):
        report(Y10[:3], PROBS10, ["a", "b"])
    with pytest.raises(ValueError, match="probs must be finite probabilities"):
        report(Y10, PROBS10 * 3, ["a", "b"])
    with pytest.raises(ValueError, match="unknown metric 'auroc'"):
        M.bootstrap_ci(Y10, PROBS10, metrics=["auroc"])
    with pytest.raises(MedtlError, match="expected a rule among fixed, youden, sensitivity, specificity"):
        M.choose_threshold(Y10, P10, "f1")
    with pytest.raises(MedtlError, match="expected a target sensitivity"):
        M.choose_threshold(Y10, P10, "sensitivity")
    with pytest.raises(MedtlError, match="0 positives"):
        M.choose_threshold(np.zeros(5, dtype=int), np.linspace(0, 1, 5), "youden")


# ---------------------------------------------------------------- operating point


def test_threshold_rules_on_constructed_validation_data():
    # Youden J per candidate: 0.7 gives 3/4 - 0 = 0.75, the maximum.
    assert M.choose_threshold(Y10, P10, "youden") == 0.7
    # Every positive caught only down to 0.35; 3 of 4 already at 0.7.
    assert M.choose_threshold(Y10, P10, "sensitivity", 1.0) == 0.35
    assert M.choose_threshold(Y10, P10, "sensitivity", 0.75) == 0.7
    # No false positive above 0.6; one of six (specificity 5/6) at 0.6.
    assert M.choose_threshold(Y10, P10, "specificity", 1.0) == 0.7
    assert M.choose_threshold(Y10, P10, "specificity", 0.8) == 0.6
    assert M.choose_threshold(Y10, P10, "fixed") == 0.5
    assert M.choose_threshold(Y10, P10, "fixed", 0.3) == 0.3


def test_specificity_one_is_reachable_when_a_negative_scores_highest():
    y = np.array([0, 1, 1, 0])
    p = np.array([1.0, 0.9, 0.8, 0.1])
    t = M.choose_threshold(y, p, "specificity", 1.0)
    assert t > 1.0 and np.isfinite(t)
    assert M.point_estimates(y, p, ["specificity"], threshold=t)["specificity"] == 1.0


def test_threshold_is_a_function_of_validation_data_only():
    rng = np.random.default_rng(1)
    y_val, p_val = _binary_data(300, rng)
    op = M.operating_point(y_val, p_val, "sensitivity", 0.9)
    assert op["fitted_on"] == "validation" and op["val_sensitivity"] >= 0.9
    y_a, p_a = _binary_data(200, rng, signal=0.5)
    y_b, p_b = _binary_data(200, rng, signal=3.0)
    report_a = R.evaluate_split(y_a, p_a, ["neg", "pos"], operating=op, n_resamples=50)
    report_b = R.evaluate_split(y_b, p_b, ["neg", "pos"], operating=op, n_resamples=50)
    # Whatever the test split holds, the operating threshold is the one fitted on validation.
    assert report_a["threshold"] == report_b["threshold"] == op["threshold"]
    assert report_a["threshold_rule"] == "sensitivity"
    assert report_a["sensitivity"] != report_b["sensitivity"]
    # A different validation split moves it; the test split never entered.
    y_val2, p_val2 = _binary_data(300, rng, signal=0.5)
    assert M.choose_threshold(y_val2, p_val2, "sensitivity", 0.9) != op["threshold"]
    assert M.choose_threshold(y_val, p_val, "sensitivity", 0.9) == op["threshold"]


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_intervals_contain_estimate_and_shrink_with_data():
    rng = np.random.default_rng(2)
    widths = []
    for n in (200, 2000):
        y, p = _binary_data(n, rng)
        point = M.point_estimates(y, p)
        ci = M.bootstrap_ci(y, p, None, n_resamples=500, seed=3)
        for name in ("roc_auc", "sensitivity", "specificity", "accuracy", "brier"):
            assert ci[name]["low"] <= point[name] <= ci[name]["high"], name
            assert ci[name]["skipped"] == 0
        widths.append(ci["roc_auc"]["high"] - ci["roc_auc"]["low"])
    # Ten times the data: about sqrt(10) ~ 3.2 times narrower.
    assert widths[1] < widths[0] / 2


def test_bootstrap_is_reproducible_and_seeded():
    rng = np.random.default_rng(4)
    y, p = _binary_data(300, rng)
    a = M.bootstrap_ci(y, p, None, ["roc_auc"], 200, seed=7)
    b = M.bootstrap_ci(y, p, None, ["roc_auc"], 200, seed=7)
    c = M.bootstrap_ci(y, p, None, ["roc_auc"], 200, seed=8)
    assert a == b and a != c


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_correlated_images():
    rng = np.random.default_rng(5)
    n_patients, per_patient = 60, 10
    y_patient = rng.integers(0, 2, n_patients)
    score_patient = rng.normal(size=n_patients) + 1.0 * (2 * y_patient - 1)
    # Ten near-identical images per patient: they carry about one patient's worth of evidence.
    y = np.repeat(y_patient, per_patient)
    logit = np.repeat(score_patient, per_patient) + 0.1 * rng.normal(size=y.size)
    p = 1 / (1 + np.exp(-logit))
    patients = np.repeat([f"patient-{i}" for i in range(n_patients)], per_patient)
    by_image = M.bootstrap_ci(y, p, None, ["roc_auc", "accuracy"], 1000, seed=0)
    by_patient = M.bootstrap_ci(y, p, patients, ["roc_auc", "accuracy"], 1000, seed=0)
    for name in ("roc_auc", "accuracy"):
        w_image = by_image[name]["high"] - by_image[name]["low"]
        w_patient = by_patient[name]["high"] - by_patient[name]["low"]
        assert w_patient > 2 * w_image, name


def test_builtin_bootstrap_equals_resampling_the_images_explicitly():
    # The weighted fast path must give exactly what recomputing on each resample gives.
    rng = np.random.default_rng(6)
    y, p = _binary_data(150, rng)
    p = np.round(p, 2)  # ties, to exercise tie handling
    groups = rng.integers(0, 40, y.size)
    custom = {
        "roc_auc": lambda yt, pr: skm.roc_auc_score(yt, pr[:, 1]) if len(set(yt)) == 2 else None,
        "pr_auc": lambda yt, pr: skm.average_precision_score(yt, pr[:, 1]) if yt.any() else None,
        "kappa": lambda yt, pr: skm.cohen_kappa_score(yt, (pr[:, 1] >= 0.4).astype(int)),
    }
    fast = M.bootstrap_ci(y, p, groups, ["roc_auc", "pr_auc", "kappa"], 200, seed=1, threshold=0.4)
    slow = M.bootstrap_ci(y, p, groups, custom, 200, seed=1, threshold=0.4)
    for name in custom:
        assert fast[name]["low"] == pytest.approx(slow[name]["low"], abs=1e-12)
        assert fast[name]["high"] == pytest.approx(slow[name]["high"], abs=1e-12)


def test_resamples_with_one_class_are_skipped_and_counted():
    y = np.array([0, 0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7])
    ci = M.bootstrap_ci(y, p, None, ["roc_auc", "sensitivity", "accuracy"], 400, seed=0)
    # A resample misses the one positive with probability (4/5)^5 ~ 0.33.
    assert 80 < ci["roc_auc"]["skipped"] < 180
    assert ci["sensitivity"]["skipped"] == ci["roc_auc"]["skipped"]
    assert ci["accuracy"]["skipped"] == 0


def test_bootstrap_does_not_depend_on_how_resamples_are_chunked(monkeypatch):
    # Resamples are evaluated in chunks of the weight matrix; the chunk size is memory, never results.
    rng = np.random.default_rng(7)
    y, p = _binary_data(300, rng)
    groups = rng.integers(0, 100, y.size)
    whole = M.bootstrap_ci(y, p, groups, None, 200, seed=0)
    per_class = M.per_class_metrics(y, p, groups, n_resamples=200, seed=0)[0]
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 1000)  # 3 resamples per chunk
    chunked = M.bootstrap_ci(y, p, groups, None, 200, seed=0)
    for name, ci in whole.items():  # equal up to summation order
        assert chunked[name] == {"low": pytest.approx(ci["low"], rel=1e-12), "high": pytest.approx(ci["high"], rel=1e-12),
                                 "skipped": ci["skipped"]}, name
    assert M.per_class_metrics(y, p, groups, n_resamples=200, seed=0)[0] == per_class
    # and the same draws give the headline's sensitivity interval for the positive class
    assert per_class[1]["sensitivity_ci_low"] == whole["sensitivity"]["low"]
    assert per_class[1]["sensitivity_ci_high"] == whole["sensitivity"]["high"]


# ---------------------------------------------------------------- calibration


def test_ece_small_when_calibrated_and_larger_when_overconfident():
    rng = np.random.default_rng(8)
    p = rng.uniform(size=20000)
    y = (rng.uniform(size=p.size) < p).astype(int)  # outcomes drawn at the stated probability
    calibrated = M.expected_calibration_error(y, p)
    logit = np.log(p / (1 - p))
    overconfident = M.expected_calibration_error(y, 1 / (1 + np.exp(-4 * logit)))
    assert calibrated < 0.02
    assert overconfident > 0.1


def test_temperature_scaling_reduces_nll_of_overconfident_logits():
    rng = np.random.default_rng(9)
    n, k = 3000, 3
    true_logits = rng.normal(size=(n, k)) * 1.5
    probs = M.apply_temperature(true_logits, 1.0)
    y = np.array([rng.choice(k, p=row) for row in probs])
    overconfident = 3.0 * true_logits
    t = M.fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.15)
    assert M.negative_log_likelihood(overconfident, y, t) < M.negative_log_likelihood(overconfident, y) - 0.1
    scaled = M.apply_temperature(overconfident, t)
    assert np.allclose(scaled.sum(axis=1), 1.0)
    assert M.expected_calibration_error(y, scaled) < M.expected_calibration_error(y, M.apply_temperature(overconfident, 1.0))
    with pytest.raises(ValueError, match="temperature must be a positive"):
        M.apply_temperature(overconfident, 0.0)


# ---------------------------------------------------------------- subgroups, report, curves


def test_subgroups_flag_small_or_one_class_groups():
    rng = np.random.default_rng(10)
    y, p = _binary_data(160, rng)
    site = np.array(["north"] * 100 + ["south"] * 10 + ["east"] * 40 + [""] * 10, dtype=object)
    y[110:150] = 0  # "east" has no positive
    out = R.subgroup_metrics(y, p, None, site, classes=["neg", "pos"], n_resamples=100, min_size=30)
    assert set(out) == {"north", "south", "east", "missing"}
    assert out["north"]["too_small"] is False and out["north"]["reason"] is None
    assert out["south"]["too_small"] is True and "10 images" in out["south"]["reason"]
    assert out["east"]["too_small"] is True and "no images of class pos" in out["east"]["reason"]
    assert out["east"]["sensitivity"] is None and out["east"]["roc_auc_ci_low"] is None
    assert out["north"]["roc_auc_ci_low"] <= out["north"]["roc_auc"] <= out["north"]["roc_auc_ci_high"]
    assert out["north"]["class_counts"] == {"neg": int((y[:100] == 0).sum()), "pos": int((y[:100] == 1).sum())}


def test_evaluate_split_report_is_flat_json_with_intervals():
    rng = np.random.default_rng(11)
    y, p = _binary_data(400, rng)
    patients = rng.integers(0, 120, y.size).astype(str)
    sex = rng.choice(["F", "M"], y.size)
    y_val, p_val = _binary_data(200, rng)
    op = M.operating_point(y_val, p_val, "youden")
    full = R.evaluate_split(y, p, ["normal", "pneumonia"], groups=patients, subgroups={"sex": sex},
                                                         operating=op, n_resamples=200, seed=0, temperature=1.3)
    text = json.dumps(full, allow_nan=False)
    assert json.loads(text) == full
    for name in M.BINARY_HEADLINE:
        assert full[f"{name}_ci_low"] <= full[name] <= full[f"{name}_ci_high"], name
    assert full["threshold"] == op["threshold"] and full["positive_class"] == "pneumonia"
    assert full["bootstrap"]["unit"] == "group" and full["bootstrap"]["n_units"] == len(set(patients))
    assert full["calibration"]["temperature"] == 1.3
    assert sum(row["count"] for row in full["calibration"]["reliability"]) == 400
    assert set(full["subgroups"]["sex"]) == {"F", "M"}
    # Every per-class value has its patient-bootstrap interval.
    for name, row in full["per_class"].items():
        for m in M.PER_CLASS_METRICS:
            assert row[f"{m}_ci_low"] <= row[m] <= row[f"{m}_ci_high"], (name, m)
            assert row[f"{m}_ci_high"] > row[f"{m}_ci_low"], (name, m)


def test_evaluate_split_multiclass_uses_argmax():
    rng = np.random.default_rng(12)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3))
    logits[np.arange(300), y] += 1.5
    report = R.evaluate_split(y, M.apply_temperature(logits, 1.0), ["a", "b", "c"], n_resamples=100)
    assert report["threshold"] is None and report["threshold_rule"] == "argmax"
    assert "sensitivity" not in report and "f1_macro_ci_low" in report
    assert report["bootstrap"]["unit"] == "image"
    json.dumps(report, allow_nan=False)


def test_curve_points_match_sklearn_and_are_downsampled():
    rows = R.roc_points(Y10, P10)
    fpr, tpr, _ = skm.roc_curve(Y10, P10, drop_intermediate=False)
    assert [r["fpr"] for r in rows] == pytest.approx(fpr)
    assert [r["tpr"] for r in rows] == pytest.approx(tpr)
    assert rows[0]["threshold"] is None and rows[1]["threshold"] == 0.9
    pr = R.pr_points(Y10, P10)
    assert pr[0] == {"recall": 0.0, "precision": 1.0, "threshold": None}
    assert pr[-1]["recall"] == 1.0 and pr[-1]["precision"] == pytest.approx(0.4)
    rng = np.random.default_rng(13)
    y, p = _binary_data(5000, rng)
    curves = R.curve_points(y, np.stack([1 - p, p], axis=1), ["neg", "pos"])
    assert len(curves["roc"]) <= 200 and len(curves["pr"]) <= 200
    assert curves["roc"][0]["fpr"] == 0.0 and curves["roc"][-1]["tpr"] == 1.0
    json.dumps(curves, allow_nan=False)
