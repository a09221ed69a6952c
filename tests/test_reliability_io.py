"""Atomic writes in-process: a failed write leaves the old file, a killed writer's temporaries are swept."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medtl.errors import MedtlError
from medtl.io import atomic_dir, atomic_path, write_json, write_text


def test_a_failing_block_leaves_the_previous_file_and_no_temporary(tmp_path):
    out = tmp_path / "metrics.json"
    write_json(out, {"auc": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text('{"auc": 0.')
            raise RuntimeError("killed mid-write")
    assert out.read_text() == '{\n  "auc": 0.9\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failing_block_leaves_the_previous_folder(tmp_path):
    out = tmp_path / "prepared"
    with atomic_dir(out) as tmp:
        (tmp / "train.npy").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "train.npy").write_bytes(b"ne")
            raise RuntimeError("killed mid-write")
    assert (out / "train.npy").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_an_output_whose_folder_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "models").write_text("not a folder")
    with pytest.raises(MedtlError, match=r"cannot write .*models/model\.pt"):
        write_text(tmp_path / "models" / "model.pt", "x")


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_temporaries_of_killed_writers_are_swept_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    stale_file = tmp_path / f".report.json.{dead}.abc123.tmp"
    stale_file.write_text('{"half')
    stale_dir = tmp_path / f".prepared.{dead}.xyz.tmp"
    stale_dir.mkdir()
    (stale_dir / "train.npy").write_bytes(b"half")
    (tmp_path / ".prepared.old").mkdir()
    live = tmp_path / f".report.json.{os.getppid()}.def456.tmp"  # a writer that is still running
    live.write_text("in progress")
    other = tmp_path / f".notes.txt.{dead}.q.tmp"  # another output's temporary is not ours to judge
    other.write_text("x")
    write_json(tmp_path / "report.json", {"ok": True})
    with atomic_dir(tmp_path / "prepared") as tmp:
        (tmp / "train.npy").write_bytes(b"new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["report.json", "prepared", live.name, other.name])


def test_atomic_outputs_get_the_permissions_a_plain_write_would_and_keys_stay_private(tmp_path):
    from medtl.provenance.signing import keygen

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "report.md", "x")
        with atomic_dir(tmp_path / "out") as d:
            (d / "a").write_text("a")
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
        private, public = keygen(tmp_path / "keys", passphrase=b"test passphrase")
    finally:
        os.umask(old)
    # Shared with the team (and the DVC cache), as open()/mkdir() would make them: not mkstemp's 0600.
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert public.stat().st_mode & 0o777 == 0o644 and private.stat().st_mode & 0o777 == 0o600
