"""The evaluate stage's work without dvc: a real (untrained) ResNet-18 on small prepared arrays written here."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medtl.errors import ParamsError
from medtl.evaluate.evaluation import EvaluateParams, run_evaluate
from medtl.evaluate.metrics_report import age_band, subgroup_columns
from medtl.evaluate.saliency import NoTargetLayer, grad_cam, pick_cases, target_layer
from medtl.model.classifier import Classifier, model_file
from medtl.model.model_file import save_model
from medtl.model.start import build_backbone
from medtl.params import build
from medtl.prepare.prepared import write_stats
from tests.project import preprocessing_record

CLASSES = ["normal", "lesion"]
SIZE = 32


def _images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Noise plus a bright square for positives, so an untrained network's outputs still vary."""
    x = rng.uniform(0.0, 0.5, (len(labels), 1, SIZE, SIZE)).astype(np.float32)
    for i, y in enumerate(labels):
        side = int(rng.integers(4, 12))
        if y:
            x[i, 0, 8:8 + side, 8:8 + side] += 0.5
    return x.astype(np.float16)


def write_prepared(root: Path, n: dict[str, int] | None = None, seed: int = 0) -> Path:
    """data/prepared as preprocess writes it: {split}.npy float16, {split}.csv, stats.json."""
    n = n or {"train": 8, "val": 24, "test": 24}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in n.items():
        labels = np.arange(count) % 2
        np.save(root / f"{split}.npy", _images(rng, labels))
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "label", "group", "modality", "photometric", "colour", "sex", "age", "label_index"])
            for i, y in enumerate(labels):
                w.writerow([f"{split}{i:04d}", CLASSES[y], f"p-{split}{i // 2}", "CT", "MONOCHROME2", "gray",
                            "F" if i % 3 else "M", str(20 + 7 * i), int(y)])
    write_stats(root, preprocessing_record(SIZE, classes=CLASSES), n)
    return root


def write_model(path: Path, arch: str = "resnet18", seed: int = 0, channels: int = 1) -> Path:
    """A checkpoint in the fine-tune stage's format around an untrained backbone."""
    torch.manual_seed(seed)
    backbone = build_backbone(arch, channels, "none")
    model = Classifier(backbone, len(CLASSES), [0.3] * channels, [0.2] * channels)
    save_model(model_file(model, preprocessing_record(SIZE, channels, classes=CLASSES)), path)
    return path


def params(**extra) -> EvaluateParams:
    base = {"device": "cpu", "precision": "fp32", "bootstrap": {"n_resamples": 50}, "min_subgroup_size": 5,
            "saliency": {"per_case": 1, "image_size": 64}}
    return build(EvaluateParams, {**base, **extra}, "evaluate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return write_model(root / "model.pt"), write_prepared(root / "prepared"), root


def relabel(prepared: Path, split: str, fn) -> None:
    path = prepared / f"{split}.csv"
    rows = list(csv.DictReader(open(path, newline="")))
    for i, r in enumerate(rows):
        r["label_index"] = str(fn(i, int(r["label_index"])))
        r["label"] = CLASSES[int(r["label_index"])]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _copy_prepared(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_threshold_and_temperature_are_fitted_on_val_and_never_see_test_labels(setup, tmp_path):
    model, prepared, _ = setup
    p = params(temperature_scaling=True, saliency={"enabled": False})
    base = run_evaluate(p, model, prepared, tmp_path / "a")
    op_a = json.loads((tmp_path / "a/operating_point.json").read_text())

    flipped = _copy_prepared(prepared, tmp_path / "flipped_test")
    relabel(flipped, "test", lambda i, y: 1 - y)
    other = run_evaluate(p, model, flipped, tmp_path / "b")
    op_b = json.loads((tmp_path / "b/operating_point.json").read_text())
    # The test labels were read (the numbers moved), yet nothing fitted moved with them.
    assert other["roc_auc"] == pytest.approx(1 - base["roc_auc"])
    assert op_b["threshold"] == op_a["threshold"] == base["threshold"] == other["threshold"]
    assert op_b["temperature"] == op_a["temperature"] == base["temperature"] != 1.0

    # Changing validation labels does move them: the check above could fail.
    val_changed = _copy_prepared(prepared, tmp_path / "changed_val")
    relabel(val_changed, "val", lambda i, y: 1 - y if i % 4 == 0 else y)
    moved = run_evaluate(p, model, val_changed, tmp_path / "c")
    assert (moved["threshold"], moved["temperature"]) != (base["threshold"], base["temperature"])


def test_metrics_json_is_flat_for_dvc_exp_show_and_details_hold_the_rest(setup, tmp_path):
    model, prepared, _ = setup
    m = run_evaluate(params(threshold={"rule": "sensitivity", "target": 0.9}), model, prepared, tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == m
    assert all(not isinstance(v, (dict, list)) for v in m.values())
    for name in ("roc_auc", "pr_auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy",
                 "f1", "kappa", "brier", "ece"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], name
    assert m["n"] == 24 and m["n_groups"] == 12 and m["threshold_rule"] == "sensitivity"

    d = json.loads((tmp_path / "evaluation.json").read_text())
    assert d["operating_point"]["fitted_on"] == "validation" and d["operating_point"]["val_sensitivity"] >= 0.9
    assert d["bootstrap"] == {**d["bootstrap"], "unit": "group", "n_units": 12, "n_resamples": 50}
    assert set(d["subgroups"]) == {"sex", "age_band"}  # no manufacturer, view_position or site in this data
    assert set(d["subgroups_skipped"]) == {"manufacturer", "view_position", "site"}
    assert {"18-39", "40-64", "65+"} <= set(d["subgroups"]["age_band"])
    small = [f"{c}={v}" for c, t in d["subgroups"].items() for v, e in t.items() if e["too_small"]]
    assert small and sorted(small) == sorted(d["subgroups_too_small"]) and m["subgroups_too_small"] == len(small)
    assert sum(map(sum, d["confusion_matrix"])) == 24

    preds = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(preds) == 24
    assert all((r["above_threshold"] == "true") == (float(r["prob_lesion"]) >= m["threshold"]) for r in preds)
    assert all(r["predicted"] == ("lesion" if r["above_threshold"] == "true" else "normal") for r in preds)
    for name in ("roc.json", "pr.json", "confusion.json", "reliability.json"):
        assert json.loads((tmp_path / "plots" / name).read_text()), name
    assert d["saliency"]["maps"] == len(list((tmp_path / "saliency").glob("*.png"))) >= 2


def test_params_are_validated_before_any_work():
    with pytest.raises(ParamsError, match="evaluate.threshold.target"):
        params(threshold={"rule": "specificity"})
    with pytest.raises(ParamsError, match="evaluate.threshold.target"):
        params(threshold={"rule": "youden", "target": 0.8})
    with pytest.raises(ParamsError, match="unknown key"):
        params(bootstrap={"n_resamples": 50, "resamples": 3})
    with pytest.raises(ParamsError, match="evaluate.bootstrap.n_resamples"):
        params(bootstrap={"n_resamples": 0})


def test_age_bands_and_subgroup_columns():
    assert [age_band(v) for v in ("3", "18", "39.5", "64", "90", "", "unknown")] == \
        ["<18", "18-39", "18-39", "40-64", "65+", "", ""]
    rows = [{"sex": "F", "age": "70", "site": ""}, {"sex": "M", "age": "", "site": ""}]
    cols, skipped = subgroup_columns(rows, ["sex", "age_band", "site", "manufacturer"])
    assert cols == {"sex": ["F", "M"], "age_band": ["65+", ""]} and skipped == ["site", "manufacturer"]


def test_grad_cam_localises_on_resnet_and_refuses_a_transformer():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 1, "none")
    model = Classifier(backbone, 2, [0.0], [1.0]).eval()
    with torch.no_grad():  # class 1 = the sum of the features: its map is the summed last feature maps
        model.head[-1].weight[1] = 1.0
    x = torch.rand(3, 1, 96, 96)
    x[:, :, 10:40, 50:80] += 2.0
    cams = grad_cam(model, x, [1, 1, 1])
    layer4 = {}
    model.backbone.model.layer4.register_forward_hook(lambda m, i, o: layer4.setdefault("a", o.detach()))
    model(x)
    expected = torch.nn.functional.interpolate(layer4["a"].sum(1, keepdim=True), size=(96, 96), mode="bilinear")[:, 0]
    expected = (expected / expected.amax(dim=(1, 2), keepdim=True)).numpy()
    assert cams.shape == (3, 96, 96) and cams.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cams, expected, atol=1e-5)
    assert (cams.reshape(3, -1).std(axis=1) > 0.05).all()  # a map, not a constant
    assert target_layer(model) is model.backbone.model.layer4

    with torch.device("meta"):  # only its structure matters here
        vit = Classifier(build_backbone("vit_b_16", 1, "none"), 2, [0.0], [1.0])
    with pytest.raises(NoTargetLayer, match="vit_b_16"):
        target_layer(vit)


def test_pick_cases_takes_the_surest_of_each_kind():
    labels = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.7, 0.1, 0.6, 0.4])
    cases = pick_cases(labels, np.stack([1 - p, p], 1), 0.5, 1)
    assert cases == {"TP": [0], "FP": [2], "TN": [3], "FN": [1]}


def test_prepared_arrays_unlike_their_record_or_the_model_are_refused(setup, tmp_path):
    from medtl.errors import MedtlError
    from medtl.prepare.prepared import load_split

    model, prepared, _ = setup
    # arrays of another size than stats.json records (the run cache restoring old outputs looked like this)
    wrong = _copy_prepared(prepared, tmp_path / "wrong_size")
    np.save(wrong / "test.npy", np.zeros((24, 1, SIZE * 2, SIZE * 2), np.float16))
    with pytest.raises(MedtlError, match=rf"test\.npy.*\(1, {SIZE * 2}, {SIZE * 2}\).*image_size {SIZE}"):
        load_split(wrong, "test")
    # a record the model was not trained with
    other = tmp_path / "other"
    write_prepared(other)
    from medtl.intake.readers.base import ReadOptions
    from medtl.prepare.imaging import read_record
    from medtl.prepare.prepared import load_stats, write_stats

    stats = load_stats(other)
    write_stats(other, preprocessing_record(SIZE, classes=CLASSES, read=read_record(ReadOptions(window="lung"))),
                stats.counts)
    with pytest.raises(MedtlError, match="read differ"):
        run_evaluate(params(saliency={"enabled": False}), model, other, tmp_path / "out")
    # an older stats.json names the file and both versions
    (other / "stats.json").write_text(json.dumps({"classes": CLASSES, "size": SIZE, "channels": 1}))
    with pytest.raises(MedtlError, match=r"stats\.json has format None, this medtl reads 'medtl-prepared/2'"):
        load_split(other, "val")
    assert not (tmp_path / "out").exists()


def test_site_summary_flattens_sites_and_names_the_worst():
    from medtl.evaluate.metrics_report import site_summary

    entry = lambda auc, n: {"n": n, "n_groups": n // 2, "roc_auc": auc, "roc_auc_ci_low": None if auc is None else auc - 0.1,
                            "roc_auc_ci_high": None if auc is None else min(auc + 0.1, 1.0), "too_small": auc is None}
    report = {"roc_auc": 0.8, "subgroups": {"sex": {"F": entry(0.7, 10)},
                                            "site": {"a": entry(0.9, 40), "b": entry(0.65, 30), "c": entry(None, 4)}}}
    flat, detail = site_summary(report)
    assert flat["site.b.roc_auc"] == 0.65 and flat["site.a.roc_auc_ci_low"] == pytest.approx(0.8)
    assert flat["site.c.too_small"] is True and flat["site.c.n"] == 4
    assert flat["worst_site"] == "b" and flat["worst_site_roc_auc"] == 0.65  # a site without an AUC is not the worst
    assert detail["pooled_roc_auc"] == 0.8 and set(detail["sites"]) == {"a", "b", "c"}
    assert not any(k.startswith("site.F") for k in flat)
    assert site_summary({"roc_auc": 0.8, "subgroups": {"sex": {"F": entry(0.7, 10)}}}) == ({}, None)


def test_saliency_caption_stays_inside_the_picture():
    import cv2

    from medtl.evaluate.saliency import CAPTION_FONT, caption_lines, overlay

    caption = "FN  p(lesion)=0.123  t=0.456  map: normal"
    for size in (64, 96, 160, 512):
        scale, lines = caption_lines(caption, size)
        # every part of the caption is drawn, in order, and no line is wider than the picture
        assert "".join(lines).replace(" ", "") == caption.replace(" ", "")
        assert all(cv2.getTextSize(line, CAPTION_FONT, scale, 1)[0][0] <= size - 8 for line in lines)
        picture = overlay(np.full((1, 32, 32), 0.5, dtype=np.float32), np.zeros((4, 4)), caption, size)
        band = picture[size:]
        assert band.shape[0] >= 20 and band[:, -3:].max() == 0 and band.max() > 0  # text drawn, right edge untouched
    assert len(caption_lines(caption, 512)[1]) == 1 and len(caption_lines(caption, 64)[1]) > 1
