"""Run one pytest test N times in a row in one session (the session fixtures are built once), with
optional CPU load (busy Python loops), and write one JSON record per run.

    .venv/bin/python tools/repeat_test.py TEST_ID --runs 20 --load 2 --out reliability/x.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests import tests.conftest, as under `python -m pytest` from the root


class Repeat:
    """pytest plugin: parametrize every collected test over range(runs); record each call."""

    def __init__(self, runs: int, out: Path, record: dict) -> None:
        self.runs, self.out, self.record = runs, out, record

    @pytest.fixture
    def repeat_index(self, request):
        return request.param

    def pytest_generate_tests(self, metafunc):
        metafunc.fixturenames.append("repeat_index")
        metafunc.parametrize("repeat_index", range(self.runs), indirect=True, ids=lambda i: f"run{i + 1}")

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.record["runs"].append({
                "test": report.nodeid, "phase": report.when, "outcome": report.outcome,
                "duration_s": round(report.duration, 1), "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "error": str(report.longrepr)[-3000:] if report.failed else None,
            })
            self.out.write_text(json.dumps(self.record, indent=2) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("test")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--load", type=int, default=0, help="busy Python loops running alongside")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out = args.out.resolve()
    os.chdir(REPO)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "tasks", "tests", "dodo.py"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit, "code_dirty": dirty,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
              "load": f"{args.load} busy Python loops (while True: pass) for the whole session", "runs": []}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    start = time.monotonic()
    try:
        # The parametrized ids end in [runN], so the test is chosen by its file and its exact name.
        path, _, name = args.test.partition("::")
        code = pytest.main(["-p", "no:cacheprovider", "-q", path, *(["-k", name] if name else [])],
                           plugins=[Repeat(args.runs, args.out, record)])
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    calls = [r for r in record["runs"] if r["phase"] == "call"]
    record["summary"] = {"runs": len(calls), "passed": sum(r["outcome"] == "passed" for r in calls),
                         "failed": sum(r["outcome"] != "passed" for r in record["runs"]),
                         "wall_s": round(time.monotonic() - start, 1), "pytest_exit": int(code)}
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record["summary"]))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
