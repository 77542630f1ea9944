"""Benchmark: cold build of the default (tiny) package in a fresh project folder, per-stage wall
times, and the no-op rebuild time. Writes JSON to stdout (and --out).

    .venv/bin/python bench/build_times.py --out bench/results/build_times.json
    # the same cold build for each model family's tiny model (model.tiny.family), one fresh folder each
    .venv/bin/python bench/build_times.py --families all --noop-runs 1 --out bench/results/family_build_times.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.harness import make_project  # noqa: E402


def run_doit(project: Path, *settings: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "doit", *settings], cwd=project, check=True, capture_output=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - start


def cold_build(noop_runs: int, *settings: str) -> dict:
    """One cold build in a fresh project folder (its own, empty run cache), then ``noop_runs`` no-op ones."""
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        make_project(project)
        cold = run_doit(project, *settings)
        stages = {}
        for log in sorted((project / "build/tiny/logs").glob("*.log")):
            match = re.search(r"done in ([0-9.]+)s", log.read_text())
            if match:
                stages[log.stem] = float(match.group(1))
        noop = [run_doit(project, *settings) for _ in range(noop_runs)]
        size = sum(p.stat().st_size for p in (project / "build/tiny/package").rglob("*") if p.is_file())
        config = json.loads((project / "build/tiny/base/config.json").read_text())
        facts = json.loads((project / "build/tiny/base/MANIFEST.json").read_text())["facts"]
    return {
        "cold_build_s": round(cold, 1),
        "stage_s": stages,
        "noop_s": {"median": round(statistics.median(noop), 3), "max": round(max(noop), 3)},
        "package_bytes": size,
        "parameters": facts.get("parameters"),
        "model_type": config["model_type"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--noop-runs", type=int, default=5)
    parser.add_argument("--families", default=None, help="'all' or a comma list of model.tiny.family values")
    args = parser.parse_args()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
    }
    if args.families:
        from tasks.families import FAMILIES

        names = sorted(FAMILIES) if args.families == "all" else args.families.split(",")
        result["families"] = {}
        for name in names:
            result["families"][name] = cold_build(args.noop_runs, f"model.tiny.family={name}")
            print(name, result["families"][name]["cold_build_s"], file=sys.stderr)
    else:
        result.update(cold_build(args.noop_runs))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
