"""Reliability through the real dvc: determinism, SIGKILL mid-stage, a shared remote, queued experiments,
disk full and read-only outputs. See docs/reliability.md for what each test guarantees."""
from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.project import TINY_PARAMS, VENV_BIN, Project, deep_update, make_project

pytestmark = pytest.mark.e2e

# TINY_PARAMS without the slow extras that add nothing to these checks.
FAST = deep_update(TINY_PARAMS, {"evaluate": {"saliency": {"enabled": False}, "bootstrap": {"n_resamples": 100}}})
STAGES = ["ingest", "preprocess", "pretrain-adapt", "fine-tune", "evaluate"]
# Logs DVCLive appends to while training; between epochs they hold complete rows only.
LOGS = ("dvclive", "dvclive_pretrain")
RESUME = "models/finetune.ckpt"  # fine-tune's state after each epoch (not a DVC output)


def lock_outs(p: Project, stage: str | None = None) -> dict[str, str]:
    lock = yaml.safe_load((p.path / "dvc.lock").read_text())
    # stage records name the git commit, which differs between two projects made apart
    return {o["path"]: o["md5"] for name, s in lock["stages"].items() if stage in (None, name)
            for o in s.get("outs", []) if not o["path"].endswith(".provenance.json")}


def declared(p: Project, stage: str) -> list[str]:
    spec = yaml.safe_load((p.path / "dvc.yaml").read_text())["stages"][stage]
    out = []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind, []):
            out.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return out


def files_under(root: Path, rel: str) -> list[str]:
    path = root / rel
    if path.is_file():
        return [rel]
    return sorted(f.relative_to(root).as_posix() for f in path.rglob("*") if f.is_file())


def leftovers(p: Project) -> list[str]:
    """Temporary names left beside outputs (atomic writes that never finished)."""
    return sorted(f.relative_to(p.path).as_posix() for top in ("data", "models", "reports")
                  if (p.path / top).exists() for f in (p.path / top).rglob(".*") if f.name.endswith((".tmp", ".old")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Project, dict[str, float]]:
    """The uninterrupted run, one stage at a time so that each stage's duration is known."""
    p = make_project(tmp_path_factory.mktemp("reference") / "project", FAST)
    durations = {}
    for stage in STAGES:
        start = time.monotonic()
        p.dvc("repro", "--single-item", stage)
        durations[stage] = time.monotonic() - start
    p.commit("reference run")
    return p, durations


def test_two_clean_runs_give_identical_hashes_for_every_output(reference, tmp_path):
    ref, _ = reference
    other = make_project(tmp_path / "again", FAST)
    other.dvc("repro")
    a, b = lock_outs(ref), lock_outs(other)
    assert len(a) >= 12 and set(a) == set(b)
    differ = sorted(k for k in a if a[k] != b[k])
    assert not differ, f"outputs that differ between two clean runs: {differ}"


def test_sigkill_at_a_random_point_of_each_stage_then_repro_completes_identically(reference, tmp_path):
    ref, durations = reference
    p = make_project(tmp_path / "crash", FAST)
    rng = random.Random(8)
    for stage in STAGES:
        fraction = rng.uniform(0.3, 0.7)
        for attempt in range(4):  # a busy machine may finish the stage first: kill earlier and force a rerun
            delay = fraction * durations[stage] / 2 ** attempt
            proc = subprocess.Popen([str(VENV_BIN / "dvc"), "repro", "--force", "--single-item", stage], cwd=p.path,
                                    env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            if stage == "fine-tune":  # land the kill after a saved epoch, so that the rerun resumes
                end = time.monotonic() + 2 * durations[stage]
                while not (p.path / RESUME).exists() and proc.poll() is None and time.monotonic() < end:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 0.5) / 2 ** attempt)
            else:
                time.sleep(delay)
            running = proc.poll() is None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage's python together, as on power loss
            proc.wait()
            if running:
                break
        assert running, f"{stage} always finished before the kill ({delay:.1f} s)"
        # Whatever lies at an output path now is complete: a file equal to the uninterrupted run's, never a prefix.
        for out in declared(p, stage):
            for rel in files_under(p.path, out):
                got, want = (p.path / rel).read_bytes(), (ref.path / rel).read_bytes()
                if rel.startswith(LOGS) and rel.endswith(".tsv"):
                    assert want.startswith(got) and got.endswith(b"\n"), f"{stage}: {rel} ends mid-row"
                elif rel.startswith(LOGS) and rel.endswith(".json"):
                    json.loads(got)
                elif rel.endswith(".provenance.json"):  # complete, and equal but for the commit of its own project
                    strip = lambda r: {k: v for k, v in json.loads(r).items() if k != "code"}  # noqa: E731
                    assert strip(got) == strip(want), f"{stage} killed after {delay:.1f} s left another {rel}"
                else:
                    assert got == want, f"{stage} killed after {delay:.1f} s left a half-written {rel}"
        res = p.dvc("repro", "--single-item", stage)
        assert lock_outs(p, stage) == lock_outs(ref, stage), f"{stage} after a kill differs:\n{res.stdout[-2000:]}"
        if stage == "fine-tune":
            assert "resumed at epoch" in res.stdout, res.stdout[-2000:]
    assert lock_outs(p) == lock_outs(ref)
    assert leftovers(p) == []
    assert p.dvc("status", "--json").stdout.strip() in ("{}", "")


def test_push_clone_pull_gives_a_clean_status_a_no_op_repro_and_verified_evidence(reference, tmp_path):
    ref, _ = reference
    origin = tmp_path / "origin"
    shutil.copytree(ref.path, origin, symlinks=True)
    p = Project(origin)
    remote = tmp_path / "remote"
    p.dvc("remote", "add", "-d", "shared", str(remote))
    p.commit("shared remote")
    # The author audits the model they push; the evidence travels with the release, outside the repository.
    p.run(str(VENV_BIN / "medtl"), "audit")
    evidence = tmp_path / "handed-over" / "provenance.json"
    evidence.parent.mkdir()
    shutil.copy(origin / "reports/audit/provenance.json", evidence)
    p.dvc("push")
    assert any(f.is_file() for f in remote.rglob("*"))

    clone_path = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone_path)], check=True, env=p.env)
    clone = Project(clone_path)
    clone.dvc("pull")
    status = clone.dvc("status", "--json").stdout.strip()
    assert status in ("{}", ""), status
    out = clone.dvc("repro").stdout
    assert "Running stage" not in out, out
    assert lock_outs(clone) == lock_outs(ref)
    # The reviewer's check: the author's evidence against the pulled files (the stage records are DVC
    # outputs: pulled with the outputs they describe, and checked with them).
    res = clone.run(str(VENV_BIN / "medtl"), "verify", str(evidence), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    # The check can fail: one pulled byte changed is caught.
    model = clone_path / "models/model.pt"
    data = bytearray(model.read_bytes())
    data[-100] ^= 1
    model.unlink()  # a link into the cache, replaced rather than written through
    model.write_bytes(bytes(data))
    res = clone.run(str(VENV_BIN / "medtl"), "verify", str(evidence), check=False)
    assert res.returncode != 0 and "models/model.pt" in res.stdout + res.stderr


def _experiments(shown) -> dict[str, dict]:
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict):
                data = node["data"]
                metrics = data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {})
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                found[node["name"]] = {"metrics": metrics, "lr": params.get("finetune", {}).get("lr")}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    return found


def test_two_queued_experiments_run_in_parallel_and_are_both_listed(reference, tmp_path):
    ref, _ = reference
    p = Project(tmp_path / "queue")
    shutil.copytree(ref.path, p.path, symlinks=True)
    for name, lr in (("rel-slow", "0.0002"), ("rel-fast", "0.005")):
        p.dvc("exp", "run", "--queue", "-n", name, "-S", f"finetune.lr={lr}", "-S", "finetune.epochs=1")
    p.dvc("queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = p.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    else:
        pytest.fail(f"queued experiments still running after 15 minutes:\n{status}")
    assert "Failed" not in status, status + p.dvc("queue", "logs", "rel-slow", check=False).stdout
    exps = _experiments(json.loads(p.dvc("exp", "show", "--json").stdout))
    assert {"rel-slow", "rel-fast"} <= set(exps), exps
    slow, fast = exps["rel-slow"], exps["rel-fast"]
    assert (slow["lr"], fast["lr"]) == (0.0002, 0.005)
    assert slow["metrics"] and fast["metrics"] and slow["metrics"] != fast["metrics"]
    p.dvc("queue", "stop", check=False)


# ---- disk full, read-only output folder ---------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {f.relative_to(root).as_posix(): f.read_bytes() for top in ("data", "models", "reports")
            for f in (root / top).rglob("*") if f.is_file()}


def _preprocess(p: Project, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "stages/preprocess.py"], cwd=p.path, env=p.env, capture_output=True,
                          text=True, timeout=600, preexec_fn=preexec)


@pytest.fixture
def copy_of_reference(reference, tmp_path) -> Project:
    p = Project(tmp_path / "copy")
    shutil.copytree(reference[0].path, p.path, symlinks=True, ignore=shutil.ignore_patterns("cache"))
    p.update_params({"preprocess": {"image_size": 96}})  # four times the bytes of the outputs in place
    return p


def _fails_cleanly(p: Project, before: dict[str, bytes], res: subprocess.CompletedProcess, cause: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "data/prepared" in res.stderr and cause in res.stderr, res.stderr
    assert _snapshot(p.path) == before, "previous outputs changed"
    assert leftovers(p) == []


def test_a_file_size_limit_fails_preprocess_cleanly_and_keeps_the_previous_outputs(copy_of_reference):
    p = copy_of_reference
    before = _snapshot(p.path)

    def limit():  # writes past 64 KiB fail with EFBIG, as they would with ENOSPC on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    _fails_cleanly(p, before, _preprocess(p, limit), "File too large")


@contextlib.contextmanager
def _tmpfs_data(p: Project, extra_kib: int):
    """data/ on its own small filesystem holding what is there now plus `extra_kib`."""
    data = p.path / "data"
    saved = p.path / "data.saved"
    os.replace(data, saved)
    data.mkdir()
    used = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) // 1024
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + 256 + extra_kib}k", "tmpfs", str(data)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        os.rmdir(data)
        os.replace(saved, data)
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the RLIMIT_FSIZE test covers disk full")
    try:
        for f in saved.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, data / f.name)
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_a_full_disk_fails_preprocess_cleanly_and_keeps_the_previous_outputs(copy_of_reference):
    p = copy_of_reference
    with _tmpfs_data(p, extra_kib=64):
        before = _snapshot(p.path)
        _fails_cleanly(p, before, _preprocess(p), "No space left on device")


def test_a_read_only_output_folder_fails_preprocess_cleanly(copy_of_reference):
    p = copy_of_reference
    with _tmpfs_data(p, extra_kib=4096) as data:
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        before = _snapshot(p.path)
        _fails_cleanly(p, before, _preprocess(p), "Read-only file system")
