"""doit sub-commands that would otherwise end in a traceback, answered in dodo.py before doit runs them.

- ``doit info NAME`` with a name that is no task: doit raises KeyError; we name the task and suggest.
- ``doit dumpdb``: doit's command reads dbm files only, and our state is sqlite3 (DOIT_CONFIG's
  backend); ``DumpDB`` replaces it (pyproject.toml ``[tool.doit.plugins.command]``) and prints the
  same ``task -> values`` listing from this build's sqlite3 database.
- ``doit strace``: runs a task's actions under the ``strace`` program, so it is a build (it takes the
  build lock); without the program installed it would fail inside doit.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import pprint
import shutil
import sqlite3
import sys
from pathlib import Path

from doit.cmd_base import Command


def _positional(argv: list[str], command: str) -> list[str]:
    args = argv[argv.index(command) + 1:] if command in argv else []
    return [a for a in args if not a.startswith("-") and "=" not in a]


def answer_before_doit(argv: list[str], command: str, task_names: set[str], dep_file: Path) -> int | None:
    """An exit code when this command is answered here (the caller exits with it), else None."""
    if command == "info":
        for name in _positional(argv, "info"):
            if name.split(":")[0] not in task_names:
                close = difflib.get_close_matches(name, sorted(task_names), n=1)
                hint = f"did you mean `doit info {close[0]}`?" if close else "`doit list` shows every task"
                print(f"error: no task named {name!r}; {hint}", file=sys.stderr)
                return 2
    if command == "strace" and shutil.which("strace") is None:
        print("error: `doit strace` runs a task under the strace program, which is not installed; install it "
              "(apt-get install strace) or use `doit info TASK` to see a task's files", file=sys.stderr)
        return 2
    return None


class DumpDB(Command):
    """dump dependency DB (this build's sqlite3 state: `doit dumpdb [config=FILE] [build.dir=...]`)"""

    name = "dumpdb"
    doc_purpose = "dump dependency DB"
    doc_usage = ""
    doc_description = None

    def execute(self, opt_values, pos_args):
        from doit import get_var

        from tasks.cli_vars import config_overrides
        from tasks.config import load_config
        from tasks.errors import PipelineError
        from tasks.paths import Paths

        root = Path.cwd()
        try:
            dep_file = Paths.of(root, load_config(root / get_var("config", "pipeline.toml"), config_overrides())).doit_db
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        if not dep_file.is_file():
            print(f"error: no doit state yet ({dep_file} missing); run `doit` first", file=sys.stderr)
            return 2
        with contextlib.closing(sqlite3.connect(f"file:{dep_file}?mode=ro", uri=True)) as db:
            for task, data in db.execute("SELECT task_id, task_data FROM doit ORDER BY task_id"):
                print(f"{task} -> {pprint.pformat(json.loads(data), indent=4, width=100)}")
        return 0
