"""Bad params, generated: every wrong key, type or value stops with one paragraph naming the key, and writes nothing.

The generator knows only the dataclasses' type hints, not the validator, so a
case the validator forgot to reject fails the test instead of being skipped.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medtl.errors import ParamsError
from medtl.evaluate.evaluation import EvaluateParams
from medtl.ingest.ingest import IngestParams
from medtl.params import load_section
from medtl.prepare.preprocess import PreprocessParams
from medtl.train.adaptation import PretrainParams
from medtl.train.finetune import FinetuneParams
from tests.project import ROOT, TINY_PARAMS, deep_update

SECTIONS = {"ingest": IngestParams, "preprocess": PreprocessParams, "pretrain": PretrainParams,
            "finetune": FinetuneParams, "evaluate": EvaluateParams}
STAGE_OF = {"ingest": "ingest", "preprocess": "preprocess", "pretrain": "pretrain-adapt",
            "finetune": "fine-tune", "evaluate": "evaluate"}
BASE = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS)

# Values of every YAML kind; which of them are wrong for a key is decided from its type hint alone.
CANDIDATES: list[Any] = ["oops", "", 3, -7, 2.5, True, False, None, [1, "a"], {"k": 1}, float("nan"), float("inf")]

# Right type, wrong value: each must be refused by the section's range checks.
OUT_OF_RANGE: list[tuple[str, Any]] = [
    ("ingest.max_quarantine_fraction", 2.0), ("ingest.workers", 0), ("ingest.demo.patients", 2),
    ("ingest.split", {"train": 0.5, "val": 0.1, "test": 0.1}), ("ingest.demo.prevalence", 1.0), ("ingest.read.axis", 7),
    ("preprocess.image_size", 8), ("preprocess.image_size", 5000), ("preprocess.channels", 2),
    ("pretrain.batch_size", 0), ("pretrain.ssl.temperature", 0.001), ("pretrain.ssl.augment.crop_scale", 0.0),
    ("finetune.lr", 0.0), ("finetune.lr", -1.0), ("finetune.epochs", 0), ("finetune.batch_size", 1),
    ("finetune.label_smoothing", 1.5), ("finetune.warmup_epochs", 99), ("finetune.momentum", 1.0),
    ("evaluate.bootstrap.n_resamples", 3), ("evaluate.bootstrap.alpha", 0.7), ("evaluate.calibration_bins", 1),
    ("evaluate.saliency.image_size", 10), ("evaluate.threshold.target", 0.9), ("evaluate.split", "train"),
]


def _kinds(tp: Any) -> set[str]:
    """What YAML kinds a type hint accepts, and for a Literal the exact values."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"literal"}
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(tp)))
    if tp is type(None):
        return {"null"}
    if origin in (list, tuple):
        return {"list"}
    if origin is dict:
        return {"dict"}
    if dataclasses.is_dataclass(tp):
        return {"dict", "null"}  # null means "all defaults"
    return {int: {"int"}, float: {"int", "float"}, str: {"str"}, bool: {"bool"}}[tp]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float) and not math.isfinite(value):
        return "non-finite"  # accepted by no numeric key
    return {int: "int", float: "float", str: "str", list: "list", dict: "dict"}[type(value)]


def _wrong(tp: Any, value: Any) -> bool:
    kinds = _kinds(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        literal = [a for a in typing.get_args(tp) if typing.get_origin(a) is Literal]
    else:
        literal = [tp] if typing.get_origin(tp) is Literal else []
    for lit in literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(lit)):
            return False
    return _kind(value) not in (kinds - {"literal"})


def _leaves(cls: type, prefix: str) -> list[tuple[str, Any]]:
    """Every key of a section with its type hint, nested sections included."""
    out = []
    hints = typing.get_type_hints(cls)
    for name in (f.name for f in dataclasses.fields(cls)):  # keys, not class constants
        tp = hints[name]
        key = f"{prefix}.{name}"
        out.append((key, tp))
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, key)
    return out


LEAVES = [kv for section, cls in SECTIONS.items() for kv in _leaves(cls, section)]
DATACLASS_KEYS = [s for s in SECTIONS] + [k for k, tp in LEAVES if dataclasses.is_dataclass(tp)]


def _set(params: dict, dotted: str, value: Any) -> dict:
    out = copy.deepcopy(params)
    node = out
    *parents, last = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value
    return out


@st.composite
def bad_params(draw) -> tuple[dict, str, str]:
    """(params, section, what the error must name)."""
    kind = draw(st.sampled_from(["unknown_key", "wrong_type", "out_of_range"]))
    if kind == "unknown_key":
        where = draw(st.sampled_from(DATACLASS_KEYS))
        name = draw(st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True))
        cls = SECTIONS[where] if where in SECTIONS else dict(LEAVES)[where]
        if name in {f.name for f in dataclasses.fields(cls)}:
            name += "_x"
        value = draw(st.sampled_from(CANDIDATES[:8]))
        return _set(BASE, f"{where}.{name}", value), where.split(".")[0], name
    if kind == "wrong_type":
        key, tp = draw(st.sampled_from(LEAVES))
        value = draw(st.sampled_from([v for v in CANDIDATES if _wrong(tp, v)]))
        return _set(BASE, key, value), key.split(".")[0], key
    key, value = draw(st.sampled_from(OUT_OF_RANGE))
    return _set(BASE, key, value), key.split(".")[0], key


def test_every_key_has_a_wrong_value_to_try():
    for key, tp in LEAVES:
        assert any(_wrong(tp, v) for v in CANDIDATES), key


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_params())
def test_generated_bad_params_fail_with_one_paragraph_naming_the_key(tmp_path, case):
    params, section, key = case
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    # The other sections of the same file stay valid: the error is attributed to the right stage only.
    for other, cls in SECTIONS.items():
        if other != section:
            load_section(other, cls, path)
    with pytest.raises(ParamsError) as e:
        load_section(section, SECTIONS[section], path)
    message = str(e.value)
    assert key in message, message
    assert "\n" not in message and len(message) < 1500, message


def _stage(tmp: Path, stage: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


# A few real stage processes (the rest is the same code in-process above): exit 2, no traceback,
# the key named, nothing written.
@pytest.mark.parametrize("section, key, value", [
    ("ingest", "ingest.split.tran", 0.7),
    ("preprocess", "preprocess.resize", "squash"),
    ("finetune", "finetune.epochs", 0),
])
def test_a_stage_with_bad_params_exits_2_with_one_paragraph_and_writes_nothing(tmp_path, section, key, value):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_set(BASE, key, value), sort_keys=False))
    res = _stage(tmp_path, STAGE_OF[section])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert key.rsplit(".", 1)[-1] in res.stderr and section in res.stderr, res.stderr
    # textwrap folds the paragraph; it is one paragraph, so no blank line inside.
    assert "\n\n" not in res.stderr.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_params_that_are_not_yaml_or_not_a_mapping_are_named(tmp_path):
    (tmp_path / "params.yaml").write_text("ingest: [unclosed\n")
    res = _stage(tmp_path, "preprocess")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "params.yaml" in res.stderr
    (tmp_path / "params.yaml").write_text("preprocess: 64\n")
    res = _stage(tmp_path, "preprocess")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "'preprocess'" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
