"""The `medtl` command as a user and a reviewer meet it.

- Every medtl module imports with the network blocked (nothing phones home on import).
- `--help`, `verify` and `keygen` start fast and work in the base install, which has
  no torch: a separate virtual environment built from uv.lock's base requirements.
- `--version`, `verify --json`, `--out -`, and the documented exit codes.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medtl import cli
from tests.project import VENV_BIN, copy_project

ROOT = Path(__file__).resolve().parents[1]

# Loaded first by every Python process started with it on PYTHONPATH: any attempt to reach
# the network (a connection, a datagram, a name look-up) is refused and logged. Making an
# unconnected socket is allowed: urllib3 does that on import to probe for IPv6.
SITECUSTOMIZE = '''
import atexit, json, os, socket, sys
_log = os.environ["MEDTL_TEST_SOCKET_LOG"]

def _refuse(*args, **kwargs):
    with open(_log, "a") as f:
        f.write("network use attempted: %r\\n" % (args[:2],))
    raise OSError("network is blocked in this test")

class _Offline(socket.socket):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse(address)
        return super().connect(address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse(address)
        return super().connect_ex(address)

    def sendto(self, *args):
        _refuse(*args)

socket.socket = _Offline
socket.create_connection = socket.getaddrinfo = socket.gethostbyname = socket.gethostbyname_ex = _refuse
def _write_modules():
    with open(os.environ["MEDTL_TEST_MODULES"], "w") as f:
        json.dump(sorted(sys.modules), f)

if os.environ.get("MEDTL_TEST_MODULES"):
    atexit.register(_write_modules)
'''

HEAVY = ("torch", "torchvision", "numpy", "scipy", "sklearn", "cv2", "pydicom", "dvc", "dvclive")


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> tuple[dict, Path]:
    """An environment for subprocesses whose sockets are blocked, and the log where attempts land."""
    folder = tmp_path_factory.mktemp("offline")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = folder / "sockets.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # this tree's medtl first, whatever the venv's editable install points at
    env.update(PYTHONPATH=os.pathsep.join([str(folder), str(Path(__file__).resolve().parents[1])]),
               MEDTL_TEST_SOCKET_LOG=str(log), NO_COLOR="1")
    return env, log


def run(cmd: list[str], env: dict, cwd: Path | None = None, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**env, **extra}, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_every_module_imports_with_the_network_blocked(offline):
    env, log = offline
    probe = run([sys.executable, "-c", "import socket; socket.socket().connect(('127.0.0.1', 9))"], env)
    assert probe.returncode != 0 and log.exists(), "the network block does not work"
    log.unlink()
    code = ("import importlib, pkgutil, medtl\n"
            "for m in pkgutil.walk_packages(medtl.__path__, 'medtl.'):\n"
            "    importlib.import_module(m.name)\n"
            "print('imported')")
    res = run([str(VENV_BIN / "python"), "-c", code], env)
    assert res.returncode == 0 and "imported" in res.stdout, res.stderr[-3000:]
    assert not log.exists(), f"an import tried to open a socket: {log.read_text()}"
    res = run([str(VENV_BIN / "medtl"), "--help"], env)
    assert res.returncode == 0 and "verify" in res.stdout
    assert not log.exists()


def test_building_the_parser_imports_no_training_stack():
    """Command modules import torch & co in their handlers only: `medtl --help` must not pay for them."""
    code = ("import json, sys\nfrom medtl import cli\ncli.build_parser()\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in cli.TRAIN_PACKAGES)))")
    res = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [], f"imported while building the parser: {res.stdout}"


def test_a_command_module_needing_the_training_stack_is_listed_and_exits_3(monkeypatch, capsys):
    """In the base install a command module that imports torch at the top must not break verify or --help."""

    def fake_import(name, real=__import__("importlib").import_module):
        if name == "medtl.fake_train_command":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name)

    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "medtl.fake_train_command"])
    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli.main(["fake_train_command", "x", "--y"]) == cli.EXIT_MISSING_EXTRA
    assert "pip install 'medtl[train]'" in capsys.readouterr().err
    assert cli.main(["verify", "/nonexistent/provenance.json"]) == cli.EXIT_USAGE


def test_imported_third_party_packages_are_declared_directly():
    """Every top-level package a medtl module imports comes from a distribution pyproject.toml names itself."""
    import ast
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("_", "-")
                for d in project["dependencies"] + [x for deps in project["optional-dependencies"].values() for x in deps]}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted((ROOT / "medtl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "medtl":
                    continue
                dists = {d.lower().replace("_", "-") for d in providers.get(top, [])}
                assert dists, f"{path.relative_to(ROOT)} imports {top}, which no installed distribution provides"
                if not dists & declared:
                    missing.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_version_and_exit_codes(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"medtl {importlib.metadata.version('medtl')}"
    # A missing file is an input error (2) with a message, never a traceback.
    assert cli.main(["verify", str(tmp_path / "nope.json")]) == cli.EXIT_USAGE
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["audit", "--out", "-"])  # a folder of files cannot go to stdout
    assert e.value.code == cli.EXIT_USAGE
    assert "writes a folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def audited(tiny_run, tmp_path_factory):
    """A copy of the tiny run with its audit evidence written and committed."""
    p = copy_project(tiny_run, tmp_path_factory.mktemp("audited") / "project")
    p.run(str(VENV_BIN / "medtl"), "audit", "--allow-dirty")
    return p


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """medtl installed with only its base requirements (as uv.lock pins them): no torch, no numpy."""
    return make_base_venv(tmp_path_factory.mktemp("base-venv"), sys.executable)


def make_base_venv(folder: Path, python: str) -> Path:
    uv = [shutil.which("uv")] if shutil.which("uv") else None
    if uv is None and shutil.which("python3") and subprocess.run(["python3", "-m", "uv", "--version"], capture_output=True).returncode == 0:
        uv = ["python3", "-m", "uv"]  # how `make env` installs it when it is missing
    if uv is None:
        pytest.skip("uv is not installed (make env installs it)")
    venv, req = folder / "venv", folder / "requirements.txt"
    steps = [[*uv, "venv", "-q", "--python", python, str(venv)],
             [*uv, "export", "--project", str(ROOT), "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "-q", "-o", str(req)],
             [*uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-r", str(req)],
             [*uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--no-deps", str(ROOT)]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr[-3000:]}"
    return venv / "bin"


def best_of_three(cmd: list[str], env: dict, cwd: Path) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        res = run(cmd, env, cwd)
        times.append(time.perf_counter() - start)
        assert res.returncode == 0, res.stderr
    return min(times)


@pytest.mark.e2e
def test_reviewer_install_verifies_offline_without_torch(base_venv, audited, offline, tmp_path):
    env, log = offline
    py, medtl = str(base_venv / "python"), str(base_venv / "medtl")
    assert run([py, "-c", "import torch"], env).returncode != 0  # really no torch here
    for cmd in (["--help"], ["verify", "--help"], ["keygen", "--help"], ["--version"]):
        assert best_of_three([medtl, *cmd], env, tmp_path) < 1.0, cmd

    modules = tmp_path / "modules.json"
    res = run([medtl, "verify", "reports/audit/provenance.json"], env, audited.path, MEDTL_TEST_MODULES=str(modules))
    assert res.returncode == 0 and res.stdout.splitlines()[-1].startswith("OK:"), res.stdout + res.stderr
    assert not set(json.loads(modules.read_text())) & set(HEAVY)

    res = run([medtl, "verify", "reports/audit/provenance.json", "--json"], env, audited.path)
    report = json.loads(res.stdout)
    assert res.returncode == report["exit_code"] == 0 and report["status"] == "ok" and report["format"] == "medtl-verify/2"
    assert report["checked"] > 0 and report["mismatches"] == []

    res = run([medtl, "keygen", "--out", str(tmp_path / "keys")], env, tmp_path, MEDTL_SIGNING_PASSPHRASE="reviewer test")
    assert res.returncode == 0 and (tmp_path / "keys" / "medtl-signing.pub").is_file(), res.stderr
    assert b"ENCRYPTED" in (tmp_path / "keys" / "medtl-signing.key").read_bytes()

    # A command of the training stack says what to install and exits 3.
    res = run([medtl, "predict", "model.pt", "scans"], env, tmp_path)
    assert res.returncode == cli.EXIT_MISSING_EXTRA and "pip install 'medtl[train]'" in res.stderr
    assert not log.exists(), log.read_text()

    # A changed artifact: verify fails with 1, and --json says which.
    metrics = audited.path / "reports" / "metrics.json"
    original = metrics.read_bytes()
    try:
        metrics.write_bytes(original + b"\n")
        res = run([medtl, "verify", "reports/audit/provenance.json", "--json"], env, audited.path)
        report = json.loads(res.stdout)
        assert res.returncode == report["exit_code"] == 1 and report["status"] == "failed"
        mismatch = next(m for m in report["mismatches"] if m["path"] == "reports/metrics.json")
        assert mismatch["expected"].startswith("sha256 ") and mismatch["actual"].startswith("sha256 ")
        assert mismatch["expected"] != mismatch["actual"] and mismatch["message"].startswith("MISMATCH reports/metrics.json")
    finally:
        metrics.write_bytes(original)

    # Under --json every outcome is one JSON object on stdout, errors of usage and of input included.
    for argv in (["verify", "--json"], ["verify", "missing.json", "--json"], ["verify", "x.json", "--json", "--bogus"]):
        res = run([medtl, *argv], env, audited.path)
        error = json.loads(res.stdout)
        assert res.returncode == error["exit_code"] == cli.EXIT_USAGE and error["status"] == "error", argv
        assert error["format"] == "medtl-error/1" and error["command"] == "verify" and error["error"], argv


def python312() -> str | None:
    """A Python 3.12 that runs: on PATH, or installed by pyenv (whose shim may not select it)."""
    candidates = [shutil.which("python3.12")] + sorted(map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))
    for c in filter(None, candidates):
        if subprocess.run([c, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True).returncode == 0:
            return c
    return None


@pytest.mark.e2e
@pytest.mark.skipif(python312() is None, reason="no Python 3.12 on this machine")
def test_reviewer_install_verifies_on_python_312(audited, tmp_path):
    # requires-python is >=3.11: a reviewer on a newer Python installs the base package and verifies
    venv = make_base_venv(tmp_path, python312())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = run([str(venv / "python"), "-c", "import sys; print(sys.version_info[:2])"], env)
    assert res.stdout.strip() == "(3, 12)"
    res = run([str(venv / "medtl"), "verify", "reports/audit/provenance.json", "--json"], env, audited.path)
    assert res.returncode == 0 and json.loads(res.stdout)["status"] == "ok", res.stdout + res.stderr


@pytest.mark.e2e
def test_out_dash_writes_predictions_to_stdout(audited, offline):
    env, _ = offline
    scans = audited.path / "scans"
    scans.mkdir(exist_ok=True)
    from PIL import Image
    import numpy as np

    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(scans / "a.png")
    res = run([str(VENV_BIN / "medtl"), "predict", "models/model.pt", "scans", "--out", "-", "--allow-mismatch",
               "--workers", "0"], env, audited.path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("path,file,sha256,image,status") and len(lines) == 2 and ",ok," in lines[1]
    assert "image(s) predicted" in res.stderr  # the summary goes to stderr, so stdout stays a CSV
    assert not (audited.path / "-").exists()
    # Messages name stdout, never the temporary file behind it; one progress bar (per file), none per batch.
    assert "medtl-out-" not in res.stderr and "/tmp" not in res.stderr and "stdout" in res.stderr, res.stderr
    assert "file" in res.stderr and "it/s" not in res.stderr and "it]" not in res.stderr  # no bar counted in batches
