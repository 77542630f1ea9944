"""A built project under damage and misuse: damaged manifests, a stage that crashes, an edited
package, a doit killed while its stage runs on. The previous good package survives every one."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tasks.config import load_config
from tasks.manifest import file_table, read_manifest
from tasks.paths import Paths
from tasks.run_cache import RunCache

from conftest import doit, executed, manifest_digests

pytestmark = pytest.mark.slow
BUILD = "build/tiny"


def truncate(path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def test_a_truncated_manifest_is_damage_that_verify_names_and_doit_rebuilds(project_copy):
    good = manifest_digests(project_copy)
    truncate(project_copy / BUILD / "quantize/MANIFEST.json")
    verify = doit(project_copy, "verify", check=False)
    assert verify.returncode != 0 and "Traceback" not in verify.stdout + verify.stderr
    assert "quantize: damaged MANIFEST.json" in verify.stdout
    assert "marked stale: quantize, finetune, export, evaluate" in verify.stderr
    rebuilt = doit(project_copy)
    assert executed(rebuilt) == ["quantize", "finetune", "export", "evaluate"]
    assert manifest_digests(project_copy) == good  # restored, verified, the same bytes


def test_no_stage_is_up_to_date_on_top_of_a_damaged_manifest(project_copy):
    good = manifest_digests(project_copy)
    truncate(project_copy / BUILD / "finetune/MANIFEST.json")
    result = doit(project_copy)  # no verify first: doit itself must not trust it
    assert "finetune" in executed(result)
    assert manifest_digests(project_copy) == good
    assert doit(project_copy, "verify").returncode == 0


def test_a_deleted_manifest_is_named_by_verify_and_its_folder_is_replaced_only_once_moved_out(project_copy, tmp_path):
    good = manifest_digests(project_copy)
    (project_copy / BUILD / "export/MANIFEST.json").unlink()
    verify = doit(project_copy, "verify", check=False)
    assert verify.returncode != 0 and "export: MANIFEST.json is missing" in verify.stdout
    # A folder without a manifest may be someone's own: doit refuses to replace it, in one line that says what to do.
    result = doit(project_copy, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "export exists but is not an output of this build" in errors[0] and "move it out" in errors[0]
    assert executed(result) == ["export"]  # nothing after it ran on top of it
    os.rename(project_copy / BUILD / "export", tmp_path / "export")
    assert executed(doit(project_copy)) == ["export", "evaluate"]  # evaluate was marked stale by verify
    assert manifest_digests(project_copy) == good
    assert doit(project_copy, "verify").returncode == 0


def test_a_failing_stage_prints_one_line_and_its_log_holds_the_traceback(project_copy):
    good = manifest_digests(project_copy)
    weights = project_copy / BUILD / "finetune/adapter/adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 64)  # damage that no manifest was told about
    doit(project_copy, "forget", "export")
    result = doit(project_copy, "export", "cache.enabled=false", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: stage export failed: ")
    assert f"full traceback in {project_copy / BUILD / 'logs/export.log'}" in errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "Traceback (most recent call last)" in (project_copy / BUILD / "logs/export.log").read_text()
    assert manifest_digests(project_copy)["export"] == good["export"]  # the previous export is untouched


def test_editing_the_package_never_reaches_export_or_the_run_cache(project_copy):
    package_file = project_copy / BUILD / "package/cpu/genai_config.json"
    export_file = project_copy / BUILD / "export/cpu/genai_config.json"
    assert stat.S_IMODE(package_file.stat().st_mode) & 0o222 == 0  # published read-only: editors refuse
    assert package_file.stat().st_ino != export_file.stat().st_ino
    export_before = export_file.read_bytes()
    os.chmod(package_file, 0o644)  # a user who insists (or root, who ignores the mode)
    with open(package_file, "a", encoding="utf-8") as fh:
        fh.write("\n")
    assert export_file.read_bytes() == export_before
    cfg = load_config(project_copy / "pipeline.toml")
    for _, _, entry in RunCache.of(Paths.of(project_copy, cfg), cfg).entries():
        assert file_table(entry) == read_manifest(entry)["files"], entry
    verify = doit(project_copy, "verify", check=False)
    assert "evaluate: changed cpu/genai_config.json" in verify.stdout
    assert "marked stale: evaluate" in verify.stderr  # export and every earlier stage intact


def test_a_killed_doit_keeps_the_build_locked_while_its_stage_runs_on(project_copy):
    log = project_copy / BUILD / "logs/finetune.log"
    log.unlink()
    # A real change and no cache, so that finetune computes: doit dies, the stage goes on.
    proc = subprocess.Popen([sys.executable, "-m", "doit", "finetune", "finetune.max_steps=400", "cache.enabled=false"],
                            cwd=project_copy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (log.is_file() and "finetune: 2" in log.read_text(errors="replace")):
            assert proc.poll() is None, "finetune finished before doit could be killed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # doit alone, not its process group
        proc.wait()
        second = doit(project_copy, "finetune", check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert "a stage of an earlier doit is still running" in second.stderr and "finetune pid" in second.stderr
        orphans = [p for p in (project_copy / BUILD / ".staging").iterdir() if p.name.startswith("finetune.")]
        assert orphans, "the running stage's staging folder was removed by the second doit"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned stage, which kept doit's process group
    for _ in range(100):
        if doit(project_copy, "list", check=False).returncode == 0 and doit(project_copy, "check", check=False).returncode == 0:
            break
        time.sleep(0.1)
    assert doit(project_copy).returncode == 0
