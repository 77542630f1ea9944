"""The one test harness: a fresh project folder, the doit runner and what the tests, the benchmarks and
the fault-trial tool read off a build. Imported by tests/conftest.py, bench/ and tools/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.manifest import sha256_file
from tasks.paths import MANIFEST, stage_folder
from tasks.stages import STAGES as STAGE_SPECS

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dodo.py", "pipeline.toml", "pyproject.toml", "tasks", "data", "requirements")
STAGES = tuple(s.name for s in STAGE_SPECS)  # the core stages, in build order
LAB_DATA = REPO.parent / "shared" / "data" / "data_sample_travel.jsonl"


def make_project(dst: Path) -> Path:
    """A fresh project folder: the repo's code, config and data, no build outputs."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def doit(project: Path, *args: str, check: bool = True, timeout: int = 900,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``doit ARGS`` in ``project``, offline; ``env`` adds to (or overrides) the environment."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "doit", *args], cwd=project, capture_output=True,
                            text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def executed(result: subprocess.CompletedProcess) -> list[str]:
    """Stage names doit ran (lines '.  name'); up-to-date tasks print '-- name'."""
    return [m.group(1) for m in re.finditer(r"^\.  (\w+)$", result.stdout, re.MULTILINE) if m.group(1) in STAGES]


def manifest(project: Path, stage: str, build_dir: str = "build/tiny") -> dict:
    return json.loads((project / build_dir / stage_folder(stage) / MANIFEST).read_text())


def manifest_digests(project: Path, build_dir: str = "build/tiny") -> dict[str, str]:
    """sha256 of every stage's MANIFEST.json: equal before and after means nothing was rebuilt or lost."""
    return {s: sha256_file(project / build_dir / stage_folder(s) / MANIFEST)
            for s in STAGES}


def make_hub_cache(model_dir: Path, hf_home: Path, repo_id: str, revision: str) -> Path:
    """A model folder as the HF cache holds a download: models--org--name/{blobs/<sha256>,
    snapshots/<commit>/<file> -> blob, refs/main}. Returns the snapshot folder."""
    import hashlib

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in sorted(model_dir.iterdir()):
        if path.name == MANIFEST or not path.is_file():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def copy_project(src: Path, dst: Path) -> Path:
    """Copy a built project (outputs and doit state included; mtimes kept) to mutate it safely."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def write_dataset(project: Path, name: str, reply) -> str:
    """A dataset of the project's own travel prompts with another kind of answer (a different skill)."""
    records = [json.loads(line) for line in (project / "data/travel_qa.jsonl").read_text().splitlines()]
    rel = f"data/{name}_qa.jsonl"
    (project / rel).write_text("".join(json.dumps({"prompt": r["prompt"], "response": reply(r)}) + "\n" for r in records))
    return f'adapters.{name}.path="{rel}"'
