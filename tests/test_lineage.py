"""A previous medtl model as the starting point: its backbone and head start the new model, lineage recorded."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from medtl.errors import MedtlError, ParamsError
from medtl.io import load_torch, save_torch, sha256_file
from medtl.model.backbone_file import load_backbone
from medtl.model.classifier import Classifier, load_classifier
from medtl.model.lineage import initial_head, preprocessing_mismatch
from medtl.model.start import build_backbone
from medtl.prepare.prepared import load_split, load_stats
from tests.project import copy_project


@pytest.fixture(scope="module")
def from_model(tiny_run, tmp_path_factory):
    """A copy of the tiny run whose pretrain-adapt starts from the tiny run's own model file."""
    p = copy_project(tiny_run, tmp_path_factory.mktemp("lineage") / "project")
    source = p.path / "models/source.pt"
    shutil.copy2(p.path / "models/model.pt", source)
    shutil.copy2(p.path / "models/model.pt.provenance.json", p.path / "models/source.pt.provenance.json")
    p.update_params({"pretrain": {"weights": "models/source.pt", "sha256": sha256_file(source)}})
    p.dvc("repro", "pretrain-adapt")
    return p


def test_fine_tuning_starts_from_the_source_models_predictions(from_model):
    p = from_model
    source, _ = load_classifier(p.path / "models/source.pt")
    stats = load_stats(p.path / "data/prepared")
    backbone, ckpt = load_backbone(p.path / "models/backbone.pt")
    # What fine-tune builds before its first step.
    model = Classifier(backbone, len(stats.preprocessing.classes), stats.preprocessing.mean, stats.preprocessing.std)
    assert initial_head(model.head, ckpt["source_head"], stats.preprocessing.classes) == "source model"
    x = torch.from_numpy(np.asarray(load_split(p.path / "data/prepared", "test", stats).images, dtype=np.float32))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))


def test_lineage_is_in_the_backbone_record_and_carries_into_the_new_model(from_model):
    p = from_model
    sha = p.params["pretrain"]["sha256"]
    w = load_torch(p.path / "models/backbone.pt")["weights"]
    src = w["source_model"]
    assert (w["name"], w["sha256"], src["sha256"], src["arch"]) == ("medtl-model", sha, sha, "resnet18")
    assert src["classes"] == ["normal", "lesion"] and src["preprocessing"]["image_size"] == 32
    assert src["provenance"] == {"file": "source.pt.provenance.json",
                                 "sha256": sha256_file(p.path / "models/source.pt.provenance.json")}
    assert src["preprocessing_mismatch"] == [] and src["weights"]["name"] == "none"  # model A began from scratch
    p.dvc("repro", "fine-tune")
    model_b = load_torch(p.path / "models/model.pt")
    assert model_b["head_init"] == "source model"
    assert model_b["backbone"]["weights"]["source_model"]["sha256"] == sha  # B's file names A

    # The audit shows the lineage to a reviewer.
    p.dvc("repro")
    p.commit("from the source model")
    p.run(sys.executable, "-m", "medtl.cli", "audit")
    md = (p.path / "reports/audit/report.md").read_text()
    assert "## Transfer" in md and sha in md and "source.pt.provenance.json" in md
    page = (p.path / "reports/audit/report.html").read_text()
    assert 'id="transfer"' in page and sha in page
    evidence = json.loads((p.path / "reports/audit/provenance.json").read_text())
    assert sha in json.dumps(evidence)


def test_other_classes_get_a_new_head_and_preprocessing_mismatch_names_both_values():
    head = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(4, 3))
    before = head[1].weight.clone()
    src = {"classes": ["a", "b"], "state_dict": {"1.weight": torch.zeros(2, 4), "1.bias": torch.zeros(2)}}
    assert initial_head(head, src, ["a", "b", "c"]).startswith("new") and torch.equal(head[1].weight, before)
    a = {"image_size": 64, "channels": 1, "resize": "pad", "read": {"window": "lung"}}
    b = {"image_size": 32, "channels": 3, "resize": "pad", "read": {"window": None}}
    assert preprocessing_mismatch(a, b) == [{"key": "image_size", "source": 64, "this_project": 32},
                                            {"key": "channels", "source": 1, "this_project": 3},
                                            {"key": "window", "source": "lung", "this_project": None}]


def test_gray_source_model_starts_an_rgb_backbone_with_the_same_response(tiny_run):
    path = tiny_run.path / "models/model.pt"
    gray = build_backbone("resnet18", 1, str(path), sha256_file(path)).eval()
    rgb = build_backbone("resnet18", 3, str(path), sha256_file(path)).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_bad_source_model_files_are_refused_before_any_output(tiny_run, tmp_path):
    path = tiny_run.path / "models/model.pt"
    with pytest.raises(ParamsError, match="is a resnet18 model but pretrain.arch is resnet34"):
        build_backbone("resnet34", 1, str(path), sha256_file(path))
    with pytest.raises(ParamsError, match="pretrain.sha256 pins"):
        build_backbone("resnet18", 1, str(path), "0" * 64)
    foreign = tmp_path / "lightning.ckpt"
    save_torch({"epoch": 3, "state_dict": {"conv1.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(MedtlError, match="nor a medtl model file"):
        build_backbone("resnet18", 1, str(foreign), sha256_file(foreign))
    old = tmp_path / "old.pt"
    save_torch({**load_torch(path), "format": "medtl-model/1"}, old)
    with pytest.raises(ParamsError, match="medtl-model/1"):
        build_backbone("resnet18", 1, str(old), sha256_file(old))
