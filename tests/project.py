"""A throwaway copy of the project in a temporary git repository, for tests that drive the real dvc."""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Small enough for a test, large enough that every split gets both classes.
TINY_PARAMS: dict[str, Any] = {
    "ingest": {"workers": 1, "demo": {"patients": 24, "min_images_per_patient": 2, "max_images_per_patient": 3,
                                      "min_size": 48, "max_size": 64}},
    "preprocess": {"image_size": 32},
    "finetune": {"epochs": 2, "batch_size": 16, "patience": 2, "augment": {"enabled": False}},
}


def deep_update(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Project:
    def __init__(self, path: Path):
        self.path = path
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
                    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}

    def run(self, *cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
        return res

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(VENV_BIN / "dvc"), *args, check=check)

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("git", *args, check=check)

    @property
    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, params: dict) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def update_params(self, extra: dict) -> None:
        self.set_params(deep_update(self.params, extra))

    def commit(self, message: str = "update") -> None:
        self.git("add", "-A")
        self.git("commit", "-qm", message, "--allow-empty")


def make_project(dest: Path, params: dict | None = None) -> Project:
    """Copy dvc.yaml, params.yaml, stages/, medtl/ and uv.lock into `dest`, as a fresh git + dvc repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", "uv.lock", "pyproject.toml", ".gitignore", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for name in ("stages", "medtl", "plots/templates"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    p = Project(dest)
    p.set_params(deep_update(p.params, params if params is not None else TINY_PARAMS))
    p.git("init", "-q")
    p.dvc("init", "-q")
    p.dvc("config", "core.analytics", "false")
    p.commit("project")
    return p


def copy_project(src: Project, dest: Path) -> Project:
    """An independent copy of a project that already ran (git history, dvc cache and outputs included)."""
    shutil.copytree(src.path, dest, symlinks=True,
                    ignore=lambda d, names: ["tmp"] if Path(d).name == ".dvc" else [])
    return Project(dest)


def preprocessing_record(image_size: int, channels: int = 1, classes=("normal", "lesion"), mean=None, std=None,
                         resize: str = "pad", read: dict | None = None):
    """A preprocessing record as preprocess writes it, for tests that make prepared arrays or models by hand."""
    from medtl.intake.readers.base import ReadOptions
    from medtl.prepare.imaging import Preprocessing, read_record

    return Preprocessing(read=read if read is not None else read_record(ReadOptions()), image_size=image_size,
                         channels=channels, resize=resize, mean=list(mean or [0.3] * channels),
                         std=list(std or [0.2] * channels), classes=list(classes))


def distinct_seed(*parts: object) -> int:
    """A seed that differs for different parts in every process.

    `hash()` of strings changes per process, and a modulus of it can collide:
    two test images then share pixels and read as a label conflict.
    """
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big")
