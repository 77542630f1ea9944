"""One build at a time per build folder.

Two ``doit`` runs on the same ``build.dir`` would race on the same stage folders and on doit's state
database. The first run holds an exclusive ``flock`` on ``<build.dir>/.lock`` (released by the OS
when the process ends, however it ends); a second run exits at once with a message naming the holder.
Read-only doit commands (list, info, help, dumpdb) take no lock, nor does a doit started by a
process that holds the lock for it (``PIPELINE_BUILD_LOCK_HELD=1``: `doit incontainer`).

The lock must outlive doit's own process: a stage is a child process, and killing doit alone (not its
process group) leaves the stage running. So every stage process also holds a shared lock on
``<build.dir>/.stage-lock`` for as long as it lives, and a new doit takes the build lock only when it
can briefly take that one exclusively, i.e. when no stage process of an earlier run is still alive.

Why fcntl and not the filelock package: filelock has no shared locks, and this needs one (every
stage process shares .stage-lock), plus a non-blocking probe that names the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, Iterator

from tasks.errors import PipelineError
from tasks.paths import ENV_BUILD_LOCK_HELD, STAGING_FOLDER

READ_ONLY_COMMANDS = {"list", "info", "help", "dumpdb", "tabcompletion"}


def doit_command(argv: list[str]) -> str:
    """The doit sub-command in argv (doit's default is ``run``)."""
    for arg in argv[1:]:
        if arg.startswith("-") or "=" in arg:
            continue
        return arg if arg in READ_ONLY_COMMANDS | {"run", "clean", "forget", "ignore", "reset-dep", "auto", "strace"} else "run"
    return "run"


def hold_build_lock(build_dir: Path) -> IO[str] | None:
    """Take the build folder's lock or raise PipelineError naming the process that has it."""
    if os.environ.get(ENV_BUILD_LOCK_HELD) == "1":
        return None
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        handle = open(build_dir / ".lock", "a+", encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"build.dir = {build_dir}: cannot take the build lock ({exc.strerror or exc}); a build "
                            "writes there: make the folder writable or choose another build.dir") from None
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
    orphans = _running_stages(build_dir)
    if orphans:
        handle.close()
        raise PipelineError(
            f"a stage of an earlier doit is still running in {build_dir} ({orphans}); its doit was stopped but the "
            "stage was not: wait for it to finish or stop it (kill the pid), then run doit again")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


STAGE_LOCK = ".stage-lock"


def _running_stages(build_dir: Path) -> str:
    """'' when no stage process holds the stage lock; else which ones do (from their staging folders)."""
    path = build_dir / STAGE_LOCK
    if not path.exists():
        return ""
    with open(path, "a+", encoding="utf-8") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        except OSError:  # a filesystem without locks (some network mounts): nothing to learn here
            return ""
        else:
            fcntl.flock(probe, fcntl.LOCK_UN)
            return ""
    alive = []
    for staging in sorted((build_dir / STAGING_FOLDER).glob("*.*")):
        stage, _, pid = staging.name.rpartition(".")
        if pid.isdigit() and pid_alive(int(pid)):
            alive.append(f"{stage} pid {pid}")
    return ", ".join(alive) or "pid unknown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def stage_lock(build_dir: Path) -> Iterator[None]:
    """Held (shared) by a stage process for its whole life: the build folder stays locked while it runs."""
    with open(build_dir / STAGE_LOCK, "a+", encoding="utf-8") as handle:
        with contextlib.suppress(OSError):  # no locks on this filesystem: the doit lock still applies
            fcntl.flock(handle, fcntl.LOCK_SH)
        yield


def die_with_parent(parent_pid: int | None = None) -> None:
    """Linux: this process is killed when its parent dies (PR_SET_PDEATHSIG), so that no process of a
    stage (a distributed finetune's rank, the stage under a Ray task) outlives it and the build lock
    it holds. ``parent_pid``: exit now if the parent is already gone (it died before the call)."""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
