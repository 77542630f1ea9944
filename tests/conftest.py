"""Shared fixtures: a real tiny project built once per session, and cheap copies of it to mutate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: tools.harness, tasks

from tools.harness import (LAB_DATA, PROJECT_FILES, REPO, STAGES, copy_project, doit, executed,  # noqa: E402,F401
                           make_hub_cache, make_project, manifest, manifest_digests)


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """The default tiny pipeline built once, end to end, with the real libraries. Under pytest-xdist the
    workers build it once between them (the first to ask builds, the others wait), and each gets its own
    copy: tests run doit in it, and two workers must not share one project's state."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # set by pytest-xdist in its workers only
        project = make_project(tmp_path_factory.mktemp("built") / "project")
        doit(project)
        return project
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "built-once"  # the workers' common parent folder
    with FileLock(f"{shared}.lock"):
        if (shared / "project").is_dir() and not (shared / "done").is_file():
            pytest.fail("the shared tiny build failed on another worker; its error is that worker's")
        if not (shared / "done").is_file():
            doit(make_project(shared / "project"))
            (shared / "done").touch()
    return copy_project(shared / "project", tmp_path_factory.mktemp("built") / "project")


@pytest.fixture
def project_copy(built_project, tmp_path) -> Path:
    return copy_project(built_project, tmp_path / "project")


# Modules that build the pipeline many times, heaviest first: with `pytest -n 2 --dist loadfile` a worker
# takes whole modules in collection order, so starting the long ones first keeps both workers busy to
# the end (CI's wall time), instead of leaving one long module for last.
HEAVY_FIRST = ("test_ray_executor", "test_pipeline", "test_families", "test_adapters", "test_reliability",
               "test_publish", "test_kill", "test_matrix", "test_run_cache", "test_reproducible")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))  # stable
