"""The default install (medtl + its `train` extra, as uv.lock resolves it) holds no GPL-family package.

Policy, for device makers who ship medtl inside a product:
- GPL, AGPL, LGPL and SSPL fail. LGPL too: its relinking obligation is awkward
  in a frozen or embedded product, so an LGPL package needs a reviewed change
  to this policy, not a quiet pass.
- A dual licence passes when one of its alternatives passes (the user picks it).
- GPL with a linking exception passes: using the library unmodified puts no
  terms on medtl (pygit2, through DVC's git backend).
- File-level copyleft (MPL-2.0, EPL) passes: it binds only changes to those files.
- A package whose metadata names no licence at all must be in
  tests/licence_exceptions.toml with the licence read from its own documents.
The licence is read from the installed metadata: License-Expression, else the
License field, else the trove classifiers.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COPYLEFT = re.compile(r"\b(A|L)?GPL|General Public License|\bSSPL\b", re.IGNORECASE)
EXCEPTION = re.compile(r"linking exception|WITH\s+\S*(linking|classpath)\S*-exception", re.IGNORECASE)


def default_install() -> dict[str, bool]:
    """Every package the base install plus the `train` extra pulls in, from uv.lock -> whether it is conditional (marker)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    root = packages["medtl"]
    todo = [(d, False) for d in root.get("dependencies", []) + root["optional-dependencies"]["train"]]
    conditional: dict[str, bool] = {}
    expanded: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        dep, under_marker = todo.pop()
        name, marked = dep["name"], under_marker or "marker" in dep
        conditional[name] = conditional.get(name, True) and marked
        key = (name, tuple(dep.get("extra", [])))
        if (key, marked) in expanded:
            continue
        expanded.add((key, marked))
        pkg = packages[name]
        edges = list(pkg.get("dependencies", []))
        for extra in dep.get("extra", []):
            edges += pkg.get("optional-dependencies", {}).get(extra, [])
        todo += [(e, marked) for e in edges]
    return conditional


def licence_of(meta) -> str:
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return expression
    field = (meta.get("License") or "").strip()
    classifiers = " OR ".join(c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                              if c.startswith("License ::") and not c.endswith(":: OSI Approved"))
    if field.upper() == "UNKNOWN":
        field = ""
    if field and "\n" not in field and len(field) <= 100:
        return field
    if field:
        # A pasted licence text: the classifiers name it; a copyleft text says so in its first lines.
        head = " ".join(field.splitlines()[:3])
        named = [classifiers or field.splitlines()[0][:100]]
        return " AND ".join(named + ([head] if COPYLEFT.search(head) else []))
    return classifiers


def passes(licence: str) -> bool:
    alternatives = re.split(r"\s+OR\s+|\s*\|\s*|\bdual\b", licence, flags=re.IGNORECASE)
    return any(all(not COPYLEFT.search(part) or EXCEPTION.search(part) for part in re.split(r"\s+AND\s+", alt))
               for alt in alternatives if alt.strip())


def test_policy_reads_licences_as_intended():
    for ok in ("MIT", "Apache-2.0 OR GPL-2.0-or-later", "GPLv2 | EPLv1", "EPL-2.0 OR GPL-2.0-or-later",
               "GPLv2 with linking exception", "MPL-2.0 AND (Apache-2.0 OR MIT)", "LicenseRef-NVIDIA-Proprietary"):
        assert passes(ok), ok
    for bad in ("GPL-3.0-only", "GNU General Public License v3 (GPLv3)", "AGPL-3.0", "LGPL-2.1-or-later",
                "GNU Lesser General Public License v3 (LGPLv3)", "MIT AND GPL-3.0-only", "SSPL-1.0"):
        assert not passes(bad), bad


def test_default_install_has_no_gpl_family_package():
    exceptions = tomllib.loads((ROOT / "tests" / "licence_exceptions.toml").read_text())
    failures, unknown, absent = [], [], []
    for name, conditional in sorted(default_install().items()):
        try:
            meta = md.metadata(name)
        except md.PackageNotFoundError:
            # Only platform-specific packages (pywin32, ...) may be missing from this environment.
            (absent if not conditional else []).append(name)
            continue
        licence = licence_of(meta)
        if not licence:
            if name not in exceptions:
                unknown.append(name)
            elif not passes(exceptions[name]["licence"]):
                failures.append(f"{name}: {exceptions[name]['licence']} (from licence_exceptions.toml)")
        elif not passes(licence):
            failures.append(f"{name} {meta['Version']}: {licence}")
    assert not absent, f"not installed, run `make env`: {absent}"
    assert not failures, f"copyleft in the default install: {failures}"
    assert not unknown, f"no licence in the metadata of {unknown}: add them to tests/licence_exceptions.toml with their licence"


def test_exceptions_are_only_for_packages_without_licence_metadata():
    exceptions = tomllib.loads((ROOT / "tests" / "licence_exceptions.toml").read_text())
    for name, entry in exceptions.items():
        assert entry.get("licence") and entry.get("source"), name
        try:
            meta = md.metadata(name)
        except md.PackageNotFoundError:
            continue
        assert not licence_of(meta), f"{name} names its licence itself ({licence_of(meta)}); remove it from the exceptions"


def test_readme_table_lists_every_direct_dependency():
    """Every package pyproject.toml names has a row; base and train rows pass the policy, other extras state their licence."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"base": project["dependencies"], **project["optional-dependencies"]}
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Dependencies and licences"):]
    for group, reqs in groups.items():
        for req in reqs:
            name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
            row = re.search(rf"^\| `{re.escape(name)}` \| ([^|]*)\|([^|]*)\|", table, re.MULTILINE | re.IGNORECASE)
            assert row, f"README's dependency table has no row for {name}"
            install, licence = row.group(1).strip(), row.group(2).strip()
            assert install == group, (name, install, group)
            if group in ("base", "train"):
                assert passes(licence), (name, licence)
                assert licence_of(md.metadata(name)), name
            else:  # an opt-in extra: its licence is stated, whatever it is
                assert licence, name
