"""The model card an exported model carries: what it is for, what it was tested on, and where its evidence is.

Everything is read from the project's own artifacts, and only when they describe
the model being exported (matched by its sha256): the evaluate stage's record
and metrics, the ingest manifest's counts, the audit's provenance.json, and
params.yaml's `model_card` section. What is absent is said to be absent.
"""
from __future__ import annotations

import json
from pathlib import Path

from medtl.errors import MedtlError
from medtl.evaluate.reports import METRICS, load_metrics
from medtl.ingest.manifest import PROJECT_MANIFEST
from medtl.io import sha256_file
from medtl.provenance.record import RECORD_SUFFIX

CARD_FORMAT = "medtl-model-card/1"
EVALUATE_RECORD = METRICS + RECORD_SUFFIX  # the evaluate stage's record, beside its first output

# What a deployer must know about the licence of the weights the model started from.
WEIGHTS_LICENCE = {
    "none": "no pretrained weights: every weight was trained by this pipeline on the project's data",
    "imagenet": "torchvision's ImageNet weights: torchvision's code is BSD-3-Clause; the weights were trained on "
                "ImageNet, whose terms of access are for non-commercial research, and torchvision asks users to "
                "check the dataset's licence for their use; settle this before a commercial deployment",
    "file": "a pinned local weights file: its licence is whatever its provider states (medtl does not record it); "
            "keep that statement with the model",
}


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def evaluation_of(model_path: Path, reports: Path) -> dict | None:
    """The evaluate stage's record, when it evaluated exactly this model file; None otherwise."""
    record = _json(reports / EVALUATE_RECORD)
    if not isinstance(record, dict):
        return None
    sha = sha256_file(model_path)
    if not any(isinstance(i, dict) and i.get("sha256") == sha for i in record.get("inputs") or []):
        return None
    return record


def test_metrics(reports: Path) -> dict | None:
    """The headline test metrics with their confidence intervals, from metrics.json."""
    try:
        m = load_metrics(reports, required=False)
    except MedtlError:
        m = None
    if not isinstance(m, dict):
        return None
    out = {k: m[k] for k in ("split", "n", "n_groups", "threshold", "threshold_rule") if k in m}
    for key, value in m.items():
        if isinstance(value, (int, float)) and f"{key}_ci_low" in m and f"{key}_ci_high" in m:
            out[key] = {"value": value, "ci": [m[f"{key}_ci_low"], m[f"{key}_ci_high"]]}
    return out


def data_summary(manifest: Path) -> dict | None:
    """Images per split and class, patients per split, and sites where the data has them (counts only)."""
    if not manifest.is_file():
        return None
    from medtl.provenance.audit import manifest_summary

    s = manifest_summary(manifest)
    out = {"images": s["images"], "per_split_class": s["per_split_class"], "patients_per_split": s["patients_per_split"]}
    if "site" in s["subgroups"]:
        out["sites_per_split"] = s["subgroups"]["site"]
    return out


def audit_provenance(model_path: Path, audit_dir: Path) -> dict | None:
    """sha256 of the audit's provenance.json whose subject is this model; None when no such audit exists."""
    path = audit_dir / "provenance.json"
    stmt = _json(path)
    if not isinstance(stmt, dict):
        return None
    sha = sha256_file(model_path)
    if not any((s.get("digest") or {}).get("sha256") == sha for s in stmt.get("subject") or [] if isinstance(s, dict)):
        return None
    return {"file": path.name, "sha256": sha256_file(path), "signed": (audit_dir / "provenance.dsse.json").is_file()}


def weights_origin(ckpt: dict) -> dict:
    w = (ckpt.get("backbone") or {}).get("weights") or {}
    name = str(w.get("name") or "none")
    kind = "imagenet" if name.startswith("imagenet") else "file" if name == "file" else "none"
    origin = w.get("origin")
    if kind == "file" and origin:
        origin = Path(str(origin)).name  # a local path is the builder's, not the deployer's
    return {"name": name, "origin": origin, "sha256": w.get("sha256"), "licence": WEIGHTS_LICENCE[kind]}


def model_card(ckpt: dict, model_path: Path, operating_point: dict | None, reports: Path = Path("reports"),
               manifest: Path = PROJECT_MANIFEST, params: Path = Path("params.yaml"),
               audit_dir: Path = Path("reports/audit")) -> dict:
    from medtl.provenance.audit import load_yaml

    card_params = {}
    try:
        card_params = (load_yaml(params, required=False) or {}).get("model_card") or {}
    except Exception:  # an unreadable params.yaml leaves the card's use fields empty, not the export failed
        card_params = {}
    evaluated = evaluation_of(model_path, reports)
    card = {
        "format": CARD_FORMAT,
        "intended_use": card_params.get("intended_use"),
        "users": card_params.get("users"),
        "out_of_scope": card_params.get("out_of_scope"),
        "limitations": card_params.get("limitations"),
        "classes": list(ckpt["classes"]),
        "operating_point": {k: operating_point.get(k) for k in ("threshold", "rule", "target", "temperature",
                                                                "val_sensitivity", "val_specificity") if k in operating_point}
        if operating_point else None,
        "test_metrics": test_metrics(reports) if evaluated else None,
        "evaluated_at": (evaluated or {}).get("hardware"),
        "training_data": data_summary(manifest),
        "audit_provenance": audit_provenance(model_path, audit_dir),
        "weights_origin": weights_origin(ckpt),
    }
    if not evaluated:
        card["test_metrics_note"] = f"no evaluate record in {reports} for this model file: test metrics not carried"
    return card
