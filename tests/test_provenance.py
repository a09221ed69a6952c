"""Provenance end to end on a small fake project: real git, real dvc, real signatures."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medtl.cli import main
from medtl.intake.phi import pseudonymise
from medtl.io import write_json
from medtl.provenance import stage_record
from medtl.provenance.bom import validate_bom
from medtl.provenance.record import run_times

DVC = str(Path(sys.executable).with_name("dvc"))
FAKE_NAMES = ["Fakename^Patient0001^Demo", "Fakename^Patient0002^Demo", "FAKEMRN04200001", "FAKEMRN04200002"]
PARAMS = """\
ingest:
  source: folder
  seed: 42
preprocess:
  size: 8
pretrain:
  weights: imagenet-fake
finetune:
  lr: 0.001
  epochs: 2
evaluate:
  bootstrap: 100
model_card:
  intended_use: Research demonstration of lesion classification on synthetic CT slices.
"""
DVC_YAML = """\
stages:
  ingest:
    cmd: python stages/ingest.py
    deps: [data/raw, stages/ingest.py]
    params: [ingest]
    outs: [data/ingested]
  preprocess:
    cmd: python stages/preprocess.py
    deps: [data/ingested, stages/preprocess.py]
    params: [preprocess]
    outs: [data/prepared]
  pretrain-adapt:
    cmd: python stages/pretrain-adapt.py
    deps: [data/prepared, stages/pretrain-adapt.py]
    params: [pretrain]
    outs: [models/backbone.pt]
  fine-tune:
    cmd: python stages/fine-tune.py
    deps: [data/prepared, models/backbone.pt, stages/fine-tune.py]
    params: [finetune]
    outs: [models/model.pt]
  evaluate:
    cmd: python stages/evaluate.py
    deps: [data/prepared, models/model.pt, stages/evaluate.py]
    params: [evaluate]
    outs: [reports/predictions.csv, reports/plots]
    metrics: [reports/metrics.json]
"""


def run(cmd: list[str], cwd: Path) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _source_files(root: Path) -> list[dict]:
    rows = []
    for i, (name, mrn) in enumerate(zip(FAKE_NAMES[:2], FAKE_NAMES[2:])):
        for j in range(3):
            # folder and file names carry the identifiers too, as PACS exports often do
            rel = f"{name}_{mrn}/img{j}_{mrn}.dcm"
            p = root / "data/raw" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            # a fake header with identifiers, which must never reach the evidence
            p.write_bytes(f"DICM PatientName={name} PatientID={mrn} ".encode() + bytes([i, j]) * 64)
            rows.append({"image_id": f"im{i}{j}", "rel": rel, "source_ref": pseudonymise(rel), "label": ["normal", "lesion"][i], "group": f"g{i:04d}",
                         "split": ["train", "train", "test"][j] if i == 0 else ["train", "val", "test"][j]})
    return rows


def _build_outputs(root: Path) -> None:
    """What the five stages would write, each wrapped in its stage record."""
    from medtl.ingest.manifest import ManifestRow, write_manifest
    from medtl.io import sha256_file

    rows = _source_files(root)
    with stage_record("ingest", params={"source": "folder", "seed": 42}, inputs=["data/raw"], outputs=["data/ingested"]) as rec:
        out = root / "data/ingested"
        out.mkdir(parents=True)
        write_manifest([ManifestRow(image_id=r["image_id"], source_ref=r["source_ref"], sha256=sha256_file(root / "data/raw" / r["rel"]),
                                    label=r["label"], group=r["group"], split=r["split"], height=8, width=8, channels=1,
                                    offset=k * 64, modality="CT") for k, r in enumerate(rows)], out / "manifest.csv")
        np.arange(6 * 64, dtype=np.uint16).tofile(out / "pixels.u16")
        write_json(out / "report.json", {"images": 6, "quarantined": [], "duplicates": [], "counts": {"train": {"normal": 2, "lesion": 1}}})
        rec.seeds["split"] = 42
        rec.extra["source_root"] = "data/raw"
    with stage_record("preprocess", params={"size": 8}, inputs=["data/ingested"], outputs=["data/prepared"]):
        out = root / "data/prepared"
        out.mkdir(parents=True)
        for split, n in (("train", 3), ("val", 1), ("test", 2)):
            np.save(out / f"{split}.npy", np.full((n, 1, 8, 8), 0.5, dtype=np.float16))
            (out / f"{split}.csv").write_text("image_id,label,group\n" + "".join(f"x{i},0,g\n" for i in range(n)))
        write_json(out / "stats.json", {"classes": ["normal", "lesion"], "size": 8, "channels": 1, "mean": [0.5], "std": [0.1]})
    weights = {"name": "resnet18.imagenet-fake", "origin": "https://download.pytorch.org/models/resnet18-fake.pth", "sha256": "ab" * 32}
    with stage_record("pretrain-adapt", params={"weights": "imagenet-fake"}, inputs=["data/prepared"], outputs=["models/backbone.pt"]) as rec:
        (root / "models").mkdir()
        torch.save({"arch": "resnet18", "in_channels": 1, "num_features": 4, "state_dict": {"w": torch.zeros(4, 1)}, "weights": weights,
                    "adaptation": {"method": "adabn", "images": 3, "epochs": 1, "loss_curve": []}}, root / "models/backbone.pt")
        rec.extra["adaptation"] = {"method": "adabn"}
    with stage_record("fine-tune", params={"lr": 0.001}, inputs=["data/prepared", "models/backbone.pt"], outputs=["models/model.pt"]) as rec:
        torch.save({"arch": "resnet18", "in_channels": 1, "num_features": 4, "classes": ["normal", "lesion"],
                    "state_dict": {"w": torch.ones(4, 1), "head.weight": torch.ones(2, 4)}, "preprocessing": {"size": 8, "channels": 1, "mean": [0.5], "std": [0.1]},
                    "hardware": {"device": "cpu", "precision": "fp32"}, "strategy": "linear_probe"}, root / "models/model.pt")
        rec.seeds["torch"] = 7
        rec.hardware = {"device": torch.device("cpu"), "precision": "fp32"}
    with stage_record("evaluate", params={"bootstrap": 100}, inputs=["models/model.pt", "data/prepared"], outputs=["reports/metrics.json", "reports/predictions.csv", "reports/plots"]):
        (root / "reports/plots").mkdir(parents=True)
        write_json(root / "reports/metrics.json", {"n": 2, "accuracy": {"value": 0.5, "ci_low": 0.1, "ci_high": 0.9},
                                                   "roc_auc": 0.75, "roc_auc_ci": [0.5, 1.0], "confusion_matrix": [[1, 0], [1, 0]]})
        write_json(root / "reports/plots/roc.json", [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 0.5, "tpr": 0.9}, {"fpr": 1.0, "tpr": 1.0}])
        write_json(root / "reports/plots/confusion.json", [{"actual": "normal", "predicted": "normal"}, {"actual": "lesion", "predicted": "normal"}])
        (root / "reports/predictions.csv").write_text("image_id,label,prob\nx0,0,0.2\nx1,1,0.4\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "t@example.org"], root)
    run(["git", "config", "user.name", "Test"], root)
    run([DVC, "init", "-q"], root)
    (root / "params.yaml").write_text(PARAMS)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "uv.lock").write_text('version = 1\n\n[[package]]\nname = "numpy"\nversion = "2.1.0"\nsource = { registry = "https://pypi.org/simple" }\n'
                                  'sdist = { url = "https://x/numpy.tar.gz", hash = "sha256:' + "cd" * 32 + '" }\n')
    (root / "stages").mkdir()
    for s in ("ingest", "preprocess", "pretrain-adapt", "fine-tune", "evaluate"):
        (root / f"stages/{s}.py").write_text(f"# {s}\n")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        _build_outputs(root)
        run([DVC, "commit", "-f", "-q"], root)
        (root / ".gitignore").write_text("*.provenance.json\n*.provenance.json.log\n/reports/audit/\n")
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-q", "-m", "pipeline"], root)
        assert audit() == 0  # once here; tests that need another audit run their own
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def ws(project, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the project, with the audit already written, as the current folder."""
    root = tmp_path / "ws"
    shutil.copytree(project, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def audit(*args: str) -> int:
    return main(["audit", *args])


def verify_lines(capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(["verify", "reports/audit/provenance.json", *args])
    return rc, [line for line in capsys.readouterr().out.splitlines() if line.startswith("MISMATCH")]


def test_stage_records_hash_inputs_and_outputs(project):
    rec = json.loads((project / "data/prepared.provenance.json").read_text())
    assert rec["stage"] == "preprocess" and "started" not in rec  # the record is the same bytes run to run
    times = run_times(project / "data/prepared.provenance.json")  # wall-clock times: a local log beside it
    assert times["started"].endswith("Z") and times["ended"] >= times["started"]
    assert rec["inputs"][0]["path"] == "data/ingested" and rec["inputs"][0]["type"] == "dir"
    assert set(rec["outputs"][0]["files"]) >= {"train.npy", "test.npy", "stats.json"}
    assert rec["environment"]["packages"]["torch"] and rec["environment"]["uv_lock_sha256"]
    assert rec["code"]["commit"] is None or len(rec["code"]["commit"]) == 40
    ft = json.loads((project / "models/model.pt.provenance.json").read_text())
    assert ft["seeds"] == {"torch": 7} and ft["hardware"] == {"device": "cpu", "precision": "fp32"}


def test_audit_writes_evidence_and_verify_passes(ws, capsys):
    out = ws / "reports/audit"
    stmt = json.loads((out / "provenance.json").read_text())
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    assert stmt["subject"][0]["name"] == "models/model.pt"
    assert stmt["subject"][0]["digest"]["sha256"] == __import__("hashlib").sha256((ws / "models/model.pt").read_bytes()).hexdigest()
    bd = stmt["predicate"]["buildDefinition"]
    assert set(bd["externalParameters"]["params"]) >= {"ingest", "preprocess", "pretrain", "finetune", "evaluate"}
    kinds = {d["annotations"]["medtl.kind"] for d in bd["resolvedDependencies"]}
    assert {"source-data", "pretrained-weights", "code", "lockfile", "artifact", "params"} <= kinds
    weights = next(d for d in bd["resolvedDependencies"] if d["annotations"]["medtl.kind"] == "pretrained-weights")
    assert weights["digest"]["sha256"] == "ab" * 32 and weights["uri"].startswith("https://download.pytorch.org/")
    assert bd["internalParameters"]["workspace"]["clean"] is True

    bom = json.loads((out / "ml-bom.json").read_text())
    assert validate_bom(bom) == []
    assert bom["metadata"]["component"]["type"] == "machine-learning-model" and "modelCard" in bom["metadata"]["component"]
    assert any(c["type"] == "library" and c["name"] == "numpy" for c in bom["components"])
    assert any(c["type"] == "data" for c in bom["components"])

    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for text in (html, md):
        assert "Intended use" in text and "Research demonstration" in text
        assert "roc_auc" in text and "0.5 – 1" in text  # metric with its interval
        assert "Annex IV" in text and "GMLP" in text and "WORKSPACE NOT CLEAN" not in text
    assert "<svg" in html and "<script" not in html

    rc, lines = verify_lines(capsys)
    assert (rc, lines) == (0, [])


VICTIM = f"{FAKE_NAMES[1]}_{FAKE_NAMES[3]}/img2_{FAKE_NAMES[3]}.dcm"


def test_source_files_outside_the_pipeline_are_checked_from_the_manifest(ws, capsys):
    # an auditor holding the sources elsewhere points verify at them
    shutil.move(ws / "data/raw", ws.parent / "sources")
    src = ws.parent / "sources" / VICTIM
    src.write_bytes(src.read_bytes() + b"x")
    capsys.readouterr()
    assert main(["verify", "reports/audit/provenance.json", "--source-root", str(ws.parent / "sources")]) == 1
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("MISMATCH")]
    # the evidence knows the file by pseudonym; on the auditor's machine the changed file is named
    assert len(lines) == 1 and lines[0].startswith(f"MISMATCH source {pseudonymise(VICTIM)}: expected sha256 "), lines
    assert VICTIM in lines[0]


def test_no_patient_identifiers_in_evidence(ws, capsys):
    for f in (ws / "reports/audit").iterdir():
        text = f.read_text()
        for name in FAKE_NAMES:
            assert name not in text, f"{name} leaked into {f.name}"
    for rec in ws.rglob("*.provenance.json"):
        assert not any(n in rec.read_text() for n in FAKE_NAMES)


@pytest.mark.parametrize("victim", ["data/prepared/train.npy", "models/model.pt", "params.yaml", "data/raw/" + VICTIM])
def test_tampering_names_exactly_that_artifact(ws, capsys, victim):
    p = ws / victim
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    rc, lines = verify_lines(capsys)
    assert rc == 1
    assert len(lines) == 1, lines
    if victim.startswith("data/raw/"):
        assert lines[0].startswith(f"MISMATCH source {pseudonymise(VICTIM)}: expected sha256 ") and VICTIM in lines[0], lines
    else:
        assert lines[0].startswith(f"MISMATCH {victim}: expected sha256 "), lines


def test_source_folder_is_described_without_file_names(ws):
    stmt = json.loads((ws / "reports/audit/provenance.json").read_text())
    raw = next(d for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"] if d["name"] == "data/raw")
    assert raw["annotations"]["medtl.kind"] == "source-folder" and raw["annotations"]["nfiles"] == 6
    assert "files" not in raw["annotations"]
    record = json.loads((ws / "data/ingested.provenance.json").read_text())
    assert record["inputs"][0]["path"] == "data/raw" and "files" not in record["inputs"][0]


def test_a_quarantined_source_file_that_changed_is_reported_by_its_folder(ws, capsys):
    (ws / "data/raw/unreadable.dcm").write_bytes(b"not in the manifest")
    rc, lines = verify_lines(capsys)
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("MISMATCH data/raw: expected sha256 "), lines
    assert "over 6 files" in lines[0] and "over 7 files" in lines[0]


def test_dirty_workspace_is_flagged(ws, capsys):
    (ws / "params.yaml").write_text(PARAMS.replace("lr: 0.001", "lr: 0.01"))
    assert audit() == 1
    assert "WORKSPACE NOT CLEAN" in (ws / "reports/audit/report.md").read_text().splitlines()[0]
    assert "WORKSPACE NOT CLEAN" in (ws / "reports/audit/report.html").read_text()
    stmt = json.loads((ws / "reports/audit/provenance.json").read_text())
    assert stmt["predicate"]["buildDefinition"]["internalParameters"]["workspace"]["clean"] is False
    bom = json.loads((ws / "reports/audit/ml-bom.json").read_text())
    assert bom["metadata"]["properties"][0] == {"name": "medtl:workspace_clean", "value": "false"}
    assert audit("--allow-dirty") == 0


def test_signed_evidence_verifies_and_forgeries_fail(ws, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_SIGNING_PASSPHRASE", "correct horse battery staple")
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert main(["keygen", "--out", str(tmp_path / "other")]) == 0
    assert audit("--sign-key", str(tmp_path / "k/medtl-signing.key")) == 0
    env_path = ws / "reports/audit/provenance.dsse.json"
    envelope = json.loads(env_path.read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"

    assert verify_lines(capsys, "--pub-key", str(tmp_path / "k/medtl-signing.pub")) == (0, [])
    rc, lines = verify_lines(capsys)  # signed, but nothing to check it with
    assert rc == 1 and "no --pub-key" in lines[0]
    rc, lines = verify_lines(capsys, "--pub-key", str(tmp_path / "other/medtl-signing.pub"))
    assert rc == 1 and lines[0].startswith("MISMATCH signature: no signature by key")

    # the envelope itself is accepted as evidence
    capsys.readouterr()
    assert main(["verify", str(env_path), "--pub-key", str(tmp_path / "k/medtl-signing.pub")]) == 0

    # an altered statement no longer matches the signed payload
    stmt_path = ws / "reports/audit/provenance.json"
    original = stmt_path.read_bytes()
    stmt_path.write_bytes(original.replace(b'"models/model.pt"', b'"models/other.pt"', 1))
    rc, lines = verify_lines(capsys, "--pub-key", str(tmp_path / "k/medtl-signing.pub"))
    assert rc == 1 and any("differs from the payload signed" in x for x in lines)
    stmt_path.write_bytes(original)

    # a forged signature over an altered payload fails
    import base64
    forged = json.loads(original)
    forged["subject"][0]["digest"]["sha256"] = "0" * 64
    payload = json.dumps(forged, indent=2).encode() + b"\n"
    stmt_path.write_bytes(payload)
    envelope["payload"] = base64.b64encode(payload).decode()
    env_path.write_text(json.dumps(envelope))
    rc, lines = verify_lines(capsys, "--pub-key", str(tmp_path / "k/medtl-signing.pub"))
    assert rc == 1 and any(x.startswith("MISMATCH signature: signature by key") for x in lines)


def test_experiment_is_recorded(ws, capsys):
    run([DVC, "exp", "save", "-n", "lr-sweep-1"], ws)
    assert audit() == 0
    stmt = json.loads((ws / "reports/audit/provenance.json").read_text())
    exp = stmt["predicate"]["buildDefinition"]["internalParameters"]["experiment"]
    assert exp["name"] == "lr-sweep-1" and exp["ref"].startswith("refs/exps/")


def test_envelope_verifies_with_securesystemslib(ws, tmp_path, monkeypatch):
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    monkeypatch.setenv("MEDTL_SIGNING_PASSPHRASE", "correct horse battery staple")
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert audit("--sign-key", str(tmp_path / "k/medtl-signing.key")) == 0
    envelope = json.loads((ws / "reports/audit/provenance.dsse.json").read_text())
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    # the key id is computed by securesystemslib, not taken from medtl
    key = SSlibKey.from_crypto(load_pem_public_key((tmp_path / "k/medtl-signing.pub").read_bytes()))
    env = Envelope.from_dict(json.loads(json.dumps(envelope)))  # from_dict consumes the dict it is given
    accepted = env.verify([key], 1)
    assert list(accepted) == [key.keyid] == [envelope["signatures"][0]["keyid"]]
    assert env.payload == (ws / "reports/audit/provenance.json").read_bytes()

    envelope["payload"] = __import__("base64").b64encode(env.payload.replace(b"models/model.pt", b"models/other.pt")).decode()
    with pytest.raises(VerificationError):
        Envelope.from_dict(json.loads(json.dumps(envelope))).verify([key], 1)


def test_private_key_is_protected_by_a_passphrase(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEDTL_SIGNING_PASSPHRASE", raising=False)
    secret, wrong = tmp_path / "pass.txt", tmp_path / "wrong.txt"
    secret.write_text("s3cret phrase\n")
    wrong.write_text("not it\n")
    assert main(["keygen", "--out", str(tmp_path / "k"), "--passphrase-file", str(secret)]) == 0
    key = tmp_path / "k/medtl-signing.key"
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----") and key.stat().st_mode & 0o077 == 0
    assert b"s3cret" not in key.read_bytes()

    envelope = ws / "reports/audit/provenance.dsse.json"
    capsys.readouterr()
    assert audit("--sign-key", str(key)) == 2  # no passphrase given and no terminal to ask on
    assert "protected by a passphrase" in capsys.readouterr().err and not envelope.exists()
    assert audit("--sign-key", str(key), "--passphrase-file", str(wrong)) == 2
    assert "wrong passphrase" in capsys.readouterr().err and not envelope.exists()
    assert audit("--sign-key", str(key), "--passphrase-file", str(secret)) == 0
    assert verify_lines(capsys, "--pub-key", str(tmp_path / "k/medtl-signing.pub")) == (0, [])
    monkeypatch.setenv("MEDTL_SIGNING_PASSPHRASE", "s3cret phrase")
    assert audit("--sign-key", str(key)) == 0

    # keygen without a passphrase source and without a terminal refuses; --no-passphrase is explicit
    monkeypatch.delenv("MEDTL_SIGNING_PASSPHRASE")
    assert main(["keygen", "--out", str(tmp_path / "k2")]) == 2
    assert "--no-passphrase" in capsys.readouterr().err and not (tmp_path / "k2").exists()
    assert main(["keygen", "--out", str(tmp_path / "k3"), "--no-passphrase"]) == 0
    assert (tmp_path / "k3/medtl-signing.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_keygen_asks_twice_at_a_terminal(tmp_path, monkeypatch, capsys):
    from medtl.provenance import signing

    answers = iter(["typed phrase", "typed phrase", "a first phrase", "another phrase", "short"])
    monkeypatch.setattr(signing, "_interactive", lambda: True)
    monkeypatch.setattr(signing.getpass, "getpass", lambda prompt="": next(answers))
    monkeypatch.delenv("MEDTL_SIGNING_PASSPHRASE", raising=False)
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    loaded = signing.serialization.load_pem_private_key((tmp_path / "k/medtl-signing.key").read_bytes(), password=b"typed phrase")
    assert signing.keyid(loaded.public_key()) == signing.keyid(signing.load_public_key(tmp_path / "k/medtl-signing.pub"))
    assert main(["keygen", "--out", str(tmp_path / "k2")]) == 2
    assert "differ" in capsys.readouterr().err and not (tmp_path / "k2/medtl-signing.key").exists()
    assert main(["keygen", "--out", str(tmp_path / "k3")]) == 2  # a typed passphrase is held to 12 characters too
    assert "at least 12" in capsys.readouterr().err and not (tmp_path / "k3/medtl-signing.key").exists()


def _edit_evidence(ws: Path, change) -> None:
    path = ws / "reports/audit/provenance.json"
    stmt = json.loads(path.read_text())
    change(stmt)
    path.write_text(json.dumps(stmt, indent=2))


def _dep(stmt: dict, name: str) -> dict:
    return next(d for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"] if d["name"] == name)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "data/../../../../../etc/passwd"])
def test_verify_refuses_evidence_names_outside_the_root(ws, capsys, name):
    import hashlib

    sha = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()  # a hash that would match, were the file read
    _edit_evidence(ws, lambda s: _dep(s, "params.yaml").update(name=name, digest={"sha256": sha}))
    rc, lines = verify_lines(capsys)
    assert rc == 1
    assert lines == [f"MISMATCH {name}: expected a path inside the project root, actual "
                     f"{'an absolute path' if name.startswith('/') else 'a path that climbs out of the root'} (refused, not read)"]


def test_verify_refuses_a_subject_outside_the_root(ws, capsys, tmp_path):
    import hashlib

    # the model is swapped for a file outside the project, and the evidence names it with its true hash
    outside = tmp_path / "other-model.pt"
    outside.write_bytes(b"a different model")
    sha = hashlib.sha256(outside.read_bytes()).hexdigest()
    _edit_evidence(ws, lambda s: s["subject"][0].update(name=str(outside), digest={"sha256": sha}))
    rc, lines = verify_lines(capsys)
    assert rc == 1 and lines[0].startswith(f"MISMATCH {outside}: expected a path inside the project root, actual an absolute path"), lines

    _edit_evidence(ws, lambda s: s["subject"][0].update(name="models/../../other-model.pt"))
    rc, lines = verify_lines(capsys)
    assert rc == 1 and "models/../../other-model.pt: expected a path inside the project root" in lines[0], lines


def test_verify_refuses_a_symlink_pointing_outside(ws, capsys, tmp_path):
    # same bytes, so the hash matches: only the link's target gives it away
    outside = tmp_path / "model-copy.pt"
    shutil.copy(ws / "models/model.pt", outside)
    (ws / "models/model.pt").unlink()
    (ws / "models/model.pt").symlink_to(outside)
    rc, lines = verify_lines(capsys)
    assert rc == 1 and lines[0] == (f"MISMATCH models/model.pt: expected a path inside the project root, actual a symlink to {outside}, "
                                    "outside the root (refused, not read)"), lines

    # a link inside a folder artifact is refused the same way
    (ws / "models/model.pt").unlink()
    shutil.copy(outside, ws / "models/model.pt")
    train = ws / "data/prepared/train.npy"
    shutil.copy(train, tmp_path / "train.npy")
    train.unlink()
    train.symlink_to(tmp_path / "train.npy")
    rc, lines = verify_lines(capsys)
    assert rc == 1 and any(x.startswith("MISMATCH data/prepared/train.npy: expected a path inside the project root, actual a symlink") for x in lines), lines


def test_verify_requires_the_subject(ws, capsys):
    (ws / "models/model.pt").unlink()
    rc, lines = verify_lines(capsys)
    assert rc == 1 and lines[0].startswith("MISMATCH models/model.pt: expected sha256 ") and "missing" in lines[0], lines
    _edit_evidence(ws, lambda s: s.update(subject=[]))
    rc, lines = verify_lines(capsys)
    assert rc == 1 and lines[0].startswith("MISMATCH subject: expected the model"), lines


def test_verify_refuses_folder_entries_and_source_roots_outside(ws, capsys):
    _edit_evidence(ws, lambda s: _dep(s, "data/prepared")["annotations"]["files"].update({"../../../../etc/passwd": "0" * 64}))
    rc, lines = verify_lines(capsys)
    assert rc == 1 and "MISMATCH data/prepared/../../../../etc/passwd: expected a path inside the project root" in "\n".join(lines), lines

    _edit_evidence(ws, lambda s: _dep(s, "data/prepared")["annotations"]["files"].pop("../../../../etc/passwd"))
    _edit_evidence(ws, lambda s: _dep(s, "source-data")["annotations"].update(source_root="/etc"))
    capsys.readouterr()
    assert main(["verify", "reports/audit/provenance.json"]) == 0  # the recorded root is not followed; the sources are skipped
    assert "recorded source root '/etc' is an absolute path" in capsys.readouterr().out


def test_verify_never_opens_a_file_that_a_link_in_a_source_folder_points_to_outside(ws, tmp_path, capsys):
    outside = tmp_path / "Doe_John_MRN4711.png"
    outside.write_bytes(b"not to be read")
    (ws / "data/raw" / "scan.png").symlink_to(outside)
    rc, lines = verify_lines(capsys)
    text = "\n".join(lines)
    assert rc == 1 and "MISMATCH data/raw: expected a path inside the project root, actual 1 symbolic link(s)" in text
    assert "Doe_John" not in text and "scan.png" not in text


def test_audit_takes_the_manifest_only_from_the_ingest_stage_never_a_source_file_of_that_name(ws):
    from medtl.provenance.audit import collect

    (ws / "data/raw/manifest.csv").write_text("path,label,pt_name,dob\nnormal/a.dcm,normal,Doe^Jane,19470101\n")
    ev = collect(ws, "models/model.pt")
    assert ev["source_data"]["manifest"] == "data/ingested/manifest.csv"
    assert "Doe^Jane" not in json.dumps(ev) and "19470101" not in json.dumps(ev)


@pytest.fixture(scope="module")
def evidence(project) -> dict:
    from medtl.provenance.audit import collect

    return collect(project, "models/model.pt")


def _render(ev: dict, root: Path) -> tuple[str, str]:
    from medtl.provenance import report

    return report.render_markdown(ev), report.render_html(ev, root)


def _with(ev: dict, **changes) -> dict:
    import copy

    out = copy.deepcopy(ev)
    out.update(changes)
    return out


def test_checklist_reports_evidence_never_compliance(evidence, project):
    from medtl.provenance.report import checklist

    statuses = {c["status"] for c in checklist(evidence)}
    assert statuses <= {"evidence present", "missing", "not applicable"} and "evidence present" in statuses
    md, html = _render(evidence, project)
    table = md[md.index("## Regulatory checklist"):]
    assert " met " not in table and "NOT MET" not in table and ">met<" not in html and "NOT MET" not in html


def test_image_level_split_is_said_and_patient_claims_need_real_groups(evidence, project):
    from medtl.provenance.report import checklist

    split = lambda ev: next(c for c in checklist(ev) if "split by patient" in c["item"])  # noqa: E731
    # the fake ingest recorded no grouping: unknown counts as image-level
    for ev in (evidence, _with(evidence, ingest_report={"grouping": {"kind": "image", "rule": None}})):
        assert split(ev)["status"] == "missing"
        for text in _render(ev, project):
            assert "image-level split: patient independence not established" in text.lower()
            assert "Patients in more than one split" not in text
    ev = _with(evidence, ingest_report={"grouping": {"kind": "patient_id", "rule": None}, "pseudonym_key": "user"})
    # the fake manifest puts both patients in several splits: real groups, and they show the overlap
    assert split(ev)["status"] == "missing" and "DICOM PatientID" in split(ev)["evidence"]
    assert "2 patients appear in more than one split" in split(ev)["evidence"]
    ev["source_data"] = {**ev["source_data"], "patients_in_several_splits": 0, "shared_between": {}}
    assert split(ev)["status"] == "evidence present"
    md, html = _render(ev, project)
    assert "image-level" not in md.lower() and "image-level" not in html.lower() and "Patients in more than one split" in html


def test_pseudonym_key_and_allowed_identifier_columns_are_stated(evidence, project):
    ev = _with(evidence, ingest_report={"grouping": {"kind": "rule", "rule": r"person(?P<group>\d+)_"}, "pseudonym_key": "default",
                                        "metadata_columns": ["sex", "site"], "allowed_identifier_columns": ["site"]})
    md, html = _render(ev, project)
    for text in (md, html):
        assert "public default key" in text and "Pseudonyms: the public default key" in text  # a red flag: folder data, public key
        assert "identifier columns allowed by the user" in text and "person(?P&lt;group&gt;" in html
    ev["ingest_report"]["pseudonym_key"] = "user"
    md, _ = _render(ev, project)
    assert "user-held key" in md and "Pseudonyms: the public default key" not in md


def test_unedited_demo_model_card_on_real_data_is_flagged(evidence, project):
    import yaml

    from medtl.provenance import card
    from tests.project import ROOT

    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["model_card"]
    assert " ".join(shipped["intended_use"].split()) == card.DEMO_INTENDED_USE  # the detector knows the shipped text
    assert " ".join(shipped["out_of_scope"].split()) == card.DEMO_OUT_OF_SCOPE
    md, html = _render(evidence, project)
    assert "MODEL CARD NOT EDITED" not in md and 'id="demo-model-card"' not in html  # an edited card on folder data

    ev = _with(evidence, model_card=shipped)  # params.ingest.source is folder
    md, html = _render(ev, project)
    assert "MODEL CARD NOT EDITED" in md and 'id="demo-model-card"' in html and '<div class="flag">MODEL CARD NOT EDITED' in html
    assert any(c["status"] == "missing" and "shipped demo text" in c["evidence"] for c in __import__("medtl.provenance.report", fromlist=["x"]).checklist(ev))

    ev["params"] = {**ev["params"], "ingest": {**ev["params"]["ingest"], "source": "demo"}}
    md, html = _render(ev, project)
    assert "MODEL CARD NOT EDITED" not in md and 'id="demo-model-card"' not in html


def test_report_html_escapes_every_value(evidence, project):
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    ev = _with(evidence, model_card={"intended_use": hostile, "users": [hostile], "limitations": [hostile]},
               params={**evidence["params"], "ingest": {"source": hostile}})
    ev["model"] = {**ev["model"], "classes": [hostile, "lesion"], "arch": hostile}
    _, html = _render(ev, project)
    assert "<script" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html


BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "sklearn", "albumentations", "cv2", "numpy", "onnx", "onnxruntime"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Block())
import argparse
from medtl.deploy import export_command as export
from medtl.provenance import commands
parser = argparse.ArgumentParser(prog="medtl")
sub = parser.add_subparsers(dest="command", required=True)
commands.register(sub)
export.register(sub)
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_verify_and_keygen_need_no_training_stack(ws, tmp_path):
    # a reviewer's machine: no torch, torchvision, scikit-learn or numpy
    def medtl(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", BLOCKED, *argv], cwd=ws, capture_output=True, text=True,
                              env={**os.environ, "MEDTL_SIGNING_PASSPHRASE": "reviewer phrase"})

    r = medtl("verify", "reports/audit/provenance.json")
    assert r.returncode == 0 and "OK:" in r.stdout, r.stdout + r.stderr
    r = medtl("keygen", "--out", str(tmp_path / "k"))
    assert r.returncode == 0 and (tmp_path / "k/medtl-signing.key").read_text().startswith("-----BEGIN ENCRYPTED"), r.stderr
    r = medtl("export", "--help")
    assert r.returncode == 0 and "onnx" in r.stdout, r.stderr


@pytest.mark.parametrize("name", ["ml-bom.json", "report.html", "report.md"])
def test_what_a_reviewer_reads_is_covered_by_the_signature_and_by_verify(ws, capsys, tmp_path, monkeypatch, name):
    monkeypatch.setenv("MEDTL_SIGNING_PASSPHRASE", "correct horse battery staple")
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert audit("--sign-key", str(tmp_path / "k/medtl-signing.key")) == 0
    pub = str(tmp_path / "k/medtl-signing.pub")
    signed = json.loads(base64_payload(ws / "reports/audit/provenance.dsse.json"))
    covered = {d["name"] for d in signed["predicate"]["runDetails"]["byproducts"] if d["annotations"]["medtl.kind"] == "evidence"}
    assert covered == {"ml-bom.json", "report.html", "report.md"}
    assert verify_lines(capsys, "--pub-key", pub) == (0, [])
    p = ws / "reports/audit" / name
    p.write_text(p.read_text().replace("0.", "0.9", 1))  # a metric edited by hand
    rc, lines = verify_lines(capsys, "--pub-key", pub)
    assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"MISMATCH {name}: expected sha256 "), lines


def base64_payload(envelope: Path) -> bytes:
    import base64

    return base64.b64decode(json.loads(envelope.read_text())["payload"])


@pytest.mark.parametrize("remote, uri", [(None, None), ("/home/someone/clones/medtl", None),
                                         ("https://git.example.org/lab/medtl.git", "git+https://git.example.org/lab/medtl.git@")])
def test_no_local_path_in_the_evidence_and_the_code_uri_is_a_reachable_remote(ws, capsys, remote, uri):
    if remote:
        subprocess.run(["git", "remote", "add", "origin", remote], cwd=ws, check=True)
    assert audit() == 0
    stmt = json.loads((ws / "reports/audit/provenance.json").read_text())
    code = next(d for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"] if d["name"] == "code")
    assert (code.get("uri") or None) == (uri and uri + code["digest"]["gitCommit"])
    files = list((ws / "reports/audit").iterdir()) + list(ws.rglob("*.provenance.json"))
    for f in files:
        text = f.read_text()
        for local in (str(ws), str(ws.resolve()), "/home/someone"):
            assert local not in text, f"{local} in {f.relative_to(ws)}"


def test_an_audit_without_the_local_run_times_still_writes_the_same_evidence(ws, capsys):
    """Records carry no wall-clock times; on a machine without their local log (a clone), the audit only lacks them."""
    before = json.loads((ws / "reports/audit/provenance.json").read_text())
    for log in ws.rglob("*.provenance.json.log"):
        log.unlink()
    assert audit() == 0
    after = json.loads((ws / "reports/audit/provenance.json").read_text())
    assert "startedOn" in before["predicate"]["runDetails"]["metadata"]
    assert "startedOn" not in after["predicate"]["runDetails"]["metadata"]
    assert after["subject"] == before["subject"]
    assert after["predicate"]["buildDefinition"]["resolvedDependencies"] == before["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert verify_lines(capsys) == (0, [])
