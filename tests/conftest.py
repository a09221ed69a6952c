import pytest

from tests.project import TINY_PARAMS, Project, make_project


@pytest.fixture
def project(tmp_path) -> Project:
    """A fresh git + dvc copy of the project with tiny params (not yet run)."""
    return make_project(tmp_path / "project", TINY_PARAMS)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Project:
    """The whole pipeline run once with tiny params and committed. Read it, or copy it with copy_project."""
    p = make_project(tmp_path_factory.mktemp("tiny-run") / "project", TINY_PARAMS)
    p.dvc("repro")
    p.commit("run")
    return p
