"""5. DVC overhead: `dvc status` and a no-op `dvc repro` on a project whose ingest holds N images.

A throwaway git + dvc copy of this project runs the real pipeline on the demo
source at N images (small images and one cheap training epoch: the data
artifacts are what grows with N), then the two commands are timed (median of
three). Each data artifact is a handful of files whatever N is.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.common import Result, Timer

NAME = "dvc_overhead"
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bench_params(n: int) -> dict:
    per_patient = 4
    return {
        "ingest": {"demo": {"patients": max(24, -(-n // per_patient)), "min_images_per_patient": per_patient,
                            "max_images_per_patient": per_patient, "min_size": 48, "max_size": 64}},
        "preprocess": {"image_size": 32},
        "finetune": {"strategy": "linear", "epochs": 1, "batch_size": 64, "patience": 1, "augment": {"enabled": False}},
        "evaluate": {"bootstrap": {"n_resamples": 50}, "saliency": {"enabled": False}},
    }


class Project:
    def __init__(self, path: Path):
        self.path = path
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.org",
                    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.org"}

    def run(self, *cmd: str) -> float:
        with Timer() as t:
            res = subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return t.seconds

    def dvc(self, *args: str) -> float:
        return self.run(str(VENV_BIN / "dvc"), *args)


def make_project(dest: Path, params: dict) -> Project:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "uv.lock", "pyproject.toml", ".gitignore", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for name in ("stages", "medtl"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    all_params = deep_update(yaml.safe_load((dest / "params.yaml").read_text()), params)
    (dest / "params.yaml").write_text(yaml.safe_dump(all_params, sort_keys=False))
    p = Project(dest)
    p.run("git", "init", "-q")
    p.dvc("init", "-q")
    p.dvc("config", "core.analytics", "false")
    p.run("git", "add", "-A")
    p.run("git", "commit", "-qm", "bench project")
    return p


def run(work: Path, n: int, targets: list[str], repeats: int = 3) -> Result:
    p = make_project(work / "dvc-project", bench_params(n))
    res = Result(NAME, "DVC overhead on a data-heavy project",
                 {"images": n, "targets": targets or "whole pipeline", "repeats": repeats, **bench_params(n)})
    full = p.dvc("repro", *targets)
    files = {d: sum(1 for f in (p.path / d).rglob("*") if f.is_file()) for d in ("data/ingested", "data/prepared")}
    status = statistics.median(p.dvc("status", *targets) for _ in range(repeats))
    noop = statistics.median(p.dvc("repro", *targets) for _ in range(repeats))
    res.add("first dvc repro (does the work)", round(full, 1), "s")
    res.add("files in data/ingested, data/prepared", f"{files['data/ingested']}, {files['data/prepared']}")
    res.check("dvc status", round(status, 2), "<=", 5.0)
    res.check("no-op dvc repro", round(noop, 2), "<=", 5.0)
    shutil.rmtree(p.path, ignore_errors=True)
    return res
