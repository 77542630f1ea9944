"""Reliability: a full disk, concurrent builds, and the fast part of the fault-injection trials.

The long trials (SIGKILLs with the run cache on and off and at every failpoint, damaged files and
manifests, per stage) run from one command, see RELIABILITY.md.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


from conftest import REPO, doit, executed, manifest_digests

pytestmark = pytest.mark.slow
BUILD = "build/tiny"



def used_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(project_copy):
    """Put the copied project's build folder on its own small tmpfs; yields a function that sets its
    free space (MB above what the build already uses). Needs root (mount)."""
    build = project_copy / BUILD
    backup = project_copy / "build-backup"
    shutil.move(build, backup)
    build.mkdir()
    mounted = []

    def mount(free_mb: int) -> Path:
        size = used_bytes(backup) // (1 << 20) + free_mb
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(build)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the disk-full tests need root")
        mounted.append(build)
        shutil.copytree(backup, build, dirs_exist_ok=True, symlinks=True)  # copy2 keeps mtimes: doit stays up to date
        return build

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_preflight_refuses_a_stage_that_cannot_fit_and_changes_nothing(project_copy, small_disk):
    small_disk(free_mb=20)
    before = manifest_digests(project_copy)
    result = doit(project_copy, "export.check_prompts=4", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not enough disk space for stage export" in errors[0] and "MB are free" in errors[0]
    assert "Traceback" not in result.stderr
    assert manifest_digests(project_copy) == before


def test_disk_filling_up_mid_stage_gives_one_clear_line_and_keeps_the_previous_output(project_copy, small_disk):
    build = small_disk(free_mb=300)
    before = manifest_digests(project_copy)
    log = build / "logs/export.log"
    log.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "doit", "export.check_prompts=4"], cwd=project_copy,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and "model builder" in log.read_text(errors="replace"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "export finished before the disk could be filled"
    # Another process takes every free byte while export is writing.
    filler = build / "filler.bin"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
        except OSError:
            pass
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors and "no space left on device while building export" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert manifest_digests(project_copy) == before                   # nothing published, nothing lost
    assert not [p for p in (build / ".staging").iterdir() if p.name.startswith("export.")]
    filler.unlink()
    assert subprocess.run([sys.executable, "-m", "tasks", "verify"], cwd=project_copy, capture_output=True).returncode == 0
    assert executed(doit(project_copy, "export.check_prompts=4")) == ["export", "evaluate"]


def test_many_simultaneous_doit_runs_one_builds_the_others_name_it_and_nothing_is_corrupted(project_copy):
    (project_copy / "data/travel_qa.jsonl").open("a", encoding="utf-8").write(
        json.dumps({"prompt": "Is Porto hilly?", "response": "Very; wear good shoes."}) + "\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "doit"], cwd=project_copy, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    results = [(p, *p.communicate(timeout=900)) for p in procs]
    winners = [r for r in results if r[0].returncode == 0]
    losers = [r for r in results if r[0].returncode != 0]
    assert len(winners) == 1, [r[2][-500:] for r in results]
    for _, _, stderr in losers:
        lines = [l for l in stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "another doit" in lines[0] and "pid" in lines[0], stderr[-500:]
    assert "finetune" in executed(subprocess.CompletedProcess([], 0, winners[0][1], ""))
    verify = subprocess.run([sys.executable, "-m", "tasks", "verify"], cwd=project_copy, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert executed(doit(project_copy)) == []


def test_fault_trials_one_sigkill_per_stage_adopt_nothing_partial(built_project, tmp_path):
    """The CI slice of tools/fault_trials.py: per stage one SIGKILL while doit restores it from the run cache
    and one damaged file (the long run adds kills with the cache off, at failpoints, and manifest damage)."""
    project = shutil.copytree(built_project, tmp_path / "project", symlinks=True)
    out = tmp_path / "trials.json"
    result = subprocess.run([sys.executable, str(REPO / "tools/fault_trials.py"), "--kills", "1", "--kills-nocache", "0",
                             "--failpoint-kills", "0", "--store-kills", "0", "--failpoint-kills-nocache", "0", "--damages", "1",
                             "--manifest-damages", "0", "--project", str(project), "--seed", "ci", "--out", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert out.is_file(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert result.returncode == 0, json.dumps([t for t in report["trials"] if t["problems"]], indent=1)
    assert report["summary"]["trials"] == 10 and report["summary"]["failed"] == 0


def test_a_sigkill_inside_the_publish_swap_leaves_no_output_rather_than_a_partial_one_and_doit_completes(
        project_copy, tmp_path):
    """The failpoint publish.swap (tasks/failpoints.py) holds the stage between the two renames of the swap,
    the old output renamed away and the new one not yet in place; the whole process group is killed there."""
    before = manifest_digests(project_copy)
    doit(project_copy, "forget", "finetune")
    marker = tmp_path / "failpoint.hit"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PIPELINE_FAILPOINT": "publish.swap",
           "PIPELINE_FAILPOINT_FILE": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "doit", "finetune"], cwd=project_copy, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
            time.sleep(0.01)
        assert marker.exists(), "the stage never reached the publish swap"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads(marker.read_text())["failpoint"] == "publish.swap"
    build = project_copy / BUILD
    assert not (build / "finetune").exists()  # no output, never a partial one; the old one is aside
    aside = sorted(p.name for p in (build / ".staging").iterdir() if p.name.startswith("finetune."))
    assert len(aside) == 2 and aside[1] == aside[0] + ".old"  # the new output and the old one, both whole
    assert executed(doit(project_copy)) == ["finetune"]  # restored; the stages after it stay up to date
    assert manifest_digests(project_copy) == before
    assert not list((build / ".staging").iterdir())
    assert subprocess.run([sys.executable, "-m", "tasks", "verify"], cwd=project_copy, capture_output=True).returncode == 0


def test_a_planted_hf_token_appears_in_no_output_log_state_file_or_process_argument(project_copy, tmp_path):
    """Full build of a Hub-profile model (offline, local cache) with HF_TOKEN set; then every byte the
    build wrote, its terminal output, and every process command line seen during the run are scanned."""
    import secrets as pysecrets

    from test_hub import REPO_ID, REVISION, make_hub_cache

    token = "hf_PLANTED" + pysecrets.token_hex(16)
    make_hub_cache(project_copy / "build/tiny/base", tmp_path / "hf")
    env = {**os.environ, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    args = ["model.profile=hub", f"model.repo_id={REPO_ID}", f"model.revision={REVISION}", "build.dir=build/secret"]
    proc = subprocess.Popen([sys.executable, "-m", "doit", *args], cwd=project_copy, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    seen_in_argv, seen_in_environ = set(), set()
    own = str(project_copy).encode()
    while proc.poll() is None:
        for pid_dir in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
                if token.encode() in cmdline:
                    seen_in_argv.add(cmdline.replace(b"\0", b" ")[:200])
                if own in (pid_dir / "environ").read_bytes() or b"tasks" in cmdline:
                    if token.encode() in (pid_dir / "environ").read_bytes():
                        seen_in_environ.add(pid_dir.name)
            except OSError:
                continue
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert seen_in_environ, "the scan never saw a build process (it could not have caught a leak either)"
    assert not seen_in_argv, seen_in_argv
    assert token.encode() not in stdout + stderr
    leaks = []
    for root in (project_copy / "build/secret", tmp_path / "hf"):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and token.encode() in path.read_bytes():
                leaks.append(str(path))
    assert not leaks, leaks
    assert (project_copy / "build/secret/package/README.md").is_file()  # the scan covered a whole build
