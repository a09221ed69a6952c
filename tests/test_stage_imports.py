"""Stages that do not train never import torch, and still record the training stack they ran beside."""
import json
import sys

from tests.project import Project


def _imported_modules(importtime_stderr: str) -> set[str]:
    # -X importtime lines: "import time: self | cumulative | package.module"
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_ingest_and_preprocess_never_import_torch(project: Project):
    for stage in ("ingest", "preprocess"):
        res = project.run(sys.executable, "-X", "importtime", f"stages/{stage}.py")
        modules = _imported_modules(res.stderr)
        assert "numpy" in modules, "importtime output was not parsed"
        assert not {m for m in modules if m.split(".")[0] in ("torch", "torchvision")}, stage
    for record in ("data/ingested.provenance.json", "data/prepared.provenance.json"):
        env = json.loads((project.path / record).read_text())["environment"]
        assert env["packages"]["torch"] and env["packages"]["torchvision"], record
        assert env["accelerator"]["source"] == "package metadata", record
        assert "cuda_build" in env["accelerator"], record
