"""The CycloneDX 1.6 ML-BOM: the model with its model card, the datasets, every locked package."""
from __future__ import annotations

import importlib.metadata
import json
import uuid
from functools import cache
from pathlib import Path

from medtl.errors import MedtlError
from medtl.provenance import card

SPEC_VERSION = "1.6"
SCHEMA_DIR = Path(__file__).with_name("schemas")
_SCHEMA_FILES = ("bom-1.6.schema.json", "spdx.schema.json", "jsf-0.82.schema.json")


def _sha(value: str) -> list[dict]:
    return [{"alg": "SHA-256", "content": value}]


def _prop(name: str, value) -> dict:
    return {"name": f"medtl:{name}", "value": value if isinstance(value, str) else json.dumps(value, sort_keys=True)}


def _dataset(ev: dict, src: dict) -> dict:
    counts = "; ".join(f"{split}: " + ", ".join(f"{c}={n}" for c, n in cls.items()) for split, cls in src["per_split_class"].items())
    return {
        "type": "data",
        "bom-ref": "data:source",
        "name": "source-data",
        "version": src["manifest_sha256"][:12],
        "description": (f"{src['images']} images from {src['patients_total']} patients (pseudonymous groups)" if card.grouping(ev)["patient_level"]
                        else f"{src['images']} images; {card.IMAGE_LEVEL}") + f"; per split and class: {counts}",
        "hashes": _sha(src["manifest_sha256"]),
        "data": [{
            "type": "dataset",
            "name": "source-data",
            "description": f"Manifest {src['manifest']} lists every source file by a keyed pseudonym of its path with the sha256 of its bytes.",
            "classification": "medical images (de-identified: pixels and whitelisted metadata only)",
            "sensitiveData": ["source DICOM headers may hold patient identifiers; none are copied into artifacts"],
            "contents": {"properties": [_prop("manifest", src["manifest"]), _prop("images", str(src["images"])), _prop("groups", str(src["patients_total"])),
                                        _prop("grouping", card.grouping(ev)["kind"])]},
        }],
    }


def _artifact_data(a: dict) -> dict:
    return {
        "type": "data",
        "bom-ref": f"artifact:{a['path']}",
        "name": a["path"],
        "version": a["sha256"][:12],
        "hashes": _sha(a["sha256"]),
        "data": [{"type": "dataset", "name": a["path"], "description": f"{a['type']} written by stage {a.get('stage') or 'n/a'}; {a['size']} bytes"}],
        "properties": [_prop("dvc_md5", a.get("dvc_md5") or "")],
    }


def _model_card(ev: dict, dataset_refs: list[str]) -> dict:
    m = ev["model"]
    metrics = []
    for r in card.metric_rows(ev.get("metrics") or {}):
        if r["value"] is None:
            continue
        pm = {"type": r["name"], "value": card.fmt(r["value"])}
        if r["low"] is not None:
            pm["confidenceInterval"] = {"lowerBound": card.fmt(r["low"]), "upperBound": card.fmt(r["high"])}
        metrics.append(pm)
    mc = ev.get("model_card") or {}
    considerations = {"useCases": [card.intended_use(ev)]}
    if mc.get("users"):
        considerations["users"] = [str(u) for u in (mc["users"] if isinstance(mc["users"], list) else [mc["users"]])]
    if card.limitations(ev):
        considerations["technicalLimitations"] = card.limitations(ev)
    return {
        "bom-ref": "model-card",
        "modelParameters": {
            "approach": {"type": "supervised"},
            "task": "image-classification",
            "architectureFamily": str(m.get("arch", "unknown")),
            "modelArchitecture": f"{m.get('arch', 'unknown')} transfer-learned from {(ev.get('weights') or {}).get('name') or 'unknown weights'}, strategy {m.get('strategy', 'n/a')}",
            "datasets": [{"ref": r} for r in dataset_refs],
            "inputs": [{"format": "image"}],
            "outputs": [{"format": "class probabilities over " + ", ".join(map(str, m.get("classes", [])))}],
        },
        "quantitativeAnalysis": {"performanceMetrics": metrics},
        "considerations": considerations,
    }


def build_bom(ev: dict) -> dict:
    m = ev["model"]
    components, dataset_refs = [], []
    if ev.get("source_data"):
        components.append(_dataset(ev, ev["source_data"]))
        dataset_refs.append("data:source")
    for a in ev["artifacts"]:
        if a["kind"] == "artifact" and a["role"] == "output" and a["type"] == "dir":
            components.append(_artifact_data(a))
            dataset_refs.append(f"artifact:{a['path']}")
    w = ev.get("weights") or {}
    if w:
        wc = {"type": "machine-learning-model", "bom-ref": "pretrained-weights", "name": str(w.get("name") or "pretrained-weights"), "description": f"pretrained weights from {w.get('origin') or 'unknown origin'}"}
        if w.get("sha256"):
            wc["hashes"] = _sha(w["sha256"])
        components.append(wc)
    libs = []
    for p in ev.get("packages", []):
        ref = f"pkg:pypi/{p['name']}@{p['version']}"
        lib = {"type": "library", "bom-ref": ref, "name": p["name"], "version": str(p["version"]), "purl": ref}
        if p.get("sdist_sha256"):
            lib["hashes"] = _sha(p["sdist_sha256"])
        libs.append(lib)
    components += libs
    model = {
        "type": "machine-learning-model",
        "bom-ref": "model",
        "name": m["path"],
        "version": m["sha256"][:12],
        "description": f"{m.get('arch', 'model')} image classifier, classes: {', '.join(map(str, m.get('classes', [])))}",
        "hashes": _sha(m["sha256"]),
        "modelCard": _model_card(ev, dataset_refs),
        "properties": [_prop("dvc_md5", m.get("dvc_md5") or ""), _prop("git_commit", ev["git"].get("commit") or "none")],
    }
    exp = ev.get("experiment")
    if exp:
        model["properties"].append(_prop("experiment", exp))
    try:
        medtl_version = importlib.metadata.version("medtl")
    except importlib.metadata.PackageNotFoundError:
        medtl_version = "unknown"
    ws = ev["workspace"]
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            # workspace state first: a reviewer must see an unclean audit before anything else
            "properties": [_prop("workspace_clean", "true" if ws["clean"] else "false")] + [_prop("workspace_problem", p) for p in ws["problems"]],
            "timestamp": ev["generated"],
            "tools": {"components": [{"type": "application", "name": "medtl", "version": medtl_version}]},
            "component": model,
        },
        "components": components,
        "dependencies": [
            {"ref": "model", "dependsOn": dataset_refs + (["pretrained-weights"] if w else []) + [lib["bom-ref"] for lib in libs]},
        ],
    }


@cache
def _validator():
    import jsonschema
    from referencing import Registry, Resource

    schemas = {}
    for name in _SCHEMA_FILES:
        try:
            schemas[name] = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MedtlError(f"CycloneDX schema {SCHEMA_DIR / name} cannot be read: {e}") from e
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    root = schemas["bom-1.6.schema.json"]
    return jsonschema.Draft7Validator(root, registry=registry, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def validate_bom(bom: dict) -> list[str]:
    """Schema errors of a CycloneDX 1.6 JSON BOM, each as `<json path>: <message>`; empty when valid."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in _validator().iter_errors(bom)]
