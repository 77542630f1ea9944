"""Benchmark: what the run cache saves when a parameter is switched to a new value and back.

In a fresh project folder (own run cache): a cold build, then `finetune.rank=16` (finetune, export
and evaluate computed), then back to the default rank (the same three stages restored from the
cache), and for comparison the same switch back with the cache off (computed again). Writes JSON.

    .venv/bin/python bench/switch_back.py --out bench/results/switch_back.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.harness import make_project  # noqa: E402


def timed_doit(project: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "doit", *args], cwd=project, check=True, capture_output=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        make_project(project)
        result = {
            "cold_build_s": timed_doit(project),
            "switch_to_rank16_s": timed_doit(project, "finetune.rank=16"),
            "switch_back_with_cache_s": timed_doit(project),
        }
        timed_doit(project, "finetune.rank=16", "cache.enabled=false")  # leave rank 16 built
        # cache.enabled is read by the runner only: doit sees the same stage config as before
        result["switch_back_without_cache_s"] = timed_doit(project, "cache.enabled=false")
    result.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), cpus=os.cpu_count(),
                  machine=platform.machine(), python=platform.python_version())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
