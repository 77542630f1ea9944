"""Eight adapters on the tiny profile: local serial vs `doit -n 2` vs a 2-node Ray cluster.

    sudo .venv/bin/python bench/scale_out.py --out bench/results/scale_out.json

Builds the tiny project once (base, quantize, finetune, export), then, from a copy of it each time and
with the run cache off, adds eight adapter datasets and times the `doit` that trains and exports the
eight adapters and evaluates the package (8 finetune_* + 8 adapter_* + evaluate + check):
  serial   doit                      (one stage at a time, this machine)
  n2       doit -n 2                 (two stage processes at a time, this machine)
  ray      doit executor.kind=ray    (a 2-node cluster on this machine, 1 CPU each, in a loopback-only
                                      network namespace: needs root; see tools/ray_cluster.py)
and, for the Ray run, each stage's dispatch overhead: the stage's time on the cluster minus the
stage process's own time on the node (reaching the doit run's dispatcher, scheduling, and for the
first stage on a node starting the dispatcher and a worker).
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(REPO))

from tools.harness import copy_project, make_project  # noqa: E402
from tools.ray_cluster import LoopbackCluster, loopback_namespace_available  # noqa: E402
from tools.harness import write_dataset  # noqa: E402

ADAPTERS = 8


def env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def adapter_settings(project: Path) -> list[str]:
    """Eight datasets of the project's prompts, each with its own kind of answer, and their config keys."""
    settings = [write_dataset(project, f"skill{i}", lambda r, i=i: f"Skill {i} answer: " + r["response"][: 20 + 5 * i])
                for i in range(ADAPTERS)]
    return settings + ["cache.enabled=false"]


def timed(cmd: list[str], cwd: Path, runner=subprocess.run) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = runner(cmd, cwd=cwd, capture_output=True, text=True, env=env())
    elapsed = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed, result


def run_ray(base: Path, work: Path, results: dict) -> None:
    project = copy_project(base, work / "ray")
    cluster = LoopbackCluster(port=6391)
    try:
        start = time.perf_counter()
        cluster.start_head("node_a")
        cluster.add_node("node_b")
        results["ray_cluster_start_s"] = round(time.perf_counter() - start, 1)
        # As many stages at a time as the cluster has CPUs (like -n 2): none waits in Ray's queue,
        # so each stage's overhead below is dispatch alone.
        cmd = [sys.executable, "-m", "doit", *adapter_settings(project), "executor.kind=ray",
               f"executor.address={cluster.address}", "executor.parallel=2"]
        wall, result = timed(cmd, project, runner=lambda c, **kw: cluster.run(c, check=False, cwd=kw["cwd"], env=kw["env"]))
    finally:
        cluster.stop()
    lines = re.findall(r"^(\w+): ([0-9.]+)s on the cluster, ([0-9.]+)s of it the stage on node", result.stderr,
                       re.MULTILINE)
    overhead = [float(total) - float(own) for _, total, own in lines]
    by_stage = {name: round(float(total) - float(own), 2) for name, total, own in lines}
    nodes = {json.loads(p.read_text())["node"].get("node_id") for p in (project / "build/tiny/provenance").glob("*.json")
             if p.stem.startswith(("finetune_", "adapter_"))}
    results["ray"] = {"wall_s": round(wall, 1), "stages": len(lines), "nodes_used": len(nodes),
                      "dispatch_overhead_s": {"median": round(statistics.median(overhead), 2),
                                              "min": round(min(overhead), 2), "max": round(max(overhead), 2),
                                              "per_stage": by_stage}}
    print(f"ray: {wall:.1f} s; {results['ray']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/scale_out.json")
    parser.add_argument("--modes", default="serial,n2,ray", help="which runs (results merge into --out)")
    args = parser.parse_args()
    why_not = loopback_namespace_available()
    if why_not:
        raise SystemExit(f"error: the Ray run {why_not}")
    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    modes_wanted = args.modes.split(",")
    results: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results |= {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                     "adapters": ADAPTERS}
    try:
        base = make_project(work / "base")
        results["core_build_s"] = round(timed([sys.executable, "-m", "doit", "cache.enabled=false"], base)[0], 1)
        print(f"core build {results['core_build_s']} s", flush=True)
        modes = {"serial": [], "n2": ["-n", "2"]}
        for mode, extra in modes.items():
            if mode not in modes_wanted:
                continue
            project = copy_project(base, work / mode)
            wall, _ = timed([sys.executable, "-m", "doit", *extra, *adapter_settings(project)], project)
            results[mode] = {"wall_s": round(wall, 1)}
            print(f"{mode}: {wall:.1f} s", flush=True)
        if "ray" in modes_wanted:
            run_ray(base, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
