"""The package's layout shows the pipeline: subpackages in the data's order, no import cycles, a shallow
import graph, one owner module per on-disk artifact, and docs/architecture.md naming every module."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medtl"
# The data's path: a subpackage may import from its own and earlier ones, never from a later one.
ORDER = ["intake", "ingest", "prepare", "model", "train", "evaluate", "provenance", "deploy", "experiments"]
# Shared by every stage: errors, atomic files, params, hardware, the stage wrapper, the command, the metrics engine.
FOUNDATION = {"medtl", "medtl.errors", "medtl.io", "medtl.params", "medtl.hardware", "medtl.stage", "medtl.cli", "medtl.metrics"}
MAX_LAYERS = 7
# Each artifact's file name appears as a path only in the module that reads and writes it.
OWNERS = {
    "manifest.csv": "medtl.ingest.manifest",
    "pixels.u16": "medtl.ingest.store",
    "report.json": "medtl.ingest.report",
    "stats.json": "medtl.prepare.prepared",
    "cv.json": "medtl.prepare.prepared",
    "subset.json": "medtl.prepare.prepared",
    "backbone.pt": "medtl.model.backbone_file",
    "model.pt": "medtl.model.model_file",
    "metrics.json": "medtl.evaluate.reports",
    "evaluation.json": "medtl.evaluate.reports",
    "failures.json": "medtl.evaluate.reports",
    "predictions.csv": "medtl.evaluate.predictions",
    "val_predictions.csv": "medtl.evaluate.predictions",
    "external_predictions.csv": "medtl.evaluate.predictions",
    "operating_point.json": "medtl.evaluate.operating_point",
}
# Files of the same name that are other artifacts: a command's own output, dvclive's training metrics,
# the chart data of evaluate's plots folder.
OTHER_ARTIFACTS = {
    ("medtl.deploy.predict", "predictions.csv"),  # `medtl predict --out`
    ("medtl.experiments.exps", "dvclive/metrics.json"),  # written by dvclive in fine-tune
}


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(body: list[ast.stmt], lazy: bool):
    """Import nodes run when the module loads (in if/try blocks too); with `lazy`, those in functions as well.
    Imports only for type checkers are not imports at run time."""
    for node in body:
        if _type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if lazy or isinstance(node, ast.ClassDef):
                yield from _imports(node.body, lazy)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _imports(inner, lazy)


@functools.cache
def graph(lazy: bool) -> dict[str, frozenset[str]]:
    mods = modules()
    out = {}
    for name, path in mods.items():
        deps = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")).body, lazy):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
        out[name] = frozenset(d for d in deps if d in mods and d != name)
    return out


def _cycle(g: dict[str, frozenset[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(g[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(g):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle_even_through_imports_inside_functions():
    assert _cycle(graph(lazy=True)) is None, " -> ".join(_cycle(graph(lazy=True)))


def test_import_graph_is_at_most_seven_layers_deep():
    g = graph(lazy=False)

    @functools.cache
    def chain(v: str) -> tuple[str, ...]:
        return (v,) + max((chain(w) for w in g[v]), key=len, default=())

    longest = max((chain(v) for v in g), key=len)
    assert len(longest) <= MAX_LAYERS, " -> ".join(longest)


def _package(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def test_modules_sit_in_foundation_or_a_pipeline_subpackage():
    stray = sorted(n for n in modules() if n not in FOUNDATION and _package(n) is None)
    assert not stray, f"modules outside the pipeline's subpackages: {stray}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(ORDER)


def test_no_subpackage_imports_a_later_one():
    backwards = []
    for name, deps in graph(lazy=True).items():
        here = _package(name)
        for d in deps:
            there = _package(d)
            if here and there and ORDER.index(there) > ORDER.index(here):
                backwards.append(f"{name} -> {d}")
    assert not backwards, backwards


STAGE_MODULES = ["medtl.ingest.ingest", "medtl.prepare.preprocess", "medtl.train.adaptation", "medtl.train.finetune",
                 "medtl.evaluate.evaluation"]


def test_no_stage_module_imports_another():
    g = graph(lazy=True)
    for stage in STAGE_MODULES:
        seen, todo = set(), [stage]
        while todo:
            for d in g[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        assert not seen & (set(STAGE_MODULES) - {stage}), f"{stage} imports {sorted(seen & set(STAGE_MODULES))}"


def _path_constants(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            yield n.value


def test_every_artifact_has_one_owner_module():
    misplaced = []
    for name, path in modules().items():
        for value in _path_constants(path):
            for artifact, owner in OWNERS.items():
                if (value == artifact or value.endswith("/" + artifact)) and name != owner \
                        and (name, value) not in OTHER_ARTIFACTS and (name, artifact) not in OTHER_ARTIFACTS:
                    misplaced.append(f"{name}: {value!r} (owner: {owner})")
    assert not misplaced, misplaced


def test_the_owners_exist_and_name_their_artifact():
    mods = modules()
    for artifact, owner in OWNERS.items():
        assert owner in mods, owner
        assert any(v == artifact or v.endswith("/" + artifact) for v in _path_constants(mods[owner])), (owner, artifact)


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_architecture_doc_names_every_module_and_only_real_ones():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    tabled = set(re.findall(r"^\| `(medtl(?:\.\w+)*)` \|", text, flags=re.M))
    missing = sorted(set(modules()) - tabled - {"medtl"} - {n for n in modules() if n.count(".") == 1 and _package(n)})
    assert not missing, f"docs/architecture.md has no row for {missing}"
    named = set(re.findall(r"`(medtl(?:\.[a-z_0-9]+)+)", text))
    mods = modules()
    unknown = sorted(n for n in named if n not in mods and n.rsplit(".", 1)[0] not in mods)
    assert not unknown, f"docs/architecture.md names modules that do not exist: {unknown}"


def test_every_source_kind_is_declared_in_one_registry_and_one_section():
    """A source kind is its module, its entry in SOURCES and its section in SourceSections: ingest, sites,
    external sets and target images all take the kind from those, none lists the kinds itself."""
    import dataclasses
    import importlib
    import typing

    from medtl.evaluate.external import ExternalSet
    from medtl.ingest.ingest import IngestParams
    from medtl.intake.sites import SiteSource
    from medtl.intake.sources import SOURCES, source_inputs
    from medtl.intake.sources.sections import SourceSections
    from medtl.train.target import TargetParams

    assert [f.name for f in dataclasses.fields(SourceSections)] == list(SOURCES)
    for name, module in SOURCES.items():
        section = typing.get_type_hints(SourceSections)[name]
        assert callable(importlib.import_module(module).open_source)
        assert isinstance(section.PATHS, tuple), f"{section.__name__} declares no PATHS"
    for cls in (IngestParams, SiteSource, ExternalSet, TargetParams):
        assert issubclass(cls, SourceSections)
        assert set(SOURCES) <= set(typing.get_args(typing.get_type_hints(cls)["source"])), cls
    # the paths a kind declares are what dvc tracks for it
    params = dataclasses.replace(IngestParams(), source="csv")
    params = dataclasses.replace(params, csv=dataclasses.replace(params.csv, manifest="m.csv", root="imgs"))
    assert source_inputs(params) == ["m.csv", "imgs"]
