"""Typed, validated params: one dataclass per params.yaml section.

Each stage validates its whole section before doing any work, so a wrong key,
type or value stops it with a message that names the key, the value it got
and what is allowed, and nothing is written.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from medtl.errors import ParamsError

T = typing.TypeVar("T")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_describe(k)} to {_describe(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ParamsError(f"params key '{key}' has value {value!r}; expected {_describe(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(next(a for a in typing.get_args(tp) if a == value)):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ParamsError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)[:1]
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise bad
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported params type {tp!r} for {key}")


def build(cls: type[T], raw: dict, prefix: str) -> T:
    """Build dataclass `cls` from mapping `raw`; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        raise ParamsError(
            f"params section '{prefix}' has unknown key(s) {', '.join(repr(u) for u in unknown)}; "
            f"allowed keys are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params key '{key}' is required; expected {_describe(hints[name])}")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


# The largest batch any stage accepts (docs/training.md): a batch is held in memory whole, and a value beyond
# this is a typo, not a plan. Training batches above the split's size are refused where the split is known.
MAX_BATCH_SIZE = 4096


def require_batch_size(value: int, key: str, least: int = 1) -> None:
    require(least <= value <= MAX_BATCH_SIZE, key, value, f"an integer from {least} to {MAX_BATCH_SIZE}")


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise a ParamsError naming `key` unless `ok`; used by the sections' `check` methods."""
    if not ok:
        raise ParamsError(f"params key '{key}' has value {value!r}; expected {expected}")


def read_params_file(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path} does not exist; expected a params file with the pipeline's sections") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections (ingest, preprocess, ...), got {type(raw).__name__}")
    return raw


# DVC's run cache leaves keys with these names out of a stage's key (dvc/stage/cache.py), at any depth:
# a change to such a param would restore the outputs of the old value instead of rerunning the stage.
RUN_CACHE_BLIND_KEYS = ("size", "nfiles")


def check_run_cache_keys(raw: Any, path: str | Path, prefix: str = "") -> None:
    """Refuse any key DVC's run cache cannot see, anywhere in the params file."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k in RUN_CACHE_BLIND_KEYS:
                raise ParamsError(
                    f"params key '{key}' in {path} is named {k!r}, which DVC's run cache ignores (a change to it "
                    f"would restore the old outputs instead of rerunning the stage); rename it, e.g. image_size"
                )
            check_run_cache_keys(v, path, key)
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            check_run_cache_keys(v, path, f"{prefix}[{i}]")


def load_section(section: str, cls: type[T], path: str | Path = "params.yaml") -> T:
    raw = read_params_file(path)
    check_run_cache_keys(raw, path)
    if section not in raw:
        # built-in defaults would stand in silently for the section the pipeline ships
        raise ParamsError(f"params section '{section}' is missing from {path}; the stage that reads it does not run on "
                          f"built-in defaults. Sections present: {', '.join(map(str, raw)) or 'none'}. Copy the "
                          f"'{section}' section of the shipped params.yaml (an empty mapping '{section}: {{}}' takes "
                          "every default knowingly)")
    value = raw.get(section)
    if value is None:
        raise ParamsError(f"params section '{section}' in {path} is empty (null); write '{section}: {{}}' to take every "
                          "default knowingly, or give its keys")
    if not isinstance(value, dict):
        raise ParamsError(f"params section '{section}' in {path} must be a mapping, got {value!r}")
    return build(cls, value, section)


# Shared value types for the sections, which live beside the code that reads them
# (IngestParams in medtl.ingest.ingest, FinetuneParams in medtl.train.finetune, ...).
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
