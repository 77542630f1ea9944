"""Fault injection with the real tiny pipeline: SIGKILL at random moments of every stage, and damaged
files inside finished stages. Every trial's seed, moment and outcome is recorded.

    .venv/bin/python tools/fault_trials.py --kill-trials 10 --damage-trials 5 --out reliability/trials.json

Per kill trial (stage S, seeded delay d): `doit forget S`, start `doit S`, SIGKILL its whole process
group after d seconds, then require: every published stage folder holds exactly its manifest's
files; S's manifest is the old one (or S is absent: killed inside the publish swap); `doit` exits 0;
`python -m tasks verify` passes; no staging leftovers; every stage's files are the original bytes
(builds are deterministic; only package/speed.json, a timing, may differ).

Per damage trial (stage S, seeded file and damage: truncate, flip a byte, delete, add a file):
`verify` must fail naming the file, the next `doit` must run S and the stages after it and no
other, and `verify` must pass again with the original bytes back.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.config import load_config  # noqa: E402
from tasks.manifest import file_table, sha256_file  # noqa: E402
from tasks.paths import Paths  # noqa: E402
from tasks.stages import STAGES  # noqa: E402
from tasks.verify import find_damage  # noqa: E402

STAGE_NAMES = [s.name for s in STAGES]
NOT_REPRODUCIBLE = {"package/speed.json"}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def folder_of(stage: str) -> str:
    return "package" if stage == "evaluate" else stage


def run(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=project, capture_output=True, text=True, env=ENV, timeout=1200)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def doit(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(project, "-m", "doit", *args, check=check)


def executed(result: subprocess.CompletedProcess) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\.  (\w+)$", result.stdout, re.MULTILINE) if m.group(1) in STAGE_NAMES]


def snapshot(project: Path) -> dict[str, dict]:
    """All published files of the build, keyed '<folder>/<file>' (sha256 and size)."""
    build = project / "build/tiny"
    table = {}
    for stage in STAGE_NAMES:
        folder = build / folder_of(stage)
        if folder.is_dir():
            table.update({f"{folder.name}/{k}": v for k, v in file_table(folder).items()})
            if (folder / "MANIFEST.json").is_file():
                table[f"{folder.name}/MANIFEST.json"] = {"sha256": sha256_file(folder / "MANIFEST.json")}
    return table


def whole(project: Path) -> list[str]:
    """Problems: published stage folders whose files differ from their manifest's list, or that have none."""
    paths = Paths.of(project, load_config(project / "pipeline.toml"))
    problems = [f"{stage}: {'; '.join(found)}" for stage, found in find_damage(paths).items()]
    problems += [f"{stage}: folder without MANIFEST.json" for stage in STAGE_NAMES
                 if paths.stage(stage).exists() and not paths.manifest(stage).is_file()]
    return problems


def same_bytes(a: dict, b: dict) -> list[str]:
    keys = (set(a) | set(b)) - NOT_REPRODUCIBLE - {"package/MANIFEST.json"}
    return sorted(k for k in keys if a.get(k, {}) and b.get(k, {}) and a[k]["sha256"] != b[k]["sha256"]
                  or (k in a) != (k in b))


def stage_durations(project: Path) -> dict[str, float]:
    """Wall seconds of `doit <stage>` alone (forgotten first), the range the kill moment is drawn from."""
    durations = {}
    for stage in STAGE_NAMES:
        doit(project, "forget", stage)
        start = time.monotonic()
        doit(project, stage)
        durations[stage] = round(time.monotonic() - start, 2)
    return durations


def kill_trial(project: Path, original: dict, stage: str, seed: str, horizon: float) -> dict:
    rng = random.Random(seed)
    delay = round(rng.uniform(0.2, horizon), 3)
    doit(project, "forget", stage)
    log = project / "build/tiny/logs" / f"{stage}.log"
    log.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "doit", stage], cwd=project, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    time.sleep(delay)
    finished_first = proc.poll() is not None
    if not finished_first:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    last_log = log.read_text(errors="replace").strip().splitlines()[-1][9:120] if log.is_file() and log.stat().st_size else ""
    record = {"stage": stage, "seed": seed, "delay_s": delay, "killed": not finished_first, "last_log_line": last_log}
    problems = whole(project)
    manifest = project / "build/tiny" / folder_of(stage) / "MANIFEST.json"
    key = f"{folder_of(stage)}/MANIFEST.json"
    if manifest.is_file() and stage != "evaluate" and {"sha256": sha256_file(manifest)} != original.get(key):
        problems.append(f"{stage}: a different manifest was published")
    record["stage_output_after_kill"] = "whole (previous, or its identical rebuild)" if manifest.is_file() else "absent (killed inside the publish swap)"
    rebuild = doit(project, check=False)
    record["rebuilt"] = executed(rebuild)
    if rebuild.returncode:
        problems.append(f"doit after the kill failed: {rebuild.stderr.strip()[-300:]}")
    verify = run(project, "-m", "tasks", "verify", check=False)
    if verify.returncode:
        problems.append(f"verify failed: {verify.stderr.strip()[-300:]}")
    leftovers = [p.name for p in (project / "build/tiny/.staging").glob("*")]
    if leftovers:
        problems.append(f"staging leftovers: {leftovers}")
    problems += [f"bytes changed: {k}" for k in same_bytes(original, snapshot(project))]
    record["problems"] = problems
    return record


DAMAGES = ("truncate", "flip_byte", "delete", "add_file")


def damage_trial(project: Path, original: dict, stage: str, seed: str) -> dict:
    rng = random.Random(seed)
    folder = project / "build/tiny" / folder_of(stage)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    target = rng.choice(files)
    kind = rng.choice(DAMAGES)
    rel = target.relative_to(folder).as_posix()
    if kind == "truncate":
        size = target.stat().st_size
        with open(target, "r+b") as fh:
            fh.truncate(rng.randrange(0, max(size, 1)))
    elif kind == "flip_byte":
        data = bytearray(target.read_bytes())
        if data:
            data[rng.randrange(len(data))] ^= 0xFF
        else:
            data = bytearray(b"x")
        target.write_bytes(bytes(data))
    elif kind == "delete":
        target.unlink()
    else:
        rel = "stray.bin"
        (folder / rel).write_bytes(b"not from the build")
    record = {"stage": stage, "seed": seed, "file": f"{folder.name}/{rel}", "damage": kind}
    problems = []
    verify = run(project, "-m", "tasks", "verify", check=False)
    record["verify_message"] = verify.stdout.strip().splitlines()[0][:200] if verify.stdout.strip() else ""
    if verify.returncode == 0:
        problems.append("verify did not notice the damage")
    elif rel not in verify.stdout:
        problems.append("verify's message does not name the damaged file")
    rebuild = doit(project, check=False)
    record["rebuilt"] = executed(rebuild)
    expected = STAGE_NAMES[STAGE_NAMES.index(stage):]
    if rebuild.returncode:
        problems.append(f"doit after the damage failed: {rebuild.stderr.strip()[-300:]}")
    elif record["rebuilt"][: 1] != [stage] or not set(record["rebuilt"]) <= set(expected):
        problems.append(f"rebuilt {record['rebuilt']}, expected {stage} first and only stages from it on")
    if run(project, "-m", "tasks", "verify", check=False).returncode:
        problems.append("verify fails after the rebuild")
    problems += [f"bytes changed: {k}" for k in same_bytes(original, snapshot(project))]
    record["problems"] = problems
    return record


def make_project(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst / rel)
    return dst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-trials", type=int, default=10, help="per stage")
    parser.add_argument("--damage-trials", type=int, default=5, help="per stage")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES))
    parser.add_argument("--seed", default="0")
    parser.add_argument("--project", type=Path, help="an already built project copy to use (default: build one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    stages = args.stages.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        project = args.project or make_project(Path(tmp) / "project")
        start = time.monotonic()
        doit(project)
        durations = stage_durations(project)
        original = snapshot(project)
        print(f"stage durations (doit <stage> alone, s): {durations}", flush=True)
        trials = []
        for stage in stages:
            for i in range(args.kill_trials):
                # Kill moments cover the stage's whole run, doit's start-up and the publish included.
                record = kill_trial(project, original, stage, f"{args.seed}-kill-{stage}-{i}", durations[stage] * 1.05)
                trials.append({"fault": "sigkill", **record})
                print(json.dumps(trials[-1]), flush=True)
            for i in range(args.damage_trials):
                record = damage_trial(project, original, stage, f"{args.seed}-damage-{stage}-{i}")
                trials.append({"fault": "damage", **record})
                print(json.dumps(trials[-1]), flush=True)
        failed = [t for t in trials if t["problems"]]
        summary = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "stage_durations_s": durations, "trials": len(trials), "failed": len(failed),
            "killed_mid_run": sum(1 for t in trials if t.get("killed")),
            "finished_before_kill": sum(1 for t in trials if t["fault"] == "sigkill" and not t["killed"]),
            "wall_s": round(time.monotonic() - start, 1),
        }
        print(json.dumps(summary, indent=2), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"summary": summary, "trials": trials}, indent=2) + "\n")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
