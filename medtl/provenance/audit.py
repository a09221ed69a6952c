"""`medtl audit`: gather the evidence for one model, from the files, records and dvc.lock.

The walk goes model -> the stages that produced it (dvc.lock and each stage's
record) -> every artifact on the way (sha256, and the md5 DVC locked) -> the
source manifest (each source file's sha256) and the pretrained weights.
Patient identifiers never enter the evidence: groups are counted, not listed;
source files are known only through the manifest (a keyed pseudonym of each
relative path and the file's sha256), which is referenced by hash; a folder of
source data is described by its digest and file count, never by its file names.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from medtl.errors import MedtlError
from medtl.evaluate.reports import (FAILURES_DIR, METRICS, ROBUSTNESS, load_evaluation, load_failures, load_metrics,
                                     load_robustness)
from medtl.ingest.manifest import MANIFEST, read_manifest
from medtl.ingest.report import load_report
from medtl.model.backbone_file import PROJECT_BACKBONE
from medtl.provenance import environment as env
from medtl.provenance.hashing import describe
from medtl.provenance.record import RECORD_SUFFIX, load_record, record_path_for, run_times, utc_now
from medtl.provenance.transfer import transfer_evidence

MANIFEST_CORE = {"image_id", "source_ref", "source_path", "sha256", "label", "group", "split", "height", "width", "channels", "offset"}
# dependencies under these folders are code, whose file names may be listed; other folders a stage reads
# without any stage writing them are source data (images, unlabelled extra images)
CODE_FOLDERS = ("medtl/", "stages/")
SUBGROUP_MAX_VALUES = 12
PIPELINE_FILES = ("params.yaml", "dvc.yaml", "dvc.lock", "uv.lock")


def load_yaml(path: Path, required: bool = True):
    if not path.is_file():
        if required:
            raise MedtlError(f"{path} not found: run `medtl audit` in the project root after `dvc repro`")
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MedtlError(f"{path} cannot be parsed as YAML: {e}") from e


def load_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MedtlError(f"{path} cannot be parsed as JSON: {e}") from e


def lock_entries(lock: dict) -> dict[str, dict]:
    """dvc.lock stage name -> {cmd, deps: {path: md5}, outs: {path: md5}, params}."""
    stages = (lock or {}).get("stages")
    if not isinstance(stages, dict):
        raise MedtlError("dvc.lock has no 'stages' mapping: run `dvc repro` to produce it")
    out = {}
    for name, st in stages.items():
        st = st or {}
        out[name] = {
            "cmd": st.get("cmd"),
            "deps": {d["path"]: d.get("md5") for d in st.get("deps") or []},
            "outs": {o["path"]: o.get("md5") for o in st.get("outs") or []},
            "params": st.get("params") or {},
        }
    return out


def dvc_status(root: Path) -> tuple[bool | None, dict | str]:
    """(clean, details) from `dvc status`; (None, why) when dvc cannot answer."""
    try:
        r = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"dvc status could not run: {e}"
    if r.returncode != 0:
        return None, "dvc status failed: " + (r.stderr.strip().splitlines() or ["no output"])[-1]
    try:
        status = json.loads(r.stdout or "{}")
    except ValueError:
        return None, f"dvc status printed something that is not JSON: {r.stdout[:200]!r}"
    return not status, status


def lineage(lock: dict[str, dict], model: str) -> list[str]:
    """Stages the model depends on, upstream first (by following outs -> deps in dvc.lock)."""
    producer = {out: name for name, st in lock.items() for out in st["outs"]}

    def produced_by(path: str) -> str | None:
        for out, name in producer.items():
            if path == out or path.startswith(out.rstrip("/") + "/"):
                return name
        return None

    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in lock[name]["deps"]:
            up = produced_by(dep)
            if up and up != name:
                visit(up)
        order.append(name)

    start = produced_by(model)
    if start is None:
        raise MedtlError(f"{model} is not an output of any stage in dvc.lock; pass the model the pipeline wrote with --model")
    visit(start)
    # stages downstream of the model (evaluate) hold its evidence: include those that read it
    for name, st in lock.items():
        if name not in order and any(d == model for d in st["deps"]):
            visit(name)
    return order


def pipeline_edges(lock: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(upstream stage, downstream stage, artifact) for every artifact passed between stages."""
    edges = []
    for up, ust in lock.items():
        for out in ust["outs"]:
            for down, dst in lock.items():
                if down != up and any(d == out or d.startswith(out.rstrip("/") + "/") for d in dst["deps"]):
                    edges.append((up, down, out))
    return edges


def uv_packages(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MedtlError(f"{path} cannot be parsed as TOML: {e}") from e
    out = []
    for p in data.get("package", []):
        src = p.get("source", {})
        sdist_hash = (p.get("sdist") or {}).get("hash", "")
        out.append({
            "name": p["name"],
            "version": p.get("version"),
            "registry": src.get("registry"),
            "editable": "editable" in src or "virtual" in src,
            "sdist_sha256": sdist_hash.split(":", 1)[1] if sdist_hash.startswith("sha256:") else None,
        })
    return sorted(out, key=lambda p: p["name"])


INGEST_STAGE = "ingest"  # the dvc.yaml stage whose output folder holds manifest.csv


def manifest_summary(path: Path) -> dict:
    """Counts from the ingest manifest: per split and class, patients per split, overlap, subgroups."""
    rows = read_manifest(path)  # checked against its format record
    columns = list(rows[0].keys()) if rows else []
    if rows and ("sha256" not in columns or not {"source_ref", "source_path"} & set(columns)):
        raise MedtlError(f"source manifest {path} lacks the columns sha256 and source_ref: it does not say which source file each image came from")
    by_split_class: dict[str, Counter] = defaultdict(Counter)
    groups: dict[str, set] = defaultdict(set)
    for r in rows:
        split = r.get("split") or "unassigned"
        by_split_class[split][r.get("label") or "unlabelled"] += 1
        if r.get("group"):
            groups[split].add(r["group"])
    group_splits: dict[str, set] = defaultdict(set)
    for split, gs in groups.items():
        for g in gs:
            group_splits[g].add(split)
    shared = Counter("+".join(sorted(s)) for s in group_splits.values() if len(s) > 1)
    subgroups = {}
    for col in columns:
        if col in MANIFEST_CORE:
            continue
        values = {r.get(col) or "" for r in rows}
        if 1 < len(values) <= SUBGROUP_MAX_VALUES:
            table: dict[str, Counter] = defaultdict(Counter)
            for r in rows:
                table[r.get("split") or "unassigned"][r.get(col) or "(blank)"] += 1
            subgroups[col] = {s: dict(sorted(c.items())) for s, c in sorted(table.items())}
    return {
        "images": len(rows),
        "columns": columns,
        "classes": sorted({r.get("label") or "unlabelled" for r in rows}),
        "per_split_class": {s: dict(sorted(c.items())) for s, c in sorted(by_split_class.items())},
        "patients_per_split": {s: len(g) for s, g in sorted(groups.items())},
        "patients_total": len(group_splits),
        "patients_in_several_splits": sum(shared.values()),
        "shared_between": dict(shared),
        "subgroups": subgroups,
        "ages": age_summary(rows),
    }


AGE_COLUMNS = ("age", "patient_age", "PatientAge")


def age_summary(rows: list[dict]) -> dict:
    """Per split: median, quartiles and range of the age column (DICOM "045Y" read as 45), and how many lack one."""
    col = next((c for c in AGE_COLUMNS if rows and c in rows[0]), None)
    if col is None:
        return {}
    ages: dict[str, list[float]] = defaultdict(list)
    missing: Counter = Counter()
    for r in rows:
        split = r.get("split") or "unassigned"
        text = str(r.get(col) or "").strip().upper()
        digits = text.rstrip("YMWD").lstrip("0") or ("0" if text[:1] == "0" else "")
        try:
            value = float(digits)
        except ValueError:
            missing[split] += 1
            continue
        ages[split].append(value / {"M": 12, "W": 52, "D": 365}.get(text[-1:], 1))
    out = {}
    for split in sorted(set(ages) | set(missing)):
        v = sorted(ages.get(split, []))
        q = (lambda f: v[min(len(v) - 1, int(round(f * (len(v) - 1))))]) if v else (lambda f: None)  # noqa: E731
        out[split] = {"n": len(v), "missing": missing[split], "median": q(0.5), "q1": q(0.25), "q3": q(0.75),
                      "min": v[0] if v else None, "max": v[-1] if v else None}
    return {"column": col, "by_split": out}


def withhold_source_paths(paths: list[str], folders: list[str]) -> list[str]:
    """Paths with those inside source-data folders replaced by a count per folder (their names may identify patients)."""
    kept, hidden = [], Counter()
    for p in paths:
        folder = next((f for f in folders if p.strip('"') == f or p.strip('"').startswith(f.rstrip("/") + "/")), None)
        if folder is None:
            kept.append(p)
        else:
            hidden[folder] += 1
    return kept + [f"{n} file(s) under {f} (source data: names withheld)" for f, n in sorted(hidden.items())]


def _count_parameters(obj) -> int:
    """Elements of every tensor in a (nested) state dict: backbone and head may be stored apart."""
    if hasattr(obj, "numel") and callable(obj.numel):
        return int(obj.numel())
    if isinstance(obj, dict):
        return sum(_count_parameters(v) for v in obj.values())
    return 0


def model_details(path: Path) -> dict:
    from medtl.model.model_file import read_model_file

    ckpt = read_model_file(path, check_format=False)
    keys = ("format", "arch", "in_channels", "num_features", "classes", "preprocessing", "hardware", "strategy", "best_epoch", "validation")
    details = {k: ckpt[k] for k in keys if k in ckpt}
    for k in ("target", "target_adaptation", "domain_adversarial"):  # unlabelled target images: counts and set digest, not per-image digests
        if isinstance(ckpt.get(k), dict):
            details[k] = {n: v for n, v in ckpt[k].items() if n != "pixel_digests"}
    backbone = ckpt.get("backbone") if isinstance(ckpt.get("backbone"), dict) else {}
    for k in ("in_channels", "num_features", "grayscale"):
        if k not in details and k in backbone:
            details[k] = backbone[k]
    weights = {k: v for k, v in ckpt.items() if k in ("state_dict", "head")}
    if "state_dict" in backbone:
        weights["backbone"] = backbone["state_dict"]
    n = _count_parameters(weights)
    if n:
        details["parameters"] = n
    return details


def backbone_weights(path: Path, name: str | None = None) -> dict | None:
    """The pretrained weights behind a backbone checkpoint; `name` is its path relative to the project (no local path in evidence)."""
    from medtl.model.backbone_file import read_backbone_file

    if not path.is_file():
        return None
    ckpt = read_backbone_file(path)
    w = ckpt.get("weights") if isinstance(ckpt, dict) else None
    out = {"checkpoint": name or path.name}
    if isinstance(w, dict):
        out.update({k: w.get(k) for k in ("name", "origin", "sha256")})
    if isinstance(ckpt, dict) and isinstance(ckpt.get("adaptation"), dict):
        out["adaptation"] = {k: v for k, v in ckpt["adaptation"].items() if k != "loss_curve"}
    return out


def find_experiment(root: Path, model: str, model_md5: str | None, records: dict) -> dict | None:
    """The `dvc exp` run that produced this model: from the stage record, else an exp ref whose dvc.lock locks the same model."""
    named = next((r["dvc"]["experiment"] for r in records.values() if r.get("dvc", {}).get("experiment")), None)
    refs = env._git(["for-each-ref", "refs/exps", "--format=%(refname) %(objectname)"], root) or ""
    candidates = []
    for line in refs.splitlines():
        ref, _, commit = line.partition(" ")
        if ref.startswith(("refs/exps/exec/", "refs/exps/celery/", "refs/exps/temp/")):
            continue
        candidates.append((ref, commit))
    for ref, commit in candidates[:500]:
        name = ref.rsplit("/", 1)[-1]
        if named and name == named:
            return {"name": name, "ref": ref, "commit": commit, "matched_by": "stage record"}
    if model_md5:
        for ref, commit in candidates[:500]:
            text = env._git(["show", f"{commit}:dvc.lock"], root)
            if not text:
                continue
            try:
                lock = lock_entries(yaml.safe_load(text))
            except (MedtlError, yaml.YAMLError):
                continue
            if any(st["outs"].get(model) == model_md5 for st in lock.values()):
                return {"name": ref.rsplit("/", 1)[-1], "ref": ref, "commit": commit, "matched_by": "model md5 in the experiment's dvc.lock"}
    if named:
        return {"name": named, "ref": None, "commit": None, "matched_by": "stage record (ref not found; the experiment may not be saved)"}
    return None


def evaluation_metrics(artifacts: dict[str, dict], lock: dict[str, dict], stage_names: list[str], model: str) -> str | None:
    """The metrics.json of the stage that evaluates the model (it reads the model); training curves' metrics otherwise."""
    candidates = [p for p, d in artifacts.items() if d["type"] == "file" and Path(p).name == METRICS and d.get("role") == "output"]
    candidates += [f"{p}/{METRICS}" for p, d in artifacts.items() if d["type"] == "dir" and METRICS in d.get("files", {})]
    evaluators = {n for n in stage_names if model in lock.get(n, {}).get("deps", {})}
    for p in candidates:
        stage = artifacts.get(p, {}).get("stage")
        if stage in evaluators:
            return p
    return candidates[-1] if candidates else None


PLOT_SUFFIXES = (".png", ".svg", ".json")


def evaluation_plots(root: Path, artifacts: dict[str, dict], metrics_path: str | None) -> list[str]:
    """Plot data and images the evaluating stage wrote: its folder outputs, and plots/ and saliency/ beside metrics.json."""
    if not metrics_path:
        return []
    stage = (artifacts.get(metrics_path) or {}).get("stage")
    folders = {p for p, d in artifacts.items() if d["type"] == "dir" and d.get("role") == "output" and stage and d.get("stage") == stage}
    base = Path(metrics_path).parent
    folders |= {(base / name).as_posix() for name in ("plots", "saliency") if (root / base / name).is_dir()}
    out = []
    for folder in sorted(f for f in folders if Path(f).name != FAILURES_DIR):  # failure cases have their own section
        for p in sorted((root / folder).rglob("*")):
            # plots/robustness.json is drawn by the report's robustness section
            if p.is_file() and p.suffix.lower() in PLOT_SUFFIXES and p.relative_to(root / folder).as_posix() != ROBUSTNESS:
                out.append(p.relative_to(root).as_posix())
    return out


def collect(root: Path, model: str) -> dict:
    root = root.resolve()
    model = Path(model).as_posix()
    model_path = root / model
    if not model_path.is_file():
        raise MedtlError(f"model {model} not found under {root}: run the pipeline (dvc repro) or pass --model")
    params = load_yaml(root / "params.yaml")
    load_yaml(root / "dvc.yaml")
    lock = lock_entries(load_yaml(root / "dvc.lock"))
    problems: list[str] = []

    clean, status = dvc_status(root)
    if clean is None:
        problems.append(str(status))
    elif not clean:
        problems.append("dvc status is not clean: the workspace does not match dvc.lock (" + ", ".join(sorted(status)) + ")")
    git = env.git_state(root)
    if git["commit"] is None:
        problems.append("not a git checkout: the code cannot be identified by commit")

    stage_names = lineage(lock, model)
    records: dict[str, dict] = {}
    for name in stage_names:
        for out in lock[name]["outs"]:
            rp = root / record_path_for(out)
            if rp.is_file():
                records[name] = load_record(rp)
                # wall-clock times are kept apart from the versioned record, in a local log keyed by its sha256
                records[name].update(run_times(rp) or {})
                records[name]["_path"] = record_path_for(out).as_posix()
                records[name]["_dvc_md5"] = lock[name]["outs"].get(records[name]["_path"])
                break
    for name in stage_names:
        if name not in records:
            expected = ", ".join(record_path_for(o).as_posix() for o in lock[name]["outs"]) or "none: the stage has no outputs"
            problems.append(f"stage {name} has no provenance record (looked for {expected})")

    # every file the lineage touched, hashed now; dvc.lock's md5 kept beside for comparison
    produced = {out for st in lock.values() for out in st["outs"]}
    artifacts: dict[str, dict] = {}
    for name in stage_names:
        for role in ("deps", "outs"):
            for path, md5 in lock[name][role].items():
                if path.endswith(RECORD_SUFFIX):
                    continue  # stage records are listed once, as the statement's byproducts
                p = root / path
                if path in artifacts or not p.exists() or not p.resolve().is_relative_to(root):
                    if path in artifacts and role == "outs":
                        artifacts[path]["stage"] = name
                    continue
                source = role == "deps" and p.is_dir() and path not in produced and not path.startswith(CODE_FOLDERS)
                d = describe(p, path, with_md5=True, list_files=not source)
                d.update(dvc_md5=md5, stage=name if role == "outs" else None, role="output" if role == "outs" else "input")
                d["kind"] = "model" if path == model else "source-folder" if source else "artifact"
                artifacts[path] = d
                if md5 and d["md5"] != md5:
                    problems.append(f"{path} does not match dvc.lock (md5 {d['md5']} in the workspace, {md5} locked)")
    for path in PIPELINE_FILES:
        if (root / path).is_file() and path not in artifacts:
            d = describe(root / path, path)
            d.update(kind={"params.yaml": "params", "uv.lock": "lockfile"}.get(path, "pipeline"), role="definition", stage=None)
            artifacts[path] = d
    if model not in artifacts:
        raise MedtlError(f"{model} is not in dvc.lock")
    if git["commit"] is not None and git["dirty"]:
        git["changed"] = withhold_source_paths(git["changed"], [p for p, d in artifacts.items() if d["kind"] == "source-folder"])
        problems.append("git working tree is dirty: " + ", ".join(git["changed"][:10]) + (" …" if len(git["changed"]) > 10 else ""))

    # outputs a stage recorded but dvc.yaml does not declare (e.g. evaluate's saliency images) are evidence too
    for name, rec in records.items():
        for o in rec.get("outputs", []):
            path = o.get("path")
            if path and path not in artifacts and (root / path).exists() and (root / path).resolve().is_relative_to(root):
                d = describe(root / path, path, with_md5=True)
                d.update(dvc_md5=None, stage=name, role="output", kind="artifact", declared=False)
                artifacts[path] = d

    # a record whose output hashes differ from the files is from another run (e.g. after dvc checkout)
    for name, rec in records.items():
        for o in rec.get("outputs", []):
            now = artifacts.get(o.get("path"))
            if now is not None and now["sha256"] != o.get("sha256"):
                problems.append(f"stage record {rec['_path']} describes another version of {o['path']} (sha256 {o.get('sha256')}, now {now['sha256']})")

    source = None
    # Only the ingest stage's own output (dvc.yaml outs, as locked) is its manifest: never a folder that merely holds a
    # file of that name, such as a source folder whose CSV is called manifest.csv.
    manifest = next((p for p in (f"{a}/{MANIFEST}" for a, d in artifacts.items()
                                 if d["type"] == "dir" and d.get("stage") == INGEST_STAGE and d.get("role") == "output")
                     if (root / p).is_file()), None)
    if manifest:
        ingest_rec = next((r for r in records.values() if any(o.get("path") == manifest.rsplit("/", 1)[0] for o in r.get("outputs", []))), {})
        summary = manifest_summary(root / manifest)
        source = {
            "manifest": manifest,
            "manifest_sha256": describe(root / manifest)["sha256"],
            "source_root": (ingest_rec.get("extra") or {}).get("source_root"),
            "description": (ingest_rec.get("extra") or {}).get("source"),
            **summary,
        }
    else:
        problems.append(f"no source manifest: the {INGEST_STAGE} stage's output holds no {MANIFEST}, so source files "
                        "cannot be traced")

    weights = None
    for path, d in artifacts.items():
        if d["type"] == "file" and Path(path).name == PROJECT_BACKBONE.name:
            weights = backbone_weights(root / path, path)
    if weights is None:
        weights = next(((r.get("extra") or {}).get("weights") for r in records.values() if (r.get("extra") or {}).get("weights")), None)

    metrics_path = evaluation_metrics(artifacts, lock, stage_names, model)
    reports_dir = (root / metrics_path).parent if metrics_path else None
    metrics = load_metrics(reports_dir) if reports_dir else None
    details = load_evaluation(reports_dir, required=False) if reports_dir else None
    if details is None and isinstance(metrics, dict) and isinstance(metrics.get("detail"), dict):
        details = metrics["detail"]  # older evaluate: detail nested in metrics.json
    plots = evaluation_plots(root, artifacts, metrics_path)
    # The robustness report and failure cases, written beside metrics.json by evaluate (None for an older evaluate).
    robustness = load_robustness(reports_dir) if reports_dir else None
    failures = load_failures(reports_dir) if reports_dir else None
    ingest_report = load_report((root / manifest).parent, required=False) if manifest else None

    model_rec = records.get(artifacts[model]["stage"]) or {}
    exp = find_experiment(root, model, artifacts[model].get("dvc_md5"), records)
    return {
        "generated": utc_now(),
        "model": {"path": model, "sha256": artifacts[model]["sha256"], "size": artifacts[model]["size"], "dvc_md5": artifacts[model]["dvc_md5"], "stage": artifacts[model]["stage"], **model_details(model_path)},
        "workspace": {"clean": not problems, "problems": problems, "dvc_status": status if clean is not None else None},
        "git": git,
        "experiment": exp,
        "params": params,
        "model_card": (params or {}).get("model_card") or {},
        "stages": [{"name": n, "cmd": lock[n]["cmd"], "deps": sorted(lock[n]["deps"]), "outs": sorted(lock[n]["outs"]), "params": lock[n]["params"], "record": records.get(n)} for n in stage_names],
        "edges": pipeline_edges({n: lock[n] for n in stage_names}),
        "artifacts": list(artifacts.values()),
        "source_data": source,
        "weights": weights,
        "transfer": transfer_evidence(root, weights),
        "environment": model_rec.get("environment") or env.environment(root),
        "hardware": model_rec.get("hardware"),
        "packages": uv_packages(root / "uv.lock"),
        "metrics_path": metrics_path,
        "metrics": metrics,
        "evaluation": details if isinstance(details, dict) else None,
        "ingest_report": ingest_report,
        "plots": plots,
        "robustness": robustness if isinstance(robustness, dict) else None,
        "failures": failures if isinstance(failures, dict) else None,
        "records": [{"path": r["_path"], "sha256": describe(root / r["_path"])["sha256"], "dvc_md5": r.get("_dvc_md5")}
                    for r in sorted(records.values(), key=lambda r: r["_path"])],
    }


OUTPUT_FILES = ("provenance.json", "ml-bom.json", "report.md", "report.html")


def write_evidence(ev: dict, root: Path, out_dir: Path, sign_key: Path | None = None, passphrase_file: Path | None = None) -> list[Path]:
    """Write provenance.json, ml-bom.json, report.md, report.html (and provenance.dsse.json when signing)."""
    from medtl.io import write_json, write_text
    from medtl.provenance import bom, report, signing, statement
    from medtl.provenance.verify import envelope_path_for

    key = signing.load_private_key(sign_key, passphrase_file) if sign_key else None  # fail before writing anything
    doc = bom.build_bom(ev)
    errors = bom.validate_bom(doc)
    if errors:
        raise MedtlError("the ML-BOM does not validate against CycloneDX 1.6: " + "; ".join(errors[:5]))
    # what a reviewer reads is written first, so that the statement (and its signature) covers it by sha256
    readable = {"ml-bom.json": doc, "report.md": report.render_markdown(ev), "report.html": report.render_html(ev, root)}
    for name, content in readable.items():
        if isinstance(content, str):
            write_text(out_dir / name, content)
        else:
            write_json(out_dir / name, content)
    stmt = statement.build_statement(ev)
    stmt["predicate"]["runDetails"]["byproducts"] += [statement.evidence_descriptor(out_dir / name) for name in readable]
    payload = (json.dumps(stmt, indent=2, allow_nan=False) + "\n").encode("utf-8")
    written = []
    path = out_dir / "provenance.json"
    write_json(path, stmt)
    written.append(path)
    stale = envelope_path_for(path)
    if key is not None:
        # the envelope signs exactly the bytes of provenance.json, which stays a plain statement for other tools
        write_json(stale, signing.sign(payload, key))
        written.append(stale)
    elif stale.exists():
        stale.unlink()  # an envelope from an earlier audit would not match the new statement
    return written + [out_dir / "ml-bom.json", out_dir / "report.md", out_dir / "report.html"]
