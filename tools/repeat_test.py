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

    def __init__(self, runs: int, out: Path, record: dict, built: Path | None) -> None:
        self.runs, self.out, self.record, self.built = runs, out, record, built

    @pytest.hookimpl(tryfirst=True)
    def pytest_fixture_setup(self, fixturedef, request):
        """--built: the session's built project is that folder (tests mutate copies of it only)."""
        if self.built is not None and fixturedef.argname == "built_project":
            fixturedef.cached_result = (self.built, fixturedef.cache_key(request), None)
            return self.built
        return None

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


def _code_differs(project: Path) -> str | None:
    """The first project file (code, config, data) whose bytes differ from this checkout's, if any."""
    from tests.conftest import PROJECT_FILES

    for name in PROJECT_FILES:
        src = REPO / name
        files = [p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts] if src.is_dir() else [src]
        for path in files:
            other = project / path.relative_to(REPO)
            if not other.is_file() or other.read_bytes() != path.read_bytes():
                return str(path.relative_to(REPO))
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("test")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--load", type=int, default=0, help="busy Python loops running alongside")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--built", type=Path, help="an already built project (`doit` run in a copy of this repo's "
                    "project files) used as the session's built_project instead of building one; its code must "
                    "be this checkout's")
    args = ap.parse_args()
    args.out = args.out.resolve()
    os.chdir(REPO)
    if args.built is not None:
        args.built = args.built.resolve()
        stale = _code_differs(args.built)
        if stale:
            sys.exit(f"--built {args.built}: its {stale} differs from this checkout's; rebuild it")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "tasks", "tests", "dodo.py"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit, "code_dirty": dirty,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
              "built_project": str(args.built) if args.built else "built by the session fixture",
              "load": f"{args.load} busy Python loops (while True: pass) for the whole session", "runs": []}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    start = time.monotonic()
    try:
        # The parametrized ids end in [runN], so the test is chosen by its file and its exact name.
        path, _, name = args.test.partition("::")
        code = pytest.main(["-p", "no:cacheprovider", "-q", path, *(["-k", name] if name else [])],
                           plugins=[Repeat(args.runs, args.out, record, args.built)])
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
