"""Failure cases: the surest false positives and negatives, named by id and ref, with their Grad-CAM overlays."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medtl.errors import ParamsError
from medtl.evaluate.evaluation import EvaluateParams, run_evaluate
from medtl.ingest.manifest import ManifestRow, write_manifest
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


def test_the_surest_mistakes_are_listed_by_id_and_ref_with_overlays(tmp_path):
    model, prepared = write_model(tmp_path / "model.pt"), write_prepared(tmp_path / "prepared")
    test_rows = list(csv.DictReader(open(prepared / "test.csv", newline="")))
    write_manifest([ManifestRow(image_id=r["image_id"], source_ref=f"f-{i:016x}", sha256="0" * 64, label=r["label"],
                                group=r["group"], split="test", height=32, width=32, channels=1, offset=0)
                    for i, r in enumerate(test_rows)], tmp_path / "manifest.csv")
    out = tmp_path / "reports"
    run_evaluate(params(failures={"count": 3, "image_size": 64}), model, prepared, out, manifest=tmp_path / "manifest.csv")

    record = json.loads((out / "failures/failures.json").read_text())
    threshold = record["threshold"]
    predictions = {r["image_id"]: r for r in csv.DictReader(open(out / "predictions.csv", newline=""))}
    fp = [c for c in record["cases"] if c["case"] == "FP"]
    fn = [c for c in record["cases"] if c["case"] == "FN"]
    assert record["errors"]["FP"] >= 1 and record["errors"]["FN"] >= 1
    assert len(fp) == min(3, record["errors"]["FP"]) and len(fn) == min(3, record["errors"]["FN"])
    # surest first: false positives by falling probability, false negatives by rising
    assert [c["probability"] for c in fp] == sorted((c["probability"] for c in fp), reverse=True)
    assert [c["probability"] for c in fn] == sorted(c["probability"] for c in fn)
    all_fp = [float(r["prob_lesion"]) for r in predictions.values() if r["label"] == "normal" and r["predicted"] == "lesion"]
    assert fp[0]["probability"] == pytest.approx(max(all_fp), abs=1e-6)
    refs = {r["image_id"]: f"f-{i:016x}" for i, r in enumerate(test_rows)}
    for c in fp + fn:
        assert c["source_ref"] == refs[c["image_id"]] and c["patient"] == predictions[c["image_id"]]["group"]
        assert (c["probability"] >= threshold) == (c["case"] == "FP")
        assert (out / "failures" / c["overlay"]).is_file() and c["image_id"] in c["overlay"]
    assert str(tmp_path) not in (out / "failures/failures.json").read_text()

    # count 0 lists nothing
    run_evaluate(params(failures={"count": 0}), model, prepared, tmp_path / "none")
    assert json.loads((tmp_path / "none/failures/failures.json").read_text())["cases"] == []
    with pytest.raises(ParamsError, match="evaluate.failures.count"):
        build(EvaluateParams, {"failures": {"count": -1}}, "evaluate")
