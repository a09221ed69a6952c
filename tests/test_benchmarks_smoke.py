"""The benchmark suite runs end to end at its smallest sizes and writes a well-formed report (speed is not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_report(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--work", str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["format"] == "medtl-bench/1" and report["quick"] is True
    assert {"cpu", "cores", "torch_threads", "amx_bf16", "avx512_bf16", "load_average"} <= set(report["machine"])
    expected = {"model_speed", "threads", "linear_probe", "train_path", "precision", "ingest_scale", "dvc_overhead",
                "predict"}
    assert set(report["benchmarks"]) == expected
    for name, b in report["benchmarks"].items():
        assert b["rows"] or b["checks"], name
        assert len(b["params"]["load_average_1min"]) == 2, name  # every number comes with the machine's load
        for row in b["rows"]:
            assert set(row) == {"measure", "value", "unit"} and row["value"] is not None, (name, row)
        for c in b["checks"]:
            assert set(c) == {"check", "value", "target", "ok"} and isinstance(c["ok"], bool), (name, c)
    checks = {c["check"] for b in report["benchmarks"].values() for c in b["checks"]}
    assert {"loop / in-memory", "predict / raw", "dvc status", "no-op dvc repro", "|test AUC bf16 - fp32|",
            "train: stage default / fastest"} <= checks
    rows = {r["measure"]: r for r in report["benchmarks"]["model_speed"]["rows"]}
    assert "limit bf16 / fp32" in rows and "% of fp32 limit" in rows["resnet18 32px train fp32"]["unit"]
    # the machine facts come first, before any benchmark's output
    assert res.stdout.startswith("medtl benchmarks on ") and "CPU flags" in res.stdout.splitlines()[0]
    # the printed table names every benchmark and ends with the tally
    assert "checks met" in res.stdout and "Linear probe" in res.stdout
