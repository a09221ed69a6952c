"""`medtl export --int8` on the tiny run: calibrated on validation only, refused (exit 1, nothing written)
when its test AUC moves beyond the tolerance, written with its measurement otherwise."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort

from medtl.cli import main
from medtl.deploy.int8 import export_int8


def test_int8_refused_beyond_the_tolerance_writes_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_run.path)
    out = tmp_path / "model.int8.onnx"
    # a tolerance below any change the bootstrap can see: only an exactly equal AUC passes
    code = main(["export", "--int8", "--int8-tolerance", "0", "--out", str(out)])
    err = capsys.readouterr().err
    if code == 1:
        assert "refused, nothing written" in err and not out.exists()
    else:  # INT8 left the test AUC exactly unchanged on this model: accepted, and says so
        assert code == 0 and json.loads(dict((p.key, p.value) for p in onnx.load(str(out)).metadata_props)
                                        ["medtl.deploy.int8"])["auc_change"] == 0


def test_int8_accepted_carries_its_measurement_and_runs_in_onnxruntime(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_run.path)
    out = tmp_path / "model.int8.onnx"
    assert main(["export", "--int8", "--int8-tolerance", "0.99", "--out", str(out)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    record = json.loads(meta["medtl.deploy.int8"])
    n_val, n_test = (len(np.load(f"data/prepared/{s}.npy", mmap_mode="r")) for s in ("val", "test"))
    assert record["calibration"] == {"split": "val", "images": min(n_val, 256)}
    assert record["measured_on"] == {"split": "test", "images": n_test}
    assert record["auc_change_ci_low"] <= record["auc_change"] <= record["auc_change_ci_high"]
    assert json.loads(meta["medtl.classes"]) == ["normal", "lesion"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs = sess.run(["probabilities"], {"image": np.load("data/prepared/test.npy").astype(np.float32)})[0]
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)


def test_int8_model_depends_on_the_validation_split_only(tiny_run, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_run.path / "data/prepared", prepared)
    model = tiny_run.path / "models/model.pt"
    first, _ = export_int8(model, prepared, tiny_run.path / "reports/operating_point.json", 0.99)
    test = np.load(prepared / "test.npy")
    np.save(prepared / "test.npy", (1 - test).astype(test.dtype))  # other test pixels: the model must not change
    second, _ = export_int8(model, prepared, tiny_run.path / "reports/operating_point.json", 0.99)
    graph = lambda data: onnx.load_from_string(data).graph.SerializeToString()  # noqa: E731
    assert graph(first) == graph(second)
