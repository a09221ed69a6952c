"""Data outside the project: a relative path out of it is refused before any work, in the workspace and in
DVC's queued experiments (which run from a copy inside .dvc/tmp); an absolute one works in both."""
from __future__ import annotations

import sys
import time

import pytest

from medtl.errors import ParamsError
from medtl.ingest.ingest import IngestParams
from medtl.params import build
from tests.project import make_project
from tests.test_ingest_dvc import ingest_params, write_images

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_source_roots_must_lie_inside_ingest_data(tmp_path):
    (tmp_path / "data" / "raw").mkdir(parents=True)
    with pytest.raises(ParamsError, match=r"'ingest.folder.root' is 'data/elsewhere', which is not inside ingest.data"):
        build(IngestParams, {"source": "folder", "data": "data/raw", "folder": {"root": "data/elsewhere"}}, "ingest")
    with pytest.raises(ParamsError, match=r"ingest.csv.manifest \(its folder, the images' root\).*not inside"):
        build(IngestParams, {"source": "csv", "data": "data/raw/m.csv", "csv": {"manifest": "data/raw/m.csv"}}, "ingest")
    with pytest.raises(ParamsError, match=r"'ingest.data' is '../data/x', a relative path that leaves the project.*"
                                          r"absolute path.*dvc import"):
        build(IngestParams, {"source": "folder", "data": "../data/x", "folder": {"root": "../data/x"}}, "ingest")


def text(res) -> str:
    return " ".join((res.stdout + res.stderr).split())  # messages are wrapped at the terminal's width


def wait_for_queue(project, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = project.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(2)
    pytest.fail(f"queued experiments still running:\n{status}")


@pytest.mark.e2e
def test_data_outside_the_project_in_queued_experiments(tmp_path):
    outside = tmp_path / "share" / "chest"
    write_images(outside, n=4)
    project = make_project(tmp_path / "project")
    relative = "../share/chest"
    ingest_params(project, {"source": "folder", "data": relative, "folder": {"root": relative}})
    project.commit("relative source")
    res = project.dvc("repro", "ingest", check=False)  # refused before any work, with what to do instead
    assert res.returncode != 0 and "relative path that leaves the project" in text(res)
    assert not (project.path / "data/ingested").exists()

    # `medtl cv run` refuses before queueing anything (in the queue, DVC itself would fail on the missing path)
    res = project.run(sys.executable, "-m", "medtl.cli", "cv", "run", "--folds", "2", check=False)
    assert res.returncode == 2 and "relative path that leaves the project" in text(res)
    assert "cv2-" not in project.dvc("queue", "status").stdout

    # the advice works: the same data by its absolute path, in a queued experiment
    project.dvc("exp", "run", "--queue", "-n", "abs", "-S", f"ingest.data={outside}", "-S",
                f"ingest.folder.root={outside}", "ingest")
    project.dvc("queue", "start", "-j", "1")
    status = wait_for_queue(project)
    assert "Success" in status and "Failed" not in status, status + text(project.dvc("queue", "logs", "abs", check=False))
