import pytest

from tests.project import TINY_PARAMS, Project, make_project


@pytest.fixture
def project(tmp_path) -> Project:
    """A fresh git + dvc copy of the project with tiny params (not yet run)."""
    return make_project(tmp_path / "project", TINY_PARAMS)
