"""External validation through the real evaluate stage: a shifted site is flagged, thresholds come from validation."""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
from PIL import Image

from medtl.errors import ParamsError
from medtl.evaluate.evaluation import EvaluateParams
from medtl.evaluate.external import ExternalSet, distribution_distance, intensity_histogram, load_external, set_columns
from medtl.intake import demo
from medtl.intake.readers import read
from medtl.params import build
from medtl.prepare.imaging import model_input
from tests.project import copy_project, preprocessing_record


def write_shifted_site(root, seed: int) -> None:
    """Demo patients exported as 8-bit PNG by a 'scanner' that renders everything brighter and flatter."""
    for p in demo.fake_patients(16, 0.5, seed):
        label = demo.CLASSES[int(p.diseased)]
        for path in demo.write_patient_images(p, 2, (48, 64), seed, root / label):
            shifted = np.clip(read(path)[0].pixels * 0.5 + 0.45, 0, 1)
            Image.fromarray(np.round(shifted * 255).astype(np.uint8)).save(path.with_suffix(".png"))
            path.unlink()


def test_intensity_distance_measures_a_shift():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.0, 0.6, size=(20, 1, 8, 8))
    same = distribution_distance(intensity_histogram(a), intensity_histogram(rng.uniform(0.0, 0.6, size=(20, 1, 8, 8))))
    moved = distribution_distance(intensity_histogram(a), intensity_histogram(a + 0.3))
    assert same["intensity_wasserstein"] < 0.02 and abs(moved["intensity_wasserstein"] - 0.3) < 0.02
    assert moved["intensity_ks"] > 0.4


def test_external_files_are_decoded_by_the_models_record(tmp_path):
    """The record's read options (here: which page of a multi-page TIFF), side and resize, not today's ingest.read."""
    root = tmp_path / "site"
    for label, level in (("normal", 40), ("lesion", 200)):
        (root / label).mkdir(parents=True)
        pages = [Image.fromarray(np.full((20, 30), v, dtype=np.uint8)) for v in (level, 255 - level, 128)]
        pages[0].save(root / label / f"person{level}_a.tif", save_all=True, append_images=pages[1:])
    spec = build(ExternalSet, {"name": "site", "source": "folder",
                               "folder": {"root": str(root), "group_rule": r"person(?P<group>\d+)_"}}, "x")
    for frame in ("first", "middle"):
        pre = preprocessing_record(16, read={"window": None, "frame": frame, "axis": 2, "slice": "middle"})
        data = load_external(spec, "evaluate.external[0]", ["normal", "lesion"], pre)
        assert data.images.shape == (2, 1, 16, 16) and data.labels.tolist() == [1, 0]  # lesion/ sorts first
        for image, label in zip(data.images, ("lesion", "normal")):
            path = next((root / label).iterdir())
            expected = model_input(read(path, pre.read_options())[0].pixels, pre)
            assert np.array_equal(image, expected)
        centre = float(data.images[1, 0, 8, 8])  # the normal image's page: 40 first, 215 in the middle
        assert abs(centre - (40 if frame == "first" else 215) / 255) < 0.01
        assert data.grouping == {"rule": 2} and len({r["group"] for r in data.rows}) == 2
        assert all(r["group"].startswith("p-") and "person" not in r["group"] for r in data.rows)


def test_external_images_are_traceable_by_ref_and_sha256_and_located_in_the_sets_folder(tmp_path, monkeypatch, capsys):
    import hashlib

    from medtl import cli
    from medtl.evaluate.predictions import external_header, write_table

    monkeypatch.setenv("MEDTL_PSEUDONYM_KEY", "external sets' own key, long")
    root = tmp_path / "nih"
    write_shifted_site(root, seed=3)
    spec = build(ExternalSet, {"name": "nih", "source": "folder", "folder": {"root": str(root)}}, "external")
    data = load_external(spec, "evaluate.external[0]", ["normal", "lesion"], preprocessing_record(24))
    rows = [[spec.name, r["image_id"], r["group"], "normal", "normal", "", "0.5", "0.5", r["source_ref"], r["sha256"],
             r["index"]] for r in data.rows]
    out = tmp_path / "external_predictions.csv"
    write_table(out, external_header(["normal", "lesion"]), rows)
    first = next(csv.DictReader(open(out, newline="")))
    assert first["source_ref"].startswith("f-") and len(first["sha256"]) == 64
    assert cli.main(["locate", "--folder", str(root), "--predictions", str(out), first["image_id"]]) == 0
    printed = capsys.readouterr().out.strip().split("\t")
    assert printed[:2] == [first["image_id"], first["source_ref"]]
    assert hashlib.sha256(open(printed[2], "rb").read()).hexdigest() == first["sha256"]


def test_external_sets_are_checked():
    with pytest.raises(ParamsError, match=r"evaluate\.external\[0\]\.folder"):
        build(EvaluateParams, {"external": [{"name": "b", "source": "folder", "folder": {"root": "elsewhere/b"}}],
                               "external_data": "data/external"}, "evaluate")
    with pytest.raises(ParamsError, match=r"evaluate\.external\[0\]\.name"):
        build(EvaluateParams, {"external": [{"name": "test", "source": "demo"}]}, "evaluate")
    with pytest.raises(ParamsError, match=r"evaluate\.external\[0\]\.folder\.root"):
        build(EvaluateParams, {"external": [{"name": "b", "source": "folder"}], "external_data": "."}, "evaluate")


@pytest.mark.e2e
def test_shifted_external_set_is_flagged_and_uses_the_validation_threshold(tiny_run, tmp_path):
    p = copy_project(tiny_run, tmp_path / "project")
    write_shifted_site(p.path / "external/site_b", seed=31)
    p.update_params({"evaluate": {"external_data": "external", "external": [
        {"name": "site_b", "source": "folder", "folder": {"root": "external/site_b", "layout": "classes"}},
        {"name": "same_scanner", "source": "demo",
         "demo": {"patients": 16, "seed": 99, "min_size": 48, "max_size": 64, "max_images_per_patient": 2}},
    ]}})
    res = p.dvc("repro")
    assert "Running stage 'evaluate'" in res.stdout and "Running stage 'fine-tune'" not in res.stdout, res.stdout
    print(res.stdout[-600:])

    m = json.loads((p.path / "reports/metrics.json").read_text())
    op = json.loads((p.path / "reports/operating_point.json").read_text())
    site, same = set_columns(m, "site_b"), set_columns(m, "same_scanner")
    print("\nsite_b", site, "\nsame_scanner", same)
    assert site["intensity_shift"] is True and site["intensity_wasserstein"] > 0.1
    assert same["intensity_shift"] is False and m["shift.intensity_shift"] is False
    assert site["n"] == 32 and site["roc_auc_ci_low"] <= site["roc_auc"] <= site["roc_auc_ci_high"]

    # The operating point is the one fitted on validation, not refitted on the external set.
    assert op["fitted_on"] == "validation" and site["threshold"] == op["threshold"] == m["threshold"]
    with open(p.path / "reports/external_predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["set"] == "site_b"]
    assert len(rows) == 32
    called = np.array([float(r["prob_lesion"]) >= op["threshold"] for r in rows])
    assert [r["above_threshold"] == "true" for r in rows] == called.tolist()
    lesion = np.array([r["label"] == "lesion" for r in rows])
    assert site["sensitivity"] == pytest.approx(called[lesion].mean())
    assert site["specificity"] == pytest.approx((~called[~lesion]).mean())
    assert site["prevalence"] == pytest.approx(lesion.mean()) and site["predicted_prevalence"] == pytest.approx(called.mean())
    moves = json.loads((p.path / "reports/evaluation.json").read_text())["external"]["site_b"]["shift"]["operating_point_moves"]
    assert site["operating_point_shift"] == any(v["outside"] for v in moves.values())

    header = p.dvc("exp", "show", "--csv", "--no-pager").stdout.splitlines()[0].split(",")
    assert {"external.site_b.roc_auc", "external.site_b.intensity_shift", "shift.intensity_wasserstein"} <= set(header)
    shown = json.loads(p.dvc("plots", "show", "--json").stdout)
    values = shown["data"]["Test and external sets (operating point fitted on validation)"][0]["content"]["data"]["values"]
    assert {"test: roc_auc", "site_b: roc_auc", "same_scanner: sensitivity"} <= {v["label"] for v in values}

    # The audit report puts the sets side by side with test, flags the shifted one, and its checklist says an
    # external set is evidence present.
    p.run(sys.executable, "-m", "medtl.cli", "audit", "--allow-dirty", "--out", "audit")
    md = (p.path / "audit/report.md").read_text()
    table = md[md.index("Test split and external sets"):].split("\n\n")[1]
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(lines) == {"test", "site_b", "same_scanner"}, table
    assert "intensity shift" in lines["site_b"] and "intensity shift" not in lines["same_scanner"]
    assert "external.site_b" not in md[:md.index("Test split and external sets")]  # not mixed into the test metrics
    item = next(line for line in md.splitlines() if "independent (external) data set" in line)
    assert "evidence present" in item and "site_b (32 images; shift flagged)" in item
    html = (p.path / "audit/report.html").read_text()
    assert "Test split and external sets" in html and "same_scanner" in html
