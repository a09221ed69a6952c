"""`medtl verify`: check an audit's evidence against the files, offline.

Every artifact the statement lists that is present is re-hashed (folders file
by file, so a change is named down to the file); source files are re-hashed
from the manifest; dvc.lock and the git commit are compared; a DSSE
signature is checked when one exists. Absent artifacts are skipped and
counted: an auditor may hold only part of the project; the subject (the
model) must be present.

Nothing the evidence names is trusted: a name that is absolute, climbs out of
--root, or reaches outside it through a symlink is refused and reported, and
never opened.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import yaml

from medtl.errors import MedtlError
from medtl.provenance import environment as env
from medtl.provenance import signing
from medtl.provenance.hashing import combined_digest, dvc_dir_md5, file_digests, tree_files
from medtl.provenance.statement import PREDICATE_TYPE, STATEMENT_TYPE

ENVELOPE_SUFFIX = ".dsse.json"


@dataclass
class Result:
    mismatches: list[str] = field(default_factory=list)
    checked: int = 0
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seen: set[Path] = field(default_factory=set)
    pending_folders: list = field(default_factory=list)
    digests: dict[Path, tuple[str, str, int]] = field(default_factory=dict)  # source folders whose digest changed: (name, evidence, now)  # files already re-hashed, so a file listed twice is reported once
    md5s: dict[Path, str] = field(default_factory=dict)
    changed: set[Path] = field(default_factory=set)  # files already reported, so their DVC md5 is not reported again

    def mismatch(self, what: str, expected: str, actual: str) -> None:
        self.mismatches.append(f"MISMATCH {what}: expected {expected}, actual {actual}")

    def refuse(self, name, why: str) -> None:
        self.mismatches.append(f"MISMATCH {name!s}: expected a path inside the project root, actual {why} (refused, not read)")


def outside(root: Path, name) -> str | None:
    """Why `name` (from the evidence) may not be opened under `root`, or None when it stays inside it."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "not a file name"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "an absolute path"
    base = root.resolve()
    if ".." in PurePosixPath(name).parts and not (base / name).resolve().is_relative_to(base):
        return "a path that climbs out of the root"
    # resolve() follows every symlink on the way: a link inside the project pointing elsewhere is caught here
    if not (root / name).resolve().is_relative_to(base):
        return f"a symlink to {(root / name).resolve()}, outside the root"
    return None


def envelope_path_for(statement_path: str | Path) -> Path:
    """provenance.json -> provenance.dsse.json"""
    p = Path(statement_path)
    return p.with_name(p.name.removesuffix(".json") + ENVELOPE_SUFFIX)


def load_evidence(path: Path) -> tuple[dict, bytes, dict | None, bytes | None]:
    """(statement, its bytes, DSSE envelope or None, the envelope's payload), from provenance.json or the envelope itself."""
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise MedtlError(f"evidence {path} cannot be read as JSON: {e}") from e
    envelope = payload = None
    if isinstance(data, dict) and "payloadType" in data:
        envelope, raw = signing.read_envelope(path)
        payload = raw
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise MedtlError(f"the payload of {path} is not JSON: {e}") from e
    elif envelope_path_for(path).is_file():
        envelope, payload = signing.read_envelope(envelope_path_for(path))
    if not isinstance(data, dict) or data.get("_type") != STATEMENT_TYPE or data.get("predicateType") != PREDICATE_TYPE:
        raise MedtlError(f"{path} is not an in-toto Statement v1 with an SLSA provenance v1 predicate (see `medtl audit`)")
    return data, raw, envelope, payload


def _check_file(res: Result, root: Path, name: str, expected: str) -> str | None:
    """Compare one file's sha256; returns its md5 when present."""
    why = outside(root, name)
    if why:
        res.refuse(name, why)
        return None
    p = root / name
    if not p.is_file():
        res.mismatch(name, f"sha256 {expected}", "missing")
        return None
    if p.resolve() in res.seen and p.resolve() in res.md5s:
        # a file listed twice (data/prepared/train.npy inside data/prepared) is checked and reported once
        return res.md5s[p.resolve()]
    sha, md5, _ = file_digests(p)
    res.md5s[p.resolve()] = md5
    res.checked += 1
    res.seen.add(p.resolve())
    if sha != expected:
        res.mismatch(name, f"sha256 {expected}", f"sha256 {sha}")
        res.changed.add(p.resolve())
    return md5


def _check_artifact(res: Result, root: Path, desc: dict, required: bool = False) -> str | None:
    """Re-hash a file or folder artifact; returns its current DVC md5 when it could be computed."""
    name, ann = desc.get("name"), desc.get("annotations") or {}
    why = outside(root, name)
    if why:
        res.refuse(name, why)
        return None
    p = root / name
    if not p.exists():
        if required:
            res.mismatch(name, f"sha256 {(desc.get('digest') or {}).get('sha256')}", "missing (the subject must be present under --root)")
        else:
            res.skipped.append(name)
        return None
    expected_sha = (desc.get("digest") or {}).get("sha256")
    if not isinstance(expected_sha, str):
        res.mismatch(name, "a sha256 digest in the evidence", "none")
        return None
    if ann.get("type") != "dir":
        return _check_file(res, root, name, expected_sha)
    if not p.is_dir():
        res.mismatch(name, "a folder", "a file")
        return None
    if ann.get("medtl.kind") == "source-folder":
        return _check_source_folder(res, root, desc)
    expected = ann.get("files") or {}
    present = set(tree_files(p))
    md5s = {}
    for rel, sha in expected.items():
        md5 = _check_file(res, root, f"{name}/{rel}", sha)
        if md5:
            md5s[rel] = md5
    for rel in sorted(present - set(expected)):
        res.mismatches.append(f"MISMATCH {name}/{rel}: expected no such file, actual an extra file")
    return dvc_dir_md5(md5s) if not (present ^ set(expected)) and len(md5s) == len(expected) else None


def _digests(res: Result, path: Path) -> tuple[str, str, int]:
    """file_digests, once per file: the source folder and the manifest check read the same files."""
    key = path.resolve()
    if key not in res.digests:
        res.digests[key] = file_digests(path)
    return res.digests[key]


def _check_source_folder(res: Result, root: Path, desc: dict) -> str | None:
    """A folder of source data: the evidence holds its digest and file count, not its file names."""
    name = desc["name"]
    files, md5s = {}, {}
    base, escaped = root.resolve(), 0
    for rel in tree_files(root / name):
        if not (root / name / rel).resolve().is_relative_to(base):  # never opened; its path is not repeated either
            escaped += 1
            continue
        files[rel], md5s[rel], _ = _digests(res, root / name / rel)
    if escaped:
        res.refuse(name, f"{escaped} symbolic link(s) inside it lead outside the root; they were not opened")
        return None
    now = {"sha256": combined_digest(files), "md5": dvc_dir_md5(md5s), "nfiles": len(files)}
    res.checked += 1
    if now["sha256"] != desc["digest"]["sha256"]:
        # held back: the manifest check names the changed file; reported only if it names none
        res.pending_folders.append((name, desc, now))
        res.changed.add((root / name).resolve())
    return now["md5"]


def _source_base(res: Result, root: Path, ann: dict, source_root: Path | None) -> Path | None:
    if source_root is not None:
        return source_root  # given on the command line by the auditor: trusted
    recorded = ann.get("source_root")
    why = outside(root, recorded)
    if why:
        res.skipped.append(f"source files (recorded source root {recorded!r} is {why}; pass --source-root DIR to check them)")
        return None
    return root / recorded


def _check_sources(res: Result, root: Path, desc: dict, source_root: Path | None) -> None:
    ann = desc.get("annotations") or {}
    why = outside(root, ann.get("manifest"))
    if why:
        res.refuse(ann.get("manifest"), why)
        return
    manifest = root / ann["manifest"]
    if not manifest.is_file():
        res.skipped.append(f"source files (no {ann.get('manifest')})")
        return
    sha, _, _ = file_digests(manifest)
    if sha != desc["digest"]["sha256"]:
        return  # the manifest's own mismatch is reported with its artifact; its rows are not to be trusted
    if source_root is None and not ann.get("source_root"):
        # generated sources (the demo) keep no files: their manifest rows are checked as part of the manifest
        res.skipped.append(f"{ann.get('images', 'the')} source files (generated at ingest and not kept; pass --source-root if you hold them)")
        return
    base = _source_base(res, root, ann, source_root)
    if base is None:
        return
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise MedtlError(f"source manifest {manifest} cannot be read: {e}") from e
    before = len(res.mismatches)
    if rows and "source_path" in rows[0]:
        _check_sources_by_path(res, base, rows)
    else:
        _check_sources_by_hash(res, base, rows)
    if len(res.mismatches) > before:
        held = base.resolve()
        res.pending_folders = [f for f in res.pending_folders if not held.is_relative_to((root / f[0]).resolve())]


def _check_sources_by_path(res: Result, base: Path, rows: list[dict]) -> None:
    """Manifests that name each source file by its relative path."""
    missing = 0
    for row in rows:
        why = outside(base, row.get("source_path"))
        if why:
            res.mismatches.append(f"MISMATCH source {row.get('source_path')!s}: expected a path inside {base}, actual {why} (refused, not read)")
            continue
        p = base / row["source_path"]
        if not p.is_file():
            missing += 1
            continue
        if p.resolve() in res.seen:
            continue
        actual, _, _ = file_digests(p)
        res.checked += 1
        if actual != row["sha256"]:
            res.mismatch(f"source {row['source_path']}", f"sha256 {row['sha256']}", f"sha256 {actual}")
    if missing:
        res.skipped.append(f"{missing} source files not present under {base}")


def _check_sources_by_hash(res: Result, base: Path, rows: list[dict]) -> None:
    """Manifests that name source files by a keyed pseudonym (source_ref): files are matched by their bytes.

    Every manifest row must find a file with its sha256 under `base`. A row
    that finds none is reported with its source_ref, and with the files under
    `base` whose bytes are in no row: on the auditor's own machine, those
    name the changed file.
    """
    if not base.is_dir():
        res.skipped.append(f"{len(rows)} source files (no folder {base}; pass --source-root DIR)")
        return
    found: dict[str, list[str]] = defaultdict(list)
    for rel in tree_files(base):
        sha, _, _ = _digests(res, base / rel)
        found[sha].append(rel)
    wanted = {r.get("sha256") for r in rows}
    strays = sorted(rel for sha, rels in found.items() if sha not in wanted for rel in rels)
    unmatched = [r for r in rows if r.get("sha256") not in found]
    res.checked += len(rows) - len(unmatched)
    if len(unmatched) == len(rows) and rows:
        res.mismatches.append(f"MISMATCH source files: expected {len(rows)} files with the manifest's sha256 under {base}, actual none "
                              "(is this the folder ingest read? pass --source-root DIR)")
        return
    hint = f"; files under {base} whose bytes are in no manifest row: {', '.join(strays[:10])}{' …' if len(strays) > 10 else ''}" if strays else ""
    for r in unmatched:
        ref = r.get("source_ref") or r.get("image_id") or "?"
        res.mismatch(f"source {ref}", f"sha256 {r.get('sha256')}", f"no file with these bytes under {base}{hint}")


def _lock_md5s(root: Path) -> dict[str, str] | None:
    p = root / "dvc.lock"
    if not p.is_file():
        return None
    try:
        lock = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MedtlError(f"{p} cannot be parsed as YAML: {e}") from e
    out = {}
    for st in (lock.get("stages") or {}).values():
        for o in (st or {}).get("outs") or []:
            out[o["path"]] = o.get("md5")
    return out


def verify(evidence: str | Path, root: str | Path = ".", pub_key: str | Path | None = None, source_root: str | Path | None = None) -> Result:
    evidence, root = Path(evidence), Path(root)
    statement, raw, envelope, payload = load_evidence(evidence)
    res = Result()

    if envelope is not None:
        if payload != raw:
            res.mismatches.append(f"MISMATCH signature: {evidence.name} differs from the payload signed in {envelope_path_for(evidence).name}")
        elif pub_key is None:
            res.mismatches.append("MISMATCH signature: the evidence is signed but no --pub-key was given to check it")
        else:
            why = signing.check_envelope(envelope, payload, signing.load_public_key(pub_key))
            if why:
                res.mismatches.append(f"MISMATCH signature: {why}")
            else:
                res.notes.append(f"signature valid (key {signing.keyid(signing.load_public_key(pub_key))[:16]}…)")
    elif pub_key is not None:
        res.mismatches.append(f"MISMATCH signature: --pub-key given but {evidence.name} is not signed (no {envelope_path_for(evidence).name})")

    pred = statement.get("predicate") or {}
    deps = (pred.get("buildDefinition") or {}).get("resolvedDependencies") or []
    byproducts = (pred.get("runDetails") or {}).get("byproducts") or []
    current_lock = _lock_md5s(root)
    sources: list[dict] = []  # after the artifacts, so a source file inside one is reported once, by its path
    subjects = statement.get("subject") or []
    if not subjects:
        res.mismatches.append("MISMATCH subject: expected the model in the statement's subject, actual none")
    for desc in subjects:
        if not isinstance(desc, dict) or not isinstance((desc.get("digest") or {}).get("sha256"), str):
            res.mismatches.append(f"MISMATCH subject {desc.get('name') if isinstance(desc, dict) else desc!s}: expected a name and a sha256 digest")
            continue
        _check_artifact(res, root, desc, required=True)
        if (desc.get("annotations") or {}).get("dvc_md5") and current_lock is not None:
            locked, now = desc["annotations"]["dvc_md5"], current_lock.get(desc["name"])
            if now is not None and now != locked:
                res.mismatch(f"dvc.lock {desc['name']}", f"md5 {locked}", f"md5 {now}")
    for desc in deps + byproducts:
        if not isinstance(desc, dict):
            continue
        ann = desc.get("annotations") or {}
        kind = ann.get("medtl.kind")
        if kind in ("artifact", "source-folder", "params", "pipeline", "lockfile", "stage-record"):
            before = len(res.mismatches)
            md5 = _check_artifact(res, root, desc)
            locked = ann.get("dvc_md5")
            if locked and current_lock is not None and desc["name"] in current_lock and current_lock[desc["name"]] != locked:
                res.mismatch(f"dvc.lock {desc['name']}", f"md5 {locked}", f"md5 {current_lock[desc['name']]}")
            elif locked and md5 and md5 != locked and len(res.mismatches) == before and (root / desc["name"]).resolve() not in res.changed:
                res.mismatch(f"{desc['name']} (dvc md5)", f"md5 {locked}", f"md5 {md5}")
        elif kind == "source-data":
            sources.append(desc)
        elif kind == "evidence":
            # the audit's own readable files (ML-BOM, report): beside the statement, wherever it was copied to
            sha, name = (desc.get("digest") or {}).get("sha256"), desc.get("name")
            if isinstance(name, str) and not outside(evidence.parent, name) and not (evidence.parent / name).exists():
                res.skipped.append(f"{name} (not beside {evidence.name})")
            elif isinstance(sha, str):
                _check_file(res, evidence.parent, name, sha)
            else:
                res.mismatch(str(desc.get("name")), "a sha256 digest in the evidence", "none")
        elif kind == "code":
            expected = (desc.get("digest") or {}).get("gitCommit")
            actual = env._git(["rev-parse", "HEAD"], root)
            if actual is None:
                res.skipped.append("git commit (not a git checkout)")
            elif actual != expected:
                res.mismatch("git commit", expected, actual)
            else:
                res.checked += 1
    for desc in sources:
        _check_sources(res, root, desc, Path(source_root) if source_root else None)
    for name, desc, now in res.pending_folders:
        ann = desc.get("annotations") or {}
        res.mismatch(name, f"sha256 {desc['digest']['sha256']} over {ann.get('nfiles', '?')} files",
                      f"sha256 {now['sha256']} over {now['nfiles']} files (a file no manifest row lists, e.g. a quarantined one, changed, appeared or went)")
    if current_lock is None:
        res.skipped.append("dvc.lock comparison (no dvc.lock)")
    return res
