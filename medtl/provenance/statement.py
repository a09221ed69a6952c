"""The in-toto Statement (v1) with an SLSA Provenance (v1) predicate for one model.

Everything `medtl verify` re-checks sits in standard fields: the model is the
subject; data, weights, code, lock file, params and every pipeline artifact
are resolvedDependencies (ResourceDescriptors), with medtl's extra facts
(folder manifests, DVC md5, stage) in their `annotations`.
"""
from __future__ import annotations

import importlib.metadata

from medtl.provenance import card

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:medtl:buildtype:dvc-pipeline:v1"
BUILDER_ID = "urn:medtl:builder:dvc-repro"


def _artifact_descriptor(a: dict) -> dict:
    ann = {"medtl.kind": a["kind"], "type": a["type"], "size": a["size"], "role": a.get("role")}
    if a.get("stage"):
        ann["stage"] = a["stage"]
    if "dvc_md5" in a:
        ann["dvc_md5"] = a["dvc_md5"]
    if a["type"] == "dir":
        # the folder digest is sha256 over "<sha256>  <relpath>\n" lines; each file is listed to trace a change
        ann["digest_of"] = "file manifest"
        ann["nfiles"] = a.get("nfiles")
        if "files" in a:
            ann["files"] = a["files"]
        else:  # source data: file names may identify patients; the source manifest names each file by pseudonym + sha256
            ann["files_withheld"] = True
    return {"name": a["path"], "digest": {"sha256": a["sha256"]}, "annotations": ann}


def evidence_descriptor(path) -> dict:
    """A file of the audit itself (ML-BOM, report), named relative to the statement's folder: verify re-hashes it
    there, and a signature over the statement covers it."""
    from medtl.provenance.hashing import file_digests

    sha, _, size = file_digests(path)
    return {"name": path.name, "digest": {"sha256": sha},
            "annotations": {"medtl.kind": "evidence", "size": size, "location": "beside the statement"}}


def build_statement(ev: dict) -> dict:
    m = ev["model"]
    deps = []
    src = ev.get("source_data")
    if src:
        deps.append({
            "name": "source-data",
            "uri": f"file:{src['manifest']}",
            "digest": {"sha256": src["manifest_sha256"]},
            "annotations": {
                "medtl.kind": "source-data",
                "manifest": src["manifest"],
                "source_root": src.get("source_root"),
                "images": src["images"],
                "groups": src["patients_total"],
                "grouping": card.grouping(ev)["kind"],  # "image": each image its own group, patients not identified
                "note": "the manifest lists every source file by a keyed pseudonym of its path (source_ref) with the sha256 of its bytes",
            },
        })
    w = ev.get("weights")
    if w:
        d = {"name": f"pretrained-weights:{w.get('name')}", "annotations": {"medtl.kind": "pretrained-weights", **{k: v for k, v in w.items() if k != "sha256"}}}
        if w.get("origin"):
            d["uri"] = str(w["origin"])
        if w.get("sha256"):
            d["digest"] = {"sha256": w["sha256"]}
        else:
            d["annotations"]["note"] = "no weights file (trained from scratch or weights not pinned)"
        if "uri" not in d and "digest" not in d:
            d["uri"] = f"urn:medtl:weights:{w.get('name') or 'none'}"
        deps.append(d)
    git = ev["git"]
    if git.get("commit"):
        code = {"name": "code", "digest": {"gitCommit": git["commit"]}, "annotations": {"medtl.kind": "code", "dirty": git["dirty"]}}
        if git.get("remote"):
            code["uri"] = f"git+{git['remote']}@{git['commit']}"
        deps.append(code)
    deps += [_artifact_descriptor(a) for a in ev["artifacts"] if a["path"] != m["path"]]

    # run times come from each record's local log, absent on a machine that did not run the stage
    started = [s["record"]["started"] for s in ev["stages"] if (s.get("record") or {}).get("started")]
    ended = [s["record"]["ended"] for s in ev["stages"] if (s.get("record") or {}).get("ended")]
    metadata = {"invocationId": f"medtl-audit:{m['sha256'][:16]}:{ev['generated']}"}
    if started:
        metadata["startedOn"] = min(started)
    if ended:
        metadata["finishedOn"] = max(ended)
    internal = {
        "workspace": ev["workspace"],
        "stages": [s["name"] for s in ev["stages"]],
        "experiment": ev.get("experiment"),
        "environment": ev["environment"],
    }
    try:
        medtl_version = importlib.metadata.version("medtl")
    except importlib.metadata.PackageNotFoundError:
        medtl_version = "unknown"
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{
            "name": m["path"],
            "digest": {"sha256": m["sha256"]},
            "annotations": {"medtl.kind": "model", "dvc_md5": m.get("dvc_md5"), "stage": m.get("stage"), "size": m["size"]},
        }],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "params": {s: v for s, v in (ev["params"] or {}).items()},
                    "model": m["path"],
                    "stages": {s["name"]: s["cmd"] for s in ev["stages"]},
                },
                "internalParameters": internal,
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"medtl": medtl_version, "dvc": ev["environment"].get("packages", {}).get("dvc") or "unknown"}},
                "metadata": metadata,
                "byproducts": [{"name": r["path"], "digest": {"sha256": r["sha256"]},
                                "annotations": {"medtl.kind": "stage-record", **({"dvc_md5": r["dvc_md5"]} if r.get("dvc_md5") else {})}}
                               for r in ev["records"]],
            },
        },
    }
