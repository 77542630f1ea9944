"""Data-parallel LoRA training across ``finetune.processes`` processes with torch.distributed.

This process is rank 0 (it keeps the stage's logging, progress and output folder); ranks 1..N-1 are
spawned Python processes running the same loop (tasks.finetune.train) on their share of each global
batch. Backend: gloo on cpu, NCCL on cuda (rank r on GPU r).

Rendezvous: rank 0 opens the TCPStore on loopback port 0 (the kernel's choice, held from then on)
before the other ranks start and hands them its port, so no other process can take the port in
between. Shutdown: every rank meets at a barrier after training; ranks 1..N-1 then leave, and rank 0,
which hosts the store, tears its process group and the store down only after they have exited, so no
rank ever talks to a peer or a store that is already gone. Each spawned rank's stderr goes to a file
that lands in the stage log; a rank that fails is reported with its exit and its last stderr line.
If any rank dies, the others stop at the next collective (timeout) and the stage fails; the staging
folder is dropped and the previous finetune output stays published.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path

from tasks.config import DataSection, FinetuneSection
from tasks.errors import PipelineError
from tasks.workspace_lock import die_with_parent

log = logging.getLogger("tasks.finetune")
# The other ranks' stderr: a logger outside "tasks", so that it reaches the stage log file but not the terminal.
rank_log = logging.getLogger("finetune.ranks")
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
JOIN_TIMEOUT_S = 300  # for the other ranks to leave after the final barrier (tear-down and exit only)


def _process_group(rank: int, world: int, store, device: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)


def _worker(rank: int, world: int, port: int, stderr_path: str, args: tuple, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a rank never outlives its stage process (and the build lock it holds)
    # Everything this rank writes to fd 2 (Python's and native code's, e.g. c10d or gloo before an
    # abort) goes to its own file, which rank 0 copies into the stage log.
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch.distributed as dist

    from tasks.finetune import train

    awq_dir, data, section, dataset, device = args
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    _process_group(rank, world, store, device)
    train(awq_dir, data, section, dataset, device, None, rank, world)
    _barrier(rank, device)  # rank 0 has written its output: the job is done for every rank
    dist.destroy_process_group()
    sys.stderr.flush()


def _barrier(rank: int, device: str) -> None:
    import torch.distributed as dist

    dist.barrier(device_ids=[rank]) if device == "cuda" else dist.barrier()


def _exit_words(code: int | None) -> str:
    if code is None:
        return f"did not exit within {JOIN_TIMEOUT_S} s of the end of training"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


def _rank_failed(rank: int, world: int, code: int | None, stderr_path: Path) -> PipelineError:
    text = stderr_path.read_text(encoding="utf-8", errors="replace") if stderr_path.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "(nothing on stderr)"
    return PipelineError(f"finetune rank {rank} of {world} {_exit_words(code)} (its last stderr line: {last}); "
                         "its whole stderr is in the stage log; or set finetune.processes = 1")


def train_distributed(awq_dir: Path, data: DataSection, section: FinetuneSection, dataset: Path, device: str,
                      out: Path) -> dict:
    import torch
    import torch.distributed as dist

    from tasks.finetune import train

    world = section.processes
    if device == "cuda" and torch.cuda.device_count() < world:
        raise PipelineError(f"finetune.processes = {world} needs {world} GPUs on this host, torch sees "
                            f"{torch.cuda.device_count()}; lower finetune.processes")
    # Each process gets an equal share of the cores (torch would otherwise start one thread per core in each).
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    # The store's server lives in this process from here until every other rank has exited.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="finetune-ranks-") as tmp:
        stderr_paths = {rank: Path(tmp) / f"rank{rank}.stderr" for rank in range(1, world)}
        ctx = multiprocessing.get_context("spawn")
        workers = {rank: ctx.Process(target=_worker, args=(rank, world, store.port, str(stderr_paths[rank]),
                                                           (awq_dir, data, section, dataset, device), os.getpid()),
                                       daemon=True)
                   for rank in range(1, world)}
        previous_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned ranks
        try:
            for worker in workers.values():
                worker.start()
        finally:
            if previous_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous_threads
        log.info("finetune: %d processes (torch.distributed, %s), %d thread(s) each", world,
                 "nccl" if device == "cuda" else "gloo", threads)
        try:
            _process_group(0, world, store, device)
            try:
                facts = train(awq_dir, data, section, dataset, device, out, 0, world)
                _barrier(0, device)
                for worker in workers.values():
                    worker.join(timeout=JOIN_TIMEOUT_S)
            finally:
                dist.destroy_process_group()
        except BaseException as exc:
            dead = {rank: w.exitcode for rank, w in workers.items() if not w.is_alive() and w.exitcode}
            for worker in workers.values():
                if worker.is_alive():
                    worker.kill()
                worker.join()
            _log_rank_stderr(stderr_paths)
            if dead and isinstance(exc, Exception):  # rank 0 failed because another rank died first
                rank, code = min(dead.items())
                raise _rank_failed(rank, world, code, stderr_paths[rank]) from exc
            raise
        _log_rank_stderr(stderr_paths)
        for rank, worker in workers.items():
            code = worker.exitcode
            if code != 0:
                if code is None:
                    worker.kill()
                    worker.join()
                raise _rank_failed(rank, world, code, stderr_paths[rank])
    return {**facts, "processes": world}


def _log_rank_stderr(paths: dict[int, Path]) -> None:
    for rank, path in paths.items():
        text = path.read_text(encoding="utf-8", errors="replace").rstrip() if path.is_file() else ""
        if text:
            rank_log.info("finetune rank %d stderr:\n%s", rank, text)
