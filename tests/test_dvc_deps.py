"""dvc.yaml deps are complete by construction: every medtl module a stage can run is a dep of that stage.

The import closure of each stage script is derived from the source (imports at
any depth, including those inside functions, and module names held in strings
for registries such as `medtl.intake.sources.SOURCES`). A module missing from a
stage's deps would let an edit to it leave stale outputs that `dvc status`
calls up to date; a listed module outside the closure reruns a stage for
nothing.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODULE_NAME = re.compile(r"^medtl(\.[A-Za-z_]\w*)+$")
# Stage provenance records are written beside the outputs but are not DVC outputs
# (they carry wall-clock times), so the code that writes them is not a dep.
RECORD_ONLY = ROOT / "medtl" / "provenance"


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from medtl import hardware` imports the submodule medtl.hardware
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.match(node.value):
            names.add(node.value)
    return {n for n in names if n == "medtl" or n.startswith("medtl.")}


def closure(script: Path) -> set[Path]:
    files: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for name in imported_names(path):
            for parent in with_parents(name):
                found = module_file(parent)
                if found is not None and found not in files:
                    files.add(found)
                    todo.append(found)
    return files


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def script_of(stage: dict) -> Path:
    scripts = [w for w in stage["cmd"].split() if w.startswith("stages/") and w.endswith(".py")]
    assert len(scripts) == 1, f"cannot find the stage script in {stage['cmd']!r}"
    return ROOT / scripts[0]


def dep_paths(stage: dict) -> list[Path]:
    return [ROOT / (d if isinstance(d, str) else next(iter(d))) for d in stage.get("deps", [])]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_cover_the_code_it_runs(name):
    stage = stages()[name]
    script = script_of(stage)
    deps = dep_paths(stage)
    assert covered(script, deps), f"stage {name}: its script {script.relative_to(ROOT)} is not a dep"
    needed = {p for p in closure(script) if RECORD_ONLY not in p.parents}
    missing = sorted(str(p.relative_to(ROOT)) for p in needed if not covered(p, deps))
    assert not missing, f"stage {name} runs these modules but does not list them in dvc.yaml deps: {missing}"
    code_deps = [d for d in deps if d.suffix == ".py" and ROOT / "medtl" in d.parents]
    unused = sorted(str(d.relative_to(ROOT)) for d in code_deps if d not in needed)
    assert not unused, f"stage {name} lists modules it never imports (needless reruns): {unused}"


def test_closure_follows_lazy_and_registry_imports():
    """The derivation itself: a function-level import and a registry string both count."""
    ingest = closure(ROOT / "stages" / "ingest.py")
    assert ROOT / "medtl" / "intake" / "sources" / "dicom.py" in ingest  # only named in SOURCES
    assert ROOT / "medtl" / "intake" / "readers" / "dicom.py" in ingest
