"""doit's own sub-commands on this project: one line where doit would print a traceback. Fast: only
`check` runs (no model)."""

from __future__ import annotations

import pytest

from conftest import doit, make_project


def test_doit_info_with_a_mistyped_task_names_it_and_suggests_the_real_one(tmp_path):
    project = make_project(tmp_path / "project")
    result = doit(project, "info", "finetun", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: no task named 'finetun'; did you mean `doit info finetune`?"
    info = doit(project, "info", "finetune", check=False)  # exit 1: not up to date, which info reports
    assert "LoRA trained against" in info.stdout and "manifest_intact('finetune')" in info.stdout


def test_doit_dumpdb_lists_this_builds_sqlite_state(tmp_path):
    project = make_project(tmp_path / "project")
    before = doit(project, "dumpdb", check=False)
    assert before.returncode == 2 and "run `doit` first" in before.stderr and "Traceback" not in before.stderr
    doit(project, "check")
    dumped = doit(project, "dumpdb")
    assert dumped.stdout.startswith("check -> ") and "Traceback" not in dumped.stderr


def test_doit_strace_is_a_build_and_takes_the_build_lock(tmp_path):
    from tasks.workspace_lock import READ_ONLY_COMMANDS, doit_command

    assert "strace" not in READ_ONLY_COMMANDS
    assert doit_command(["doit", "strace", "base"]) == "strace"


@pytest.mark.slow
def test_doit_info_names_the_config_keys_that_changed_old_and_new(built_project):
    # doit info exits 1 when the task would run
    result = doit(built_project, "info", "finetune", "finetune.rank=16", "finetune.alpha=8", check=False)
    assert "config changed: finetune.alpha: 16.0 -> 8.0; finetune.rank: 8 -> 16" in result.stdout
    assert '"learning_rate"' not in result.stdout  # not the whole section
