"""One build at a time per build folder.

Two ``doit`` runs on the same ``build.dir`` would race on the same stage folders and on doit's state
database. The first run holds an exclusive ``flock`` on ``<build.dir>/.lock`` (released by the OS
when the process ends, however it ends); a second run exits at once with a message naming the holder.
Read-only doit commands (list, info, help, dumpdb) take no lock, nor does a doit started by a
process that holds the lock for it (``PIPELINE_BUILD_LOCK_HELD=1``: `doit incontainer`).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from tasks.errors import PipelineError

READ_ONLY_COMMANDS = {"list", "info", "help", "dumpdb", "tabcompletion", "strace"}


def doit_command(argv: list[str]) -> str:
    """The doit sub-command in argv (doit's default is ``run``)."""
    for arg in argv[1:]:
        if arg.startswith("-") or "=" in arg:
            continue
        return arg if arg in READ_ONLY_COMMANDS | {"run", "clean", "forget", "ignore", "reset-dep", "auto"} else "run"
    return "run"


def hold_build_lock(build_dir: Path) -> IO[str] | None:
    """Take the build folder's lock or raise PipelineError naming the process that has it."""
    if os.environ.get("PIPELINE_BUILD_LOCK_HELD") == "1":
        return None
    build_dir.mkdir(parents=True, exist_ok=True)
    handle = open(build_dir / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown pid"
        handle.close()
        raise PipelineError(
            f"another doit is building {build_dir} ({holder}); wait for it to finish, or stop it, "
            "or give this run its own build.dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle
