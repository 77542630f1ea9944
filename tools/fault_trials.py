"""Fault injection with the real tiny pipeline: SIGKILLs at random moments and at failpoints of every
stage, with the run cache on and off, and damaged files (MANIFEST.json included) inside finished stages.
Every trial's seed, moment and outcome is recorded.

    .venv/bin/python tools/fault_trials.py --seed S --out reliability/trials.json

Kill trials (stage S): `doit forget S`, start `doit S` in its own process group, SIGKILL the group, then
check (below).
  --kills N          the run cache on: `doit S` restores S from the cache. The moment is drawn between 0
                     and 1.05 x the measured span from the stage's "building into" log line to doit's exit
                     (the restore, the publish, the provenance record, doit's state write), after that line.
  --kills-nocache N  `cache.enabled=false` on every doit call of the trial: S is computed. The moment is
                     drawn between 0.2 s and 1.05 x the measured `doit S` time (doit's start-up, the
                     computation, the publish and doit's state write all fall in that range); measured
                     on the first build (empty cache, every stage computed), or with the cache off.
  --failpoint-kills N  at each failpoint of tasks/failpoints.py (PIPELINE_FAILPOINT): the process writes
                     a marker file and waits there, and the trial kills the group as soon as the marker
                     appears: inside the manifest write (manifest.written), inside the publish swap
                     (publish.swap), mid-restore (cache.restore). The cache is on: at manifest.written and
                     publish.swap a restored output is being published.
  --store-kills N    at cache.store, mid-store: the stage's cache entries are removed first, so the stage
                     is computed, published and stored, and computed again by the next doit.
  --failpoint-kills-nocache N  more at manifest.written and publish.swap with the cache off: a computed
                     output is being published, and the next doit computes the stage again.
After every kill: each published folder holds exactly its manifest's files; S's manifest is the one
from before the trial, or S is absent (killed inside the publish swap); `doit` (same cache setting)
exits 0 and runs no stage before S; `python -m tasks verify` passes; no staging leftovers; every
file of every stage has its original bytes (builds are deterministic; only package/speed.json, a
timing, may differ) and is read-only; every run cache entry's files equal its manifest's list; nothing
outside build.dir and cache.dir changed (the project's other files, planted files beside the build
and cache folders, a sibling folder of the project).

Damage trials (stage S, the run cache on):
  --damages N           a seeded file of S (not the manifest): truncate, flip a byte, delete, add a file.
  --manifest-damages N  S's MANIFEST.json: truncate, flip a byte, delete (in turn); N trials that run
                        `verify` first and N that run `doit` directly.
With verify first: verify must fail naming the file (or MANIFEST.json), the next `doit` must run S first
and only stages from S on, `verify` must pass again, the original bytes must be back (with the cache on,
restored), and the checks above hold. With doit directly: S must rerun, before any stage after it.
A deleted MANIFEST.json leaves a folder that doit does not replace (it may not be the build's: see
staged_output); the expected outcome is verify naming it, doit refusing in one line that says to move the
folder out of the build, and, once the trial has done that, doit rebuilding S and the checks above.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.config import load_config  # noqa: E402
from tasks.failpoints import ENV as FAILPOINT_ENV, FILE_ENV as FAILPOINT_FILE_ENV, NAMES as FAILPOINTS  # noqa: E402
from tasks.manifest import MANIFEST, DamagedManifest, file_table, read_manifest, sha256_file  # noqa: E402
from tasks.ownership import CACHE_LEFTOVER  # noqa: E402
from tools.harness import make_project  # noqa: E402
from tasks.paths import STAGING_FOLDER, Paths  # noqa: E402
from tasks.run_cache import RunCache  # noqa: E402
from tasks.stages import STAGES  # noqa: E402
from tasks.verify import find_damage  # noqa: E402

STAGE_NAMES = [s.name for s in STAGES]
NOT_REPRODUCIBLE = {"package/speed.json"}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
for _name in (FAILPOINT_ENV, FAILPOINT_FILE_ENV):
    ENV.pop(_name, None)
BUILD = "build/tiny"
CACHE = ".cache/runs"
NO_CACHE = "cache.enabled=false"


def folder_of(stage: str) -> str:
    return "package" if stage == "evaluate" else stage


def run(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=project, capture_output=True, text=True, env=ENV, timeout=1800)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def doit(project: Path, *args: str, cache: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    return run(project, "-m", "doit", *([] if cache else [NO_CACHE]), *args, check=check)


def start_doit(project: Path, stage: str, cache: bool, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "doit", *([] if cache else [NO_CACHE]), stage], cwd=project,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**ENV, **(env or {})})


def kill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL doit and every process it started; False when it had already finished."""
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return not finished


def executed(result: subprocess.CompletedProcess) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\.  (\w+)$", result.stdout, re.MULTILINE) if m.group(1) in STAGE_NAMES]


def snapshot(project: Path) -> dict[str, dict]:
    """All published files of the build, keyed '<folder>/<file>' (sha256 and size)."""
    build = project / BUILD
    table = {}
    for stage in STAGE_NAMES:
        folder = build / folder_of(stage)
        if folder.is_dir():
            table.update({f"{folder.name}/{k}": v for k, v in file_table(folder).items()})
            if (folder / MANIFEST).is_file():
                table[f"{folder.name}/{MANIFEST}"] = {"sha256": sha256_file(folder / MANIFEST)}
    return table


def same_bytes(a: dict, b: dict) -> list[str]:
    keys = (set(a) | set(b)) - NOT_REPRODUCIBLE - {f"package/{MANIFEST}"}
    return sorted(k for k in keys if a.get(k, {}) and b.get(k, {}) and a[k]["sha256"] != b[k]["sha256"]
                  or (k in a) != (k in b))


def whole(project: Path) -> list[str]:
    """Problems: published stage folders whose files differ from their manifest's list, or that have none."""
    paths = Paths.of(project, load_config(project / "pipeline.toml"))
    damaged = find_damage(paths)
    problems = [f"{stage}: {'; '.join(found)}" for stage, found in damaged.items()]
    problems += [f"{stage}: folder without {MANIFEST}" for stage in STAGE_NAMES
                 if stage not in damaged and paths.stage(stage).exists() and not paths.manifest(stage).is_file()]
    return problems


def writable_files(project: Path) -> list[str]:
    """Published files that are not read-only (every published file is 0444)."""
    build = project / BUILD
    return sorted(f"{folder_of(s)}/{p.relative_to(build / folder_of(s)).as_posix()}" for s in STAGE_NAMES
                  if (build / folder_of(s)).is_dir() for p in (build / folder_of(s)).rglob("*")
                  if p.is_file() and stat.S_IMODE(p.stat().st_mode) & 0o222)


def cache_state(project: Path) -> tuple[list[str], dict[str, int], list[str]]:
    """(problems, entries per stage, leftovers) of the run cache: every entry's files must equal its manifest's list."""
    cache = RunCache(project / CACHE, 0)
    problems, counts = [], {}
    for _, _, entry in cache.entries():
        counts[entry.parent.name] = counts.get(entry.parent.name, 0) + 1
        try:
            listed = read_manifest(entry)["files"]
        except (DamagedManifest, OSError) as exc:
            problems.append(f"cache entry {entry.parent.name}/{entry.name[:12]}: {exc}")
            continue
        if file_table(entry) != listed:
            problems.append(f"cache entry {entry.parent.name}/{entry.name[:12]}: files differ from its manifest")
    leftovers = sorted(f"{d.name}/{p.name}" for d in (project / CACHE).iterdir() if d.is_dir()
                       for p in d.iterdir() if CACHE_LEFTOVER.match(p.name)) if (project / CACHE).is_dir() else []
    return problems, counts, leftovers


def outside_snapshot(project: Path, sibling: Path) -> dict[str, list]:
    """Every file and folder the build does not own: the project outside build.dir and cache.dir (planted
    files beside both included) and a sibling folder of the project; Python's __pycache__ left out."""
    owned = {(project / BUILD).resolve(), (project / CACHE).resolve()}
    table = {}
    for top in (project, sibling):
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and (here / d).resolve() not in owned)
            for name in sorted(filenames) + dirnames:
                path = here / name
                info = path.lstat()
                key = path.relative_to(top.parent).as_posix()
                if stat.S_ISREG(info.st_mode):
                    table[key] = [sha256_file(path), info.st_size, stat.S_IMODE(info.st_mode), info.st_mtime_ns]
                else:
                    table[key] = ["dir" if stat.S_ISDIR(info.st_mode) else "other", stat.S_IMODE(info.st_mode)]
    return table


def staging_contents(project: Path) -> list[str]:
    staging = project / BUILD / STAGING_FOLDER
    return sorted(f"{p.name} ({sum(1 for f in p.rglob('*') if f.is_file())} files)" if p.is_dir() else p.name
                  for p in staging.iterdir()) if staging.is_dir() else []


def last_log_line(project: Path, stage: str) -> str:
    log = project / BUILD / "logs" / f"{stage}.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return lines[-1][9:140] if lines else ""


def phase(line: str) -> str:
    """Where a kill landed, from the stage log's last line."""
    if not line:
        return "before the stage logged"
    if "done in" in line:
        return "after the stage finished (doit recording)"
    if "restored from the run cache" in line or "stored in the run cache" in line:
        return "after the restore or store (publish, provenance, exit)"
    return "mid-stage"


class Trials:
    def __init__(self, project: Path, sibling: Path, scratch: Path):
        self.project, self.sibling, self.scratch = project, sibling, scratch
        self.original = snapshot(project)
        self.outside = outside_snapshot(project, sibling)
        self.records: list[dict] = []

    def manifest_digest(self, stage: str) -> str | None:
        path = self.project / BUILD / folder_of(stage) / MANIFEST
        return sha256_file(path) if path.is_file() else None

    def log_path(self, stage: str) -> Path:
        return self.project / BUILD / "logs" / f"{stage}.log"

    def wait_for_log(self, proc: subprocess.Popen, stage: str, text: str, timeout: float = 1200) -> float | None:
        """Monotonic time at which the stage log first holds text; None if doit ended first."""
        log, deadline = self.log_path(stage), time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if text in log.read_text(errors="replace"):
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.005)
        return None

    def horizons(self, stages: list[str], cache: bool, forget: bool = True) -> dict[str, dict[str, float]]:
        """Per stage: wall seconds of `doit S` alone (forgotten first) and, from the stage's "building into"
        log line to doit's exit, the span the cached kills are drawn from."""
        out = {}
        for stage in stages:
            if forget:
                doit(self.project, "forget", stage, cache=cache)
            self.log_path(stage).unlink(missing_ok=True)
            start = time.monotonic()
            proc = start_doit(self.project, stage, cache)
            logged = self.wait_for_log(proc, stage, "building into")
            if proc.wait():
                raise RuntimeError(f"doit {stage} failed while measuring")
            end = time.monotonic()
            out[stage] = {"doit_s": round(end - start, 2), "from_stage_log_s": round(end - (logged or start), 2)}
        return out

    # --- checks shared by every kill -------------------------------------------------------------------

    def after_kill(self, record: dict, stage: str, before: str | None, cache: bool, problems: list[str]) -> dict:
        project = self.project
        problems += whole(project)
        now = self.manifest_digest(stage)
        record["staging_after_kill"] = staging_contents(project)
        if now is None:
            record["stage_output_after_kill"] = "absent"
        elif now == before:
            record["stage_output_after_kill"] = "previous (or its identical rebuild)"
        else:
            record["stage_output_after_kill"] = "a new, whole output"
            if stage != "evaluate":  # evaluate's manifest lists speed.json, a timing
                problems.append(f"{stage}: a different manifest was published")
        rebuild = doit(project, cache=cache, check=False)
        record["rebuilt"] = executed(rebuild)
        if rebuild.returncode:
            problems.append(f"doit after the kill failed: {rebuild.stderr.strip()[-300:]}")
        earlier = [s for s in record["rebuilt"] if STAGE_NAMES.index(s) < STAGE_NAMES.index(stage)]
        if earlier:
            problems.append(f"doit after the kill reran stages before {stage}: {earlier}")
        self.final_checks(record, problems)
        return record

    def final_checks(self, record: dict, problems: list[str]) -> None:
        project = self.project
        verify = run(project, "-m", "tasks", "verify", check=False)
        if verify.returncode:
            problems.append(f"verify failed: {(verify.stdout + verify.stderr).strip()[-300:]}")
        leftovers = [p.name for p in (project / BUILD / STAGING_FOLDER).glob("*")]
        if leftovers:
            problems.append(f"staging leftovers: {leftovers}")
        problems += [f"bytes changed: {k}" for k in same_bytes(self.original, snapshot(project))]
        problems += [f"published file not read-only: {k}" for k in writable_files(project)]
        cache_problems, counts, cache_leftovers = cache_state(project)
        problems += cache_problems
        record["cache_entries"] = counts
        if cache_leftovers:
            record["cache_leftovers"] = cache_leftovers
        outside = outside_snapshot(project, self.sibling)
        changed = sorted(k for k in set(outside) | set(self.outside) if outside.get(k) != self.outside.get(k))
        problems += [f"changed outside build.dir and cache.dir: {k}" for k in changed]
        record["problems"] = problems

    # --- the trials ------------------------------------------------------------------------------------

    def kill_trial(self, stage: str, seed: str, cache: bool, horizon: dict) -> dict:
        rng = random.Random(seed)
        before = self.manifest_digest(stage)
        doit(self.project, "forget", stage, cache=cache)
        self.log_path(stage).unlink(missing_ok=True)
        if cache:
            # Aimed at the restore: a moment after the stage logged that it started.
            delay = round(rng.uniform(0.0, horizon["from_stage_log_s"] * 1.05), 3)
            proc = start_doit(self.project, stage, cache)
            if self.wait_for_log(proc, stage, "building into") is not None:
                time.sleep(delay)
        else:
            delay = round(rng.uniform(0.2, horizon["doit_s"] * 1.05), 3)
            proc = start_doit(self.project, stage, cache)
            time.sleep(delay)
        killed = kill_group(proc)
        line = last_log_line(self.project, stage)
        record = {"fault": "sigkill", "stage": stage, "cache": cache, "seed": seed,
                  ("delay_after_stage_logged_s" if cache else "delay_s"): delay, "killed": killed,
                  "last_log_line": line, "landed": phase(line) if killed else "doit had finished"}
        return self.after_kill(record, stage, before, cache, [])

    def failpoint_trial(self, stage: str, point: str, seed: str, cache: bool) -> dict:
        problems: list[str] = []
        before = self.manifest_digest(stage)
        if point == "cache.store":  # the stage must be computed and stored: drop its entries
            for entry in sorted((self.project / CACHE / stage).glob("*")):
                if entry.is_dir() and re.fullmatch(r"[0-9a-f]{64}", entry.name):
                    shutil.rmtree(entry)
        doit(self.project, "forget", stage, cache=cache)
        self.log_path(stage).unlink(missing_ok=True)
        marker = self.scratch / "failpoint.hit"
        marker.unlink(missing_ok=True)
        start = time.monotonic()
        proc = start_doit(self.project, stage, cache, {FAILPOINT_ENV: point, FAILPOINT_FILE_ENV: str(marker)})
        while proc.poll() is None and not marker.exists() and time.monotonic() - start < 1800:
            time.sleep(0.002)
        hit = marker.exists()
        killed = kill_group(proc)
        record = {"fault": "failpoint", "stage": stage, "failpoint": point, "cache": cache, "seed": seed,
                  "reached_s": round(time.monotonic() - start, 2), "hit": hit, "killed": killed,
                  "last_log_line": last_log_line(self.project, stage)}
        if not (hit and killed):
            problems.append(f"the failpoint {point} was never reached")
        if hit:
            record["marker"] = json.loads(marker.read_text())
        now = self.manifest_digest(stage)
        if point == "publish.swap" and now is not None:
            problems.append("killed inside the publish swap, yet the stage folder is there")
        computed_and_published = point == "cache.store" and stage == "evaluate"  # a new speed.json
        if point != "publish.swap" and now != before and not computed_and_published:
            problems.append(f"after a kill at {point}, {stage}'s manifest is not the one from before the trial")
        if point == "cache.store":
            _, counts, leftovers = cache_state(self.project)
            record["cache_after_kill"] = {"entries": counts.get(stage, 0), "leftovers": leftovers}
            if counts.get(stage):
                problems.append("killed before the entry's rename, yet the entry is there")
        return self.after_kill(record, stage, before, cache, problems)

    def damage_trial(self, stage: str, seed: str, target: str, kind: str | None = None, verify_first: bool = True) -> dict:
        rng = random.Random(seed)
        folder = self.project / BUILD / folder_of(stage)
        if target == "manifest":
            path = folder / MANIFEST
        else:
            path = rng.choice(sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST))
            kind = rng.choice(("truncate", "flip_byte", "delete", "add_file"))
        rel = path.relative_to(folder).as_posix()
        detail = ""
        if kind in ("truncate", "flip_byte"):
            path.chmod(0o644)  # published files are read-only: a disk fault or a forced edit
            data = bytearray(path.read_bytes())
            if kind == "truncate" and data:
                # A manifest loses at least one byte that is not its final newline.
                cut = rng.randrange(0, len(data.rstrip()) if target == "manifest" else len(data))
                data, detail = data[:cut], f"to {cut} of {len(data)} bytes"
            elif data:
                at = rng.randrange(len(data))
                data[at] ^= 0xFF
                detail = f"byte {at} of {len(data)}"
            else:
                data, detail = bytearray(b"x"), "an empty file given a byte"
            with open(path, "r+b") as fh:
                fh.truncate(0)
                fh.write(bytes(data))
        elif kind == "delete":
            path.unlink()
        else:
            rel = "stray.bin"
            (folder / rel).write_bytes(b"not from the build")
        record = {"fault": "damage", "stage": stage, "seed": seed, "file": f"{folder.name}/{rel}", "damage": kind,
                  "detail": detail, "verify_first": verify_first}
        problems: list[str] = []
        if verify_first:
            verify = run(self.project, "-m", "tasks", "verify", check=False)
            lines = [l for l in verify.stdout.splitlines() if l.startswith(f"{stage}:")]
            record["verify_message"] = (lines[0] if lines else verify.stdout.strip())[:240]
            if verify.returncode == 0:
                problems.append("verify did not notice the damage")
            elif rel not in "\n".join(lines):
                problems.append("verify's message does not name the damaged file")
        rebuild = doit(self.project, check=False)
        if target == "manifest" and kind == "delete":
            # A folder without a manifest may not be ours (tasks/manifest.py, staged_output): doit refuses to
            # replace it, in one line that says to move it out of the build folder. Do that, then doit.
            errors = [line for line in rebuild.stderr.splitlines() if line.startswith("error:")]
            record["doit_refused"] = errors[0][:240] if errors else ""
            if (rebuild.returncode == 0 or len(errors) != 1 or "not an output of this build" not in errors[0]
                    or "Traceback" in rebuild.stderr or executed(rebuild) != [stage]):
                problems.append(f"doit did not refuse the folder without a manifest in one line: {rebuild.stderr[-300:]}")
            shutil.move(folder, self.scratch / f"moved-{len(self.records)}-{folder.name}")
            record["then"] = f"moved {folder.name}/ out of the build, as the line says; doit"
            rebuild = doit(self.project, check=False)
        record["rebuilt"] = executed(rebuild)
        expected = STAGE_NAMES[STAGE_NAMES.index(stage):]
        if rebuild.returncode:
            problems.append(f"doit after the damage failed: {rebuild.stderr.strip()[-300:]}")
        elif record["rebuilt"][:1] != [stage] or not set(record["rebuilt"]) <= set(expected):
            problems.append(f"rebuilt {record['rebuilt']}, expected {stage} first and only stages from it on")
        self.final_checks(record, problems)
        return record

    def add(self, record: dict) -> None:
        self.records.append(record)
        print(json.dumps(record), flush=True)
        if record["problems"]:
            record["healed"] = self.heal()

    def heal(self) -> list[str]:
        """After a failed trial, get back to a whole build so that later trials start clean: stage folders
        without a manifest (which doit refuses to replace) are moved out of the build, then doit and verify."""
        steps = []
        for stage in STAGE_NAMES:
            folder = self.project / BUILD / folder_of(stage)
            if folder.is_dir() and not (folder / MANIFEST).exists() and not (folder / "MANIFEST.stale.json").exists():
                shutil.move(folder, self.scratch / f"healed-{len(self.records)}-{folder.name}")
                steps.append(f"moved {folder.name}/ (no manifest) out of the build")
        result = doit(self.project, check=False)
        steps.append(f"doit: exit {result.returncode}, ran {executed(result)}")
        steps.append(f"verify: exit {run(self.project, '-m', 'tasks', 'verify', check=False).returncode}")
        self.outside = outside_snapshot(self.project, self.sibling)
        return steps


def plant(project: Path, sibling: Path) -> None:
    """Files the build does not own, beside its folders: they must never change."""
    for path, text in ((project / "build/notes.txt", "beside build.dir\n"), (project / ".cache/keep.txt", "beside cache.dir\n"),
                       (sibling / "thesis.tex", "\\begin{document}\n"), (sibling / "figures/plot.csv", "x,y\n1,2\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(text, encoding="utf-8")


def summarize(records: list[dict]) -> dict:
    table: dict = {}
    for t in records:
        key = t["fault"] + ("" if t["fault"] != "failpoint" else f" {t['failpoint']}") + \
            ("" if t["fault"] == "damage" else (" cache on" if t["cache"] else " cache off"))
        row = table.setdefault(key, {}).setdefault(t["stage"], {"trials": 0, "failed": 0})
        row["trials"] += 1
        row["failed"] += bool(t["problems"])
        if "landed" in t:
            row.setdefault("landed", {}).setdefault(t["landed"], 0)
            row["landed"][t["landed"]] += 1
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="random SIGKILLs per stage, the run cache on")
    parser.add_argument("--kills-nocache", type=int, default=5, help="random SIGKILLs per stage, cache.enabled=false")
    parser.add_argument("--failpoint-kills", type=int, default=3,
                        help="SIGKILLs per stage at manifest.written, publish.swap and cache.restore (cache on)")
    parser.add_argument("--store-kills", type=int, default=3,
                        help="SIGKILLs per stage at cache.store (the stage is computed, and again after the kill)")
    parser.add_argument("--failpoint-kills-nocache", type=int, default=1,
                        help="more per stage at manifest.written and publish.swap, cache.enabled=false (computed)")
    parser.add_argument("--failpoints", default=",".join(FAILPOINTS))
    parser.add_argument("--damages", type=int, default=3, help="damaged files per stage (not the manifest)")
    parser.add_argument("--manifest-damages", type=int, default=3,
                        help="damaged MANIFEST.json per stage, verify first; as many again with doit directly")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES))
    parser.add_argument("--seed", default="0")
    parser.add_argument("--project", type=Path, help="an already built project copy to use (default: build one)")
    parser.add_argument("--date", default=None, help="the date to record (default: today, UTC)")
    parser.add_argument("--machine", default="", help="a description of the machine to record")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    stages = args.stages.split(",")
    points = [p for p in args.failpoints.split(",") if p]
    unknown = set(points) - set(FAILPOINTS) or set(stages) - set(STAGE_NAMES)
    if unknown:
        parser.error(f"unknown failpoints or stages: {sorted(unknown)}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        project = args.project or make_project(Path(tmp) / "project")
        sibling = project.parent / "sibling"
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        where = run(project, "-c", "import tasks; print(tasks.__file__)").stdout.strip()
        if not Path(where).resolve().is_relative_to(project.resolve()):
            raise SystemExit(f"the project's doit would import tasks from {where}, not from the project copy")
        plant(project, sibling)
        start = time.monotonic()
        horizons = {}
        if args.project:
            doit(project)
            trials = Trials(project, sibling, scratch)
        else:
            # The first build, one stage at a time with an empty cache: every stage computed (and stored,
            # under a second), its time the horizon of the kills with the cache off.
            doit(project, "check")
            trials = Trials(project, sibling, scratch)
            horizons["computed"] = trials.horizons(STAGE_NAMES, cache=True, forget=False)
            print(f"horizons, computed (the first build, empty cache) (s): {horizons['computed']}", flush=True)
            trials = Trials(project, sibling, scratch)
        horizons["cache_on"] = trials.horizons(stages, cache=True)
        print(f"horizons, the run cache on (s): {horizons['cache_on']}", flush=True)
        trials.original = snapshot(project)
        for stage in stages:
            for i in range(args.kills):
                trials.add(trials.kill_trial(stage, f"{args.seed}-kill-cache-{stage}-{i}", True,
                                             horizons["cache_on"][stage]))
        for point in points:
            for stage in stages:
                for i in range(args.store_kills if point == "cache.store" else args.failpoint_kills):
                    trials.add(trials.failpoint_trial(stage, point, f"{args.seed}-{point}-{stage}-{i}", True))
        for stage in stages:
            for i in range(args.damages):
                trials.add(trials.damage_trial(stage, f"{args.seed}-damage-{stage}-{i}", "file"))
            for i in range(args.manifest_damages):
                kind = ("truncate", "flip_byte", "delete")[i % 3]
                for verify_first in (True, False):
                    seed = f"{args.seed}-manifest-{stage}-{i}-{'verify' if verify_first else 'doit'}"
                    trials.add(trials.damage_trial(stage, seed, "manifest", kind, verify_first))
        nocache_points = [(p, s, i) for p in points if not p.startswith("cache.") for s in stages
                          for i in range(args.failpoint_kills_nocache)]
        if args.kills_nocache or nocache_points:
            if "computed" not in horizons:
                horizons["computed"] = trials.horizons(stages, cache=False)
                print(f"horizons, the run cache off (s): {horizons['computed']}", flush=True)
            for stage in stages:
                for i in range(args.kills_nocache):
                    trials.add(trials.kill_trial(stage, f"{args.seed}-kill-nocache-{stage}-{i}", False,
                                                 horizons["computed"][stage]))
            for point, stage, i in nocache_points:
                trials.add(trials.failpoint_trial(stage, point, f"{args.seed}-{point}-nocache-{stage}-{i}", False))
        records = trials.records
        failed = [t for t in records if t["problems"]]
        summary = {
            "date": args.date or time.strftime("%Y-%m-%d", time.gmtime()),
            "commit": commit + (" (with uncommitted changes)" if dirty else ""),
            "command": " ".join(["python", *sys.argv]),
            "machine": args.machine,
            "seed": args.seed,
            "horizons_s": horizons,
            "trials": len(records), "failed": len(failed),
            "by_kind": summarize(records),
            "wall_s": round(time.monotonic() - start, 1),
        }
        print(json.dumps(summary, indent=2), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"summary": summary, "trials": records}, indent=2) + "\n")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
