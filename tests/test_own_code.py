"""Every run executes the code its dvc.lock records: a queued experiment runs its own copy of medtl, not the workspace's."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.project import make_project

pytestmark = pytest.mark.e2e


def test_queued_experiment_runs_its_own_medtl_not_the_workspace_edit(tmp_path):
    p = make_project(tmp_path / "project")
    # Without PYTHONPATH, `import medtl` alone would find the environment's install (another checkout).
    p.env = {k: v for k, v in p.env.items() if k != "PYTHONPATH"}
    stage_py = p.path / "medtl/stage.py"
    original = stage_py.read_text()
    marked = original.replace("    start = time.perf_counter()\n", "    print('CODE-OF-THE-QUEUED-EXPERIMENT')\n"
                              "    start = time.perf_counter()\n", 1)
    assert marked != original
    stage_py.write_text(marked)
    p.dvc("exp", "run", "--queue", "-n", "own-code", "ingest")
    # Edited in the workspace after queueing: the queued experiment must not run this.
    stage_py.write_text(marked.replace("CODE-OF-THE-QUEUED-EXPERIMENT", "EDITED-IN-THE-WORKSPACE-AFTER-QUEUEING"))
    p.dvc("exp", "run", "--run-all")
    logs = p.dvc("queue", "logs", "own-code").stdout
    assert "ingest: " in logs and "images from" in logs, logs
    assert "CODE-OF-THE-QUEUED-EXPERIMENT" in logs, logs
    assert "EDITED-IN-THE-WORKSPACE" not in logs, logs
    # ... and its dvc.lock records the code that ran.
    ref = p.git("for-each-ref", "refs/exps", "--format=%(objectname) %(refname)").stdout.split()
    commit = ref[ref.index(next(r for r in ref if r.endswith("/own-code"))) - 1]
    lock = yaml.safe_load(p.git("show", f"{commit}:dvc.lock").stdout)
    locked = {d["path"]: d["md5"] for d in lock["stages"]["ingest"]["deps"]}
    assert locked["medtl/stage.py"] == hashlib.md5(marked.encode()).hexdigest()


def test_stage_refuses_another_medtl_than_its_projects(tmp_path):
    """A stage whose process imported another copy of medtl (here: this checkout's) stops, naming both."""
    from medtl.errors import MedtlError
    from medtl.stage import check_own_code

    (tmp_path / "medtl").mkdir()
    (tmp_path / "medtl/__init__.py").write_text("")
    (tmp_path / "stages").mkdir()
    script = tmp_path / "stages/ingest.py"
    script.write_text("")
    with pytest.raises(MedtlError, match="not the one of this workspace") as e:
        check_own_code(str(script))
    assert str(tmp_path / "medtl") in str(e.value)
    check_own_code(str(Path(medtl_file()).parents[1] / "stages/ingest.py"))  # its own project: runs


def medtl_file() -> str:
    import medtl

    return medtl.__file__
