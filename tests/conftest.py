"""Shared fixtures: a real tiny project built once per session, and cheap copies of it to mutate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: tools.harness, tasks

from tools.harness import (LAB_DATA, PROJECT_FILES, REPO, STAGES, copy_project, doit, executed,  # noqa: E402,F401
                           make_hub_cache, make_project, manifest, manifest_digests)


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """The default tiny pipeline built once, end to end, with the real libraries."""
    project = make_project(tmp_path_factory.mktemp("built") / "project")
    doit(project)
    return project


@pytest.fixture
def project_copy(built_project, tmp_path) -> Path:
    return copy_project(built_project, tmp_path / "project")
