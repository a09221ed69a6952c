"""`medtl export` on the tiny pipeline's real model: the export, run by its own runtime, matches PyTorch."""
from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from medtl.cli import main
from medtl.model.classifier import load_classifier

TOL = 1e-4


@pytest.fixture
def run(tiny_run, monkeypatch):
    """The tiny run as the current folder; exports go to tmp_path, so the run is only read."""
    monkeypatch.chdir(tiny_run.path)
    return tiny_run


def reference(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    model, ckpt = load_classifier("models/model.pt")
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, probs / probs.sum(axis=1, keepdims=True), ckpt


def prepared(split: str = "test") -> np.ndarray:
    return np.load(f"data/prepared/{split}.npy").astype(np.float32)


def test_onnx_export_matches_pytorch_and_carries_metadata(run, tmp_path):
    out = tmp_path / "model.onnx"
    assert main(["export", "models/model.pt", "--format", "onnx", "--out", str(out)]) == 0
    images = np.concatenate([prepared("test"), prepared("val")])
    ref_logits, ref_probs, ckpt = reference(images)

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    logits, probs = sess.run(["logits", "probabilities"], {"image": images})
    assert logits.shape == (len(images), len(ckpt["classes"]))
    assert np.abs(logits - ref_logits).max() < TOL and np.abs(probs - ref_probs).max() < TOL
    one, _ = sess.run(["logits", "probabilities"], {"image": images[:1]})  # the batch axis is dynamic
    assert np.abs(one - ref_logits[:1]).max() < TOL

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["medtl.classes"]) == list(ckpt["classes"])
    assert json.loads(meta["medtl.preprocessing"]) == json.loads(json.dumps(ckpt["preprocessing"]))
    assert json.loads(meta["medtl.operating_point"]) == json.loads((run.path / "reports/operating_point.json").read_text())
    assert meta["medtl.source_model_sha256"] == __import__("hashlib").sha256((run.path / "models/model.pt").read_bytes()).hexdigest()


def test_torchscript_export_matches_pytorch_and_carries_metadata(run, tmp_path):
    out = tmp_path / "model.torchscript.pt"
    assert main(["export", "--format", "torchscript", "--out", str(out)]) == 0
    images = prepared("test")
    ref_logits, ref_probs, ckpt = reference(images)
    extra = {"medtl.json": ""}
    module = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    with torch.no_grad():
        logits, probs = module(torch.from_numpy(images))
    assert np.abs(logits.numpy() - ref_logits).max() < TOL and np.abs(probs.numpy() - ref_probs).max() < TOL
    meta = json.loads(extra["medtl.json"])
    assert json.loads(meta["medtl.classes"]) == list(ckpt["classes"])
    assert json.loads(meta["medtl.preprocessing"]) == json.loads(json.dumps(ckpt["preprocessing"]))
    assert json.loads(meta["medtl.operating_point"])["threshold"] == json.loads((run.path / "reports/operating_point.json").read_text())["threshold"]


def test_operating_point_of_another_model_and_bad_format_are_refused(run, tmp_path, capsys):
    op = json.loads((run.path / "reports/operating_point.json").read_text())
    other = tmp_path / "op.json"
    other.write_text(json.dumps({**op, "model_sha256": "0" * 64}))
    assert main(["export", "--out", str(tmp_path / "a.onnx"), "--operating-point", str(other)]) == 2
    assert "fitted for a different model" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()
    with pytest.raises(SystemExit):
        main(["export", "--format", "tflite"])


def test_out_dash_writes_the_export_to_stdout(run, capsysbinary):
    assert main(["export", "--out", "-", "--check", "none"]) == 0
    data = capsysbinary.readouterr().out
    proto = onnx.load_from_string(data)
    assert any(p.key == "medtl.classes" for p in proto.metadata_props)
    assert not (run.path / "-").exists()
    assert io.BytesIO(data).getbuffer().nbytes > 10_000


def test_model_is_a_dvc_registry_artifact(tiny_run):
    from dvc.repo import Repo

    with Repo(str(tiny_run.path)) as repo:
        artifacts = repo.artifacts.read()["dvc.yaml"]
    model = next(a for a in artifacts.values() if a.path == "models/model.pt")
    assert model.type == "model" and model.desc and model.labels


def test_input_shape_follows_either_spelling_of_the_image_size():
    from medtl.deploy.export import _input_shape
    from medtl.errors import MedtlError

    assert _input_shape({"preprocessing": {"channels": 3, "image_size": 224, "resize": "pad"}}) == (3, 224)
    assert _input_shape({"preprocessing": {"channels": 1, "size": 64}}) == (1, 64)
    with pytest.raises(MedtlError, match="lacks channels or image size"):
        _input_shape({"preprocessing": {"resize": "pad"}})


def test_export_reports_both_differences_and_carries_a_model_card_and_a_reference_pair(tiny_run, tmp_path, capsys, monkeypatch):
    import hashlib

    from tests.project import copy_project

    p = copy_project(tiny_run, tmp_path / "audited")
    monkeypatch.chdir(p.path)
    assert main(["audit"]) == 0
    capsys.readouterr()
    out = tmp_path / "deploy/model.onnx"
    assert main(["export", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    evaluated = json.loads((p.path / "reports/metrics.json.provenance.json").read_text())["hardware"]
    # both numbers: to fp32 PyTorch, and to the audited predictions at the precision evaluate used
    assert "to PyTorch fp32: " in said and f"to the audited reports/predictions.csv (evaluated at {evaluated['precision']}" in said

    meta = {m.key: m.value for m in onnx.load(str(out)).metadata_props}
    card = json.loads(meta["medtl.model_card"])
    assert meta["medtl.precision"] == "fp32"
    assert card["classes"] == ["normal", "lesion"] and card["intended_use"].startswith("Research and engineering")
    assert card["operating_point"]["threshold"] == json.loads((p.path / "reports/operating_point.json").read_text())["threshold"]
    auc = card["test_metrics"]["roc_auc"]
    assert auc["value"] == json.loads((p.path / "reports/metrics.json").read_text())["roc_auc"] and len(auc["ci"]) == 2
    assert card["evaluated_at"]["precision"] == evaluated["precision"]
    assert set(card["training_data"]["per_split_class"]) == {"train", "val", "test"}
    assert card["training_data"]["patients_per_split"]["train"] > 0
    assert card["audit_provenance"]["sha256"] == hashlib.sha256((p.path / "reports/audit/provenance.json").read_bytes()).hexdigest()
    assert card["weights_origin"]["name"] == "none" and "trained by this pipeline" in card["weights_origin"]["licence"]

    # the reference pair: a deployer's runtime gives these probabilities for these inputs
    ref = np.load(tmp_path / "deploy/model.onnx.reference.npz")
    assert ref["image"].shape[0] == 4 and ref["image"].dtype == np.float32
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probabilities"], {"image": ref["image"]})
    assert np.abs(probs - ref["probabilities"]).max() < 1e-6
    # ... and how far they lie from the audited ones
    assert ref["audited_probabilities"].shape == probs.shape and np.abs(probs - ref["audited_probabilities"]).max() < 0.05


def test_a_bf16_torchscript_export_reproduces_the_audited_bf16_predictions(run, tmp_path, capsys):
    out = tmp_path / "model.torchscript.pt"
    assert main(["export", "--format", "torchscript", "--precision", "bf16", "--out", str(out)]) == 0
    extra = {"medtl.json": ""}
    module = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["medtl.json"])["medtl.precision"] == "bf16"
    ref = np.load(tmp_path / "model.torchscript.pt.reference.npz")
    with torch.no_grad():
        _, probs = module(torch.from_numpy(ref["image"]))
    assert np.abs(probs.numpy() - ref["probabilities"]).max() < 1e-6
    evaluated = json.loads((run.path / "reports/metrics.json.provenance.json").read_text())["hardware"]
    if evaluated["precision"] == "bf16" and evaluated["device"] == "cpu":
        # the same kernels evaluate ran: equal to the csv's 6 decimals
        assert np.abs(probs.numpy() - ref["audited_probabilities"]).max() < 1e-5


def test_bf16_is_refused_for_onnx(run, tmp_path, capsys):
    assert main(["export", "--precision", "bf16", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not available for onnx" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
