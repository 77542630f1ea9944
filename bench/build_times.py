"""Benchmark: cold build of the default (tiny) package in a fresh project folder, per-stage wall
times, and the no-op rebuild time. Writes JSON to stdout (and --out).

    .venv/bin/python bench/build_times.py --out bench/results/build_times.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_doit(project: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "doit"], cwd=project, check=True, capture_output=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--noop-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        for name in ("dodo.py", "pipeline.toml", "tasks", "data"):
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / name)
        cold = run_doit(project)
        stages = {}
        for log in sorted((project / "build/tiny/logs").glob("*.log")):
            match = re.search(r"done in ([0-9.]+)s", log.read_text())
            if match:
                stages[log.stem] = float(match.group(1))
        noop = [run_doit(project) for _ in range(args.noop_runs)]
        size = sum(p.stat().st_size for p in (project / "build/tiny/package").iterdir())
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        "cold_build_s": round(cold, 1),
        "stage_s": stages,
        "noop_s": {"median": round(statistics.median(noop), 3), "max": round(max(noop), 3)},
        "package_bytes": size,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
