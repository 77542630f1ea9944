"""How many stages may use the GPU at once, across every build on this machine.

Parallel builds (``doit -n N matrix``, several build folders, several users) would otherwise start
several AWQ searches or LoRA trainings on one GPU and run it out of memory. A stage that computes on
the GPU first takes one of ``build.gpu_slots`` slot locks (``flock`` on files in one folder shared by
all builds: ``$PIPELINE_GPU_LOCK_DIR``, default ``~/.cache/ondevice-llm-build/gpu-slots``); when all are
held it waits, saying which processes hold them. The kernel drops a lock when its process dies, so a
killed build never leaves a slot taken. (The filelock package locks one file; this takes any one of N,
and names the holders while it waits.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from tasks.paths import ENV_GPU_LOCK_DIR


log = logging.getLogger("tasks.gpu")


def lock_dir() -> Path:
    explicit = os.environ.get(ENV_GPU_LOCK_DIR)
    return Path(explicit) if explicit else Path.home() / ".cache" / "ondevice-llm-build" / "gpu-slots"


@contextlib.contextmanager
def gpu_slot(slots: int, what: str, folder: Path | None = None, poll_s: float = 0.5) -> Iterator[int]:
    """Hold one of ``slots`` machine-wide GPU slots while the block runs; yields the slot number."""
    folder = folder or lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"slot-{i}.lock", "a+", encoding="utf-8") for i in range(slots)]
    try:
        announced = False
        while True:
            for index, handle in enumerate(handles):
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()}: {what}\n")
                handle.flush()
                if announced:
                    log.info("%s: got GPU slot %d", what, index)
                try:
                    yield index
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                return
            if not announced:
                holders = []
                for handle in handles:
                    handle.seek(0)
                    holders.append(handle.read().strip() or "?")
                log.info("%s: waiting for a GPU slot (build.gpu_slots = %d, held by: %s)", what, slots, "; ".join(holders))
                announced = True
            time.sleep(poll_s)
    finally:
        for handle in handles:
            handle.close()
