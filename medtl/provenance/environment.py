"""What a run depended on besides its data: code commit, package versions, lock file, DVC context."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from medtl.provenance.hashing import file_digests

PACKAGES = ("torch", "torchvision", "dvc", "dvclive", "numpy", "scikit-learn", "pydicom", "medtl")


def _git(args: list[str], cwd: str | Path = ".", strip: bool = True) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() if strip else r.stdout


def _strip_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def git_state(cwd: str | Path = ".") -> dict:
    """Commit, dirty flag and origin of the code; {'commit': None} outside a git checkout."""
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "dirty": None}
    # porcelain lines are "XY path": a stripped first line would lose a column
    status = _git(["status", "--porcelain"], cwd, strip=False) or ""
    # provenance records are written beside outputs during the run; they are not code
    changed = [line[3:] for line in status.splitlines() if not line.endswith((".provenance.json", ".provenance.json.log"))]
    state = {"commit": commit, "dirty": bool(changed), "changed": changed[:50]}
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], cwd)
    if branch and branch != "HEAD":
        state["branch"] = branch
    remote = _git(["remote", "get-url", "origin"], cwd)
    if remote and shareable_remote(remote):
        state["remote"] = _strip_credentials(remote)
    return state


def shareable_remote(url: str) -> bool:
    """A remote others can reach (https://, ssh://, git@host:path); a local folder's path (which may hold a user
    name) is not: the code is then named by its commit alone."""
    if "://" in url:
        return not url.lower().startswith("file://")
    # scp-like syntax, host:path; not a Windows drive (C:\...) nor a path
    head = url.split("/", 1)[0]
    return ":" in head and len(head.split(":", 1)[0]) > 1


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _torch_build_from_metadata() -> dict:
    """The CUDA version torch was built with, read from its installed files without importing it."""
    try:
        text = Path(importlib.metadata.distribution("torch").locate_file("torch/version.py")).read_text()
    except (importlib.metadata.PackageNotFoundError, OSError):
        return {}
    cuda = next((line.split("=", 1)[1].strip().strip("'\"") for line in text.splitlines()
                 if line.startswith("cuda") and "=" in line), None)
    return {"cuda_build": None if cuda in (None, "None") else cuda, "source": "package metadata"}


def accelerator_versions() -> dict:
    """CUDA / cuDNN the installed torch was built with, and what this machine has.

    A stage that does not train (ingest, preprocess) never imports torch: importing it only to
    record its build costs about a second and 700 MiB per run, so the build is read from its files.
    """
    if "torch" not in sys.modules:
        return _torch_build_from_metadata()
    try:
        import torch
    except ImportError:
        return {}
    info: dict = {"cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # cudnn probing can fail on a CPU-only machine; absence is the answer
        info["cudnn"] = None
    if info["cuda_available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def uv_lock_sha256(root: str | Path = ".") -> str | None:
    lock = Path(root) / "uv.lock"
    return file_digests(lock)[0] if lock.is_file() else None


def environment(root: str | Path = ".") -> dict:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "accelerator": accelerator_versions(),
        "uv_lock_sha256": uv_lock_sha256(root),
    }


def dvc_context() -> dict:
    """Set by DVC in a stage's environment: which stage, and which experiment when run by `dvc exp run`."""
    env = {"stage": "DVC_STAGE", "experiment": "DVC_EXP_NAME", "baseline_rev": "DVC_EXP_BASELINE_REV"}
    return {k: os.environ[v] for k, v in env.items() if os.environ.get(v)}
