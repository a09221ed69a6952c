"""Params validation: a wrong key, type or name stops a stage before it writes anything."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from medtl.errors import ParamsError
from medtl.evaluate.evaluation import EvaluateParams
from medtl.ingest.ingest import IngestParams
from medtl.params import build, load_section
from medtl.prepare.preprocess import PreprocessParams
from medtl.train.adaptation import PretrainParams
from medtl.train.finetune import FinetuneParams
from tests.project import ROOT

SECTIONS = {
    "ingest": IngestParams, "preprocess": PreprocessParams, "pretrain": PretrainParams,
    "finetune": FinetuneParams, "evaluate": EvaluateParams,
}


def test_the_shipped_params_file_is_valid():
    for name, cls in SECTIONS.items():
        load_section(name, cls, ROOT / "params.yaml")


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5


@dataclass(frozen=True)
class Outer:
    mode: Literal["a", "b"] = "a"
    count: int = 1
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


@pytest.mark.parametrize(
    "raw, key, expected",
    [
        ({"mdoe": "a"}, "mdoe", "allowed keys are count, flag, inner, mode"),
        ({"mode": "c"}, "x.mode", "one of 'a', 'b'"),
        ({"count": "3"}, "x.count", "an integer"),
        ({"count": True}, "x.count", "an integer"),
        ({"flag": "yes"}, "x.flag", "true or false"),
        ({"inner": {"rate": "fast"}}, "x.inner.rate", "a number"),
        ({"inner": {"speed": 1}}, "speed", "allowed keys are rate"),
        ({"inner": 3}, "x.inner", "a mapping with keys rate"),
    ],
)
def test_errors_name_the_key_the_value_and_what_is_allowed(raw, key, expected):
    with pytest.raises(ParamsError) as e:
        build(Outer, raw, "x")
    assert key in str(e.value) and expected in str(e.value)


def test_numbers_accept_integers_and_keep_defaults():
    o = build(Outer, {"inner": {"rate": 1}}, "x")
    assert o.inner.rate == 1.0 and isinstance(o.inner.rate, float) and o.mode == "a"


@pytest.mark.parametrize(
    "section, key, value, allowed",
    [
        ("pretrain", "arch", "resnet1000", "resnet18"),
        ("pretrain", "adapt", "magic", "adabn"),
        ("pretrain", "weights", "models/w.pt", "sha256"),
        ("finetune", "strategy", "everything", "linear"),
        ("ingest", "source", "pacs", "demo"),
        ("finetune", "lr", "fast", "a number"),
        ("finetune", "epochs", 0, "a positive integer"),
        ("preprocess", "image_size", 3, "between 16 and 1024"),
    ],
)
def test_bad_names_and_values_in_each_section(tmp_path, section, key, value, allowed):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as e:
        load_section(section, SECTIONS[section], path)
    assert f"{section}.{key}" in str(e.value) or key in str(e.value)
    assert allowed in str(e.value)


def test_a_stage_with_a_bad_param_exits_with_one_paragraph_and_writes_nothing(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["ingest"]["workres"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, str(ROOT / "stages" / "ingest.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "'workres'" in res.stderr and "ingest" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("where", [("preprocess", "size"), ("evaluate", "saliency", "nfiles"), ("model_card", "size")])
def test_keys_the_dvc_run_cache_ignores_are_refused_anywhere(tmp_path, where):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = raw
    for k in where[:-1]:
        node = node.setdefault(k, {})
    node[where[-1]] = 64
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="run cache") as e:
        load_section("finetune", FinetuneParams, path)  # any stage: the whole file is checked
    assert ".".join(where) in str(e.value) and str(path) in str(e.value)


def test_no_params_dataclass_has_a_field_the_run_cache_ignores():
    import dataclasses
    import typing

    def fields(cls, prefix):
        for f in dataclasses.fields(cls):
            yield f"{prefix}.{f.name}"
            for tp in (typing.get_type_hints(cls)[f.name], *typing.get_args(typing.get_type_hints(cls)[f.name])):
                if dataclasses.is_dataclass(tp):
                    yield from fields(tp, f"{prefix}.{f.name}")

    names = [n for section, cls in SECTIONS.items() for n in fields(cls, section)]
    assert len(names) > 80
    assert [n for n in names if n.rsplit(".", 1)[-1] in ("size", "nfiles")] == []


@pytest.mark.parametrize("section", list(SECTIONS))
def test_a_missing_or_empty_section_is_refused_naming_it(tmp_path, section):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw[section]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=f"params section '{section}' is missing from {path}"):
        load_section(section, SECTIONS[section], path)
    raw[section] = None
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=f"params section '{section}' in {path} is empty"):
        load_section(section, SECTIONS[section], path)
    raw[section] = {}  # written on purpose: every default
    path.write_text(yaml.safe_dump(raw))
    load_section(section, SECTIONS[section], path)


def test_built_in_defaults_equal_the_shipped_params_file():
    """A key left out of params.yaml takes the value the shipped file gives it, never another one."""
    from medtl.provenance.record import to_jsonable

    def differ(default, shipped, key):
        if isinstance(default, dict) and isinstance(shipped, dict):
            for k in shipped.keys() & default.keys():
                yield from differ(default[k], shipped[k], f"{key}.{k}")
        elif default != shipped:
            yield f"{key}: default {default!r}, params.yaml {shipped!r}"

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    found = [d for name, cls in SECTIONS.items()
             for d in differ(to_jsonable(build(cls, {}, name)), to_jsonable(build(cls, raw[name], name)), name)]
    assert found == []


@pytest.mark.parametrize("key", ["finetune.batch_size", "evaluate.batch_size", "pretrain.batch_size", "pretrain.ssl.batch_size"])
def test_batch_sizes_are_bounded(tmp_path, key):
    from medtl.params import MAX_BATCH_SIZE

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    *path_keys, leaf = key.split(".")
    node = raw
    for k in path_keys:
        node = node[k]
    node[leaf] = 100_000_000
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=f"'{key}' has value 100000000; expected an integer from .* to {MAX_BATCH_SIZE}"):
        load_section(path_keys[0], SECTIONS[path_keys[0]], path)
    node[leaf] = MAX_BATCH_SIZE
    path.write_text(yaml.safe_dump(raw))
    load_section(path_keys[0], SECTIONS[path_keys[0]], path)
