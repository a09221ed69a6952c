"""`medtl audit`, `medtl verify`, `medtl keygen`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from medtl.cli import EXIT_CHECK_FAILED, EXIT_OK, folder_argument
from medtl.errors import MedtlError
from medtl.model.model_file import PROJECT_MODEL

# `medtl verify --json`: one object on stdout; the format is versioned so scripts can rely on it.
# /2: each mismatch is an object {path, expected, actual, message} (in /1 it was the message string).
VERIFY_JSON_FORMAT = "medtl-verify/2"
_MISMATCH = re.compile(r"^MISMATCH (?P<path>.+?): expected (?P<expected>.+?), actual (?P<actual>.+)$", re.S)


def register(subparsers) -> None:
    p = subparsers.add_parser("audit", help="write provenance, ML-BOM and a model card for a model",
                              description="Walk from a model back through dvc.lock and the stage records to the source files, and write "
                                          "provenance.json (in-toto/SLSA), ml-bom.json (CycloneDX 1.6), report.md and report.html.")
    p.add_argument("--model", default=str(PROJECT_MODEL), help="model file written by the pipeline (default: %(default)s)")
    p.add_argument("--out", type=folder_argument, default="reports/audit", help="output folder (default: %(default)s)")
    p.add_argument("--allow-dirty", action="store_true", help="exit 0 even if the workspace does not match dvc.lock or git (the outputs still say so)")
    p.add_argument("--sign-key", type=Path, help="Ed25519 PEM private key: also write provenance.dsse.json, a DSSE envelope signing provenance.json")
    p.add_argument("--passphrase-file", type=Path, help="file whose first line is the signing key's passphrase (default: $MEDTL_SIGNING_PASSPHRASE, else asked)")
    p.set_defaults(func=cmd_audit)

    p = subparsers.add_parser("verify", help="check audit evidence against the files, offline",
                              description="Re-hash every artifact listed in the evidence that is present, check the signature, "
                                          "compare with dvc.lock and the git commit. Exit 0 only when everything matches.")
    p.add_argument("evidence", type=Path, help="provenance.json or the audit folder holding it (a sibling provenance.dsse.json is checked too), or a DSSE envelope")
    p.add_argument("--pub-key", type=Path, help="Ed25519 PEM public key of the signer")
    p.add_argument("--root", type=Path, default=Path("."), help="project root the artifact paths are relative to (default: current folder)")
    p.add_argument("--source-root", type=Path, help="folder of the source files ingest read (default: as recorded by ingest)")
    p.add_argument("--json", action="store_true", help=f"print one JSON object ({VERIFY_JSON_FORMAT}) instead of lines of text")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("keygen", help="make an Ed25519 key pair for signing audits")
    p.add_argument("--out", type=folder_argument, default=Path("."), help="folder for medtl-signing.key and medtl-signing.pub (default: current folder)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.add_argument("--passphrase-file", type=Path, help="file whose first line is the passphrase that encrypts the private key (default: $MEDTL_SIGNING_PASSPHRASE, else asked twice)")
    p.add_argument("--no-passphrase", action="store_true", help="write the private key unencrypted (e.g. for a secret store that protects it)")
    p.set_defaults(func=cmd_keygen)


def cmd_audit(args: argparse.Namespace) -> int:
    from medtl.provenance.audit import collect, write_evidence

    root = Path(".").resolve()
    ev = collect(root, args.model)
    written = write_evidence(ev, root, Path(args.out), args.sign_key, args.passphrase_file)
    for p in written:
        print(p)
    ws = ev["workspace"]
    if not ws["clean"]:
        for problem in ws["problems"]:
            print(f"warning: {problem}")
        if not args.allow_dirty:
            print("medtl audit: the workspace is not clean; the evidence says so. Commit, `dvc repro`, or pass --allow-dirty.")
            return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from medtl.provenance.verify import verify

    if args.evidence.is_dir():  # the audit's folder: its provenance.json
        args.evidence = args.evidence / "provenance.json"
    if not args.evidence.is_file():
        raise MedtlError(f"evidence {args.evidence} not found (write it with `medtl audit`)")
    res = verify(args.evidence, args.root, args.pub_key, args.source_root)
    if args.json:
        report = verify_json(res, args.evidence, args.root)
        print(json.dumps(report, indent=2, sort_keys=True))
        return report["exit_code"]
    for line in res.mismatches:
        print(line)
    for note in res.notes:
        print(note)
    if res.skipped:
        print(f"skipped (not present): {', '.join(res.skipped)}")
    if res.checked == 0 and not res.mismatches:
        print("nothing was checked: none of the listed artifacts is present under", args.root)
        return 1
    print(f"{'FAILED' if res.mismatches else 'OK'}: {res.checked} files checked, {len(res.mismatches)} mismatches")
    return 1 if res.mismatches else 0


def _plain(value):
    """A JSON value for `value`: lists, strings, numbers, flags, and mappings with string keys; paths as strings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def verify_json(res, evidence: Path, root: Path) -> dict:
    """verify's result as plain JSON: its public fields, the outcome and the exit code.

    Sets and mappings keyed by path are verify's bookkeeping (what was already
    hashed or reported), not findings, and are left out.
    """
    fields = {}
    for f in dataclasses.fields(res):
        value = getattr(res, f.name)
        if isinstance(value, (set, frozenset)) or str(f.type).replace(" ", "").startswith(("set[", "dict[Path")):
            continue
        fields[f.name] = _plain(value)
    fields["mismatches"] = [mismatch_record(m) for m in res.mismatches]
    if res.mismatches:
        status, code = "failed", EXIT_CHECK_FAILED
    elif res.checked == 0:
        status, code = "nothing_checked", EXIT_CHECK_FAILED
    else:
        status, code = "ok", EXIT_OK
    return {"format": VERIFY_JSON_FORMAT, "evidence": str(evidence), "root": str(root), "status": status,
            "exit_code": code, **fields}


def mismatch_record(line: str) -> dict:
    """A mismatch line ("MISMATCH <path>: expected <e>, actual <a>") as {path, expected, actual, message}.

    A line of another shape (e.g. "MISMATCH signature: no --pub-key given") keeps its path, with null
    expected and actual and the explanation in message.
    """
    text = str(line)
    m = _MISMATCH.match(text)
    if m:
        return {"path": m["path"], "expected": m["expected"], "actual": m["actual"], "message": text}
    head, _, rest = text.removeprefix("MISMATCH ").partition(": ")
    return {"path": head, "expected": None, "actual": None, "message": text}


def cmd_keygen(args: argparse.Namespace) -> int:
    from medtl.provenance.signing import keygen, new_passphrase

    if args.no_passphrase and args.passphrase_file:
        raise MedtlError("--no-passphrase and --passphrase-file contradict each other; choose one")
    private, public = keygen(args.out, args.force, None if args.no_passphrase else new_passphrase(args.passphrase_file))
    print(f"private key: {private} ({'unencrypted: ' if args.no_passphrase else 'encrypted with the passphrase; '}"
          f"keep it secret; sign with `medtl audit --sign-key {private}`)")
    print(f"public key:  {public} (give it to auditors: `medtl verify ... --pub-key {public}`)")
    return 0
