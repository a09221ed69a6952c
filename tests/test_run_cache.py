"""Every param of every stage reaches DVC's run-cache key, and a changed image size really reruns preprocess.

DVC restores a stage's outputs from its run cache when the stage's key (command,
dependency hashes, params) matches an earlier run. The key is computed by
dvc.stage.cache._get_cache_hash, which drops keys named `size` and `nfiles` at
any depth: a param so named could change without rerunning anything. The key
test below uses DVC's own function on the recorded lock entries, so it covers
every leaf param of every stage in milliseconds; one real `dvc exp run` checks
the consequence end to end.
"""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import yaml
from dvc.stage.cache import _get_cache_hash

from tests.project import copy_project


def leaves(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def other(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [value[0] if value else "x"]
    if value is None:
        return 0
    if isinstance(value, dict):  # an empty mapping
        return {"x": 1}
    raise TypeError(value)


def key_with(entry: dict, path: tuple, value) -> str:
    e = copy.deepcopy(entry)
    node = e["params"]["params.yaml"]
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return _get_cache_hash(e, key=True)


def test_every_param_of_every_stage_changes_its_run_cache_key(tiny_run):
    lock = yaml.safe_load((tiny_run.path / "dvc.lock").read_text())["stages"]
    runs = tiny_run.path / ".dvc" / "cache" / "runs"
    checked, filed = 0, set()
    for stage, entry in lock.items():
        params = entry.get("params", {}).get("params.yaml", {})
        assert params, f"stage {stage} records no params"
        base = _get_cache_hash(copy.deepcopy(entry), key=True)
        if (runs / base[:2] / base).is_dir():  # the function gives the key DVC filed this stage's run under
            filed.add(stage)
        for path, value in leaves(params):
            assert key_with(entry, path, other(value)) != base, f"changing {'.'.join(path)} alone keeps {stage}'s key"
            checked += 1
    assert set(lock) == {"ingest", "preprocess", "pretrain-adapt", "fine-tune", "evaluate"}
    # evaluate writes uncached plot outputs, which DVC does not file in its run cache: it always reruns
    assert filed == {"ingest", "preprocess", "pretrain-adapt", "fine-tune"}
    assert checked > 80
    # the reason the params avoid these names: DVC's key does not see them
    entry = lock["preprocess"]
    assert key_with(entry, ("preprocess", "size"), 28) == key_with(entry, ("preprocess", "size"), 64)
    # and preprocess sees how ingest decoded the files, which its record carries into the model
    assert set(entry["params"]["params.yaml"]["ingest.read"]) == {"window", "frame", "axis", "slice"}


def test_exp_run_with_another_image_size_reruns_preprocess_and_writes_that_size(tiny_run, tmp_path):
    p = copy_project(tiny_run, tmp_path / "project")
    size = tiny_run.params["preprocess"]["image_size"]
    new = size + 8
    out = p.dvc("exp", "run", "-S", f"preprocess.image_size={new}", "preprocess")
    text = out.stdout + out.stderr
    assert "Running stage 'preprocess'" in text and not re.search(r"'preprocess' is cached", text), text[-2000:]
    for split in ("train", "val", "test"):
        assert np.load(p.path / f"data/prepared/{split}.npy", mmap_mode="r").shape[-2:] == (new, new)
    stats = json.loads((p.path / "data/prepared/stats.json").read_text())
    assert stats["preprocessing"]["image_size"] == new
