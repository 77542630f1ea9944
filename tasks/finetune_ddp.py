"""Data-parallel LoRA training across ``finetune.processes`` processes with torch.distributed.

This process is rank 0 (it keeps the stage's logging, progress and output folder); ranks 1..N-1 are
spawned Python processes running the same loop (tasks.finetune.train) on their share of each global
batch. Backend: gloo on cpu, NCCL on cuda (rank r on GPU r). Rendezvous on a free loopback port, so
nothing leaves the machine. If any rank dies, the others stop at the next collective (timeout) and
the stage fails; the staging folder is dropped and the previous finetune output stays published.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
from pathlib import Path

from tasks.config import DataSection, FinetuneSection
from tasks.errors import PipelineError

log = logging.getLogger("tasks.finetune")
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, device: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


def _worker(rank: int, world: int, port: int, args: tuple) -> None:
    import torch.distributed as dist

    from tasks.finetune import train

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    awq_dir, data, section, dataset, device = args
    _init(rank, world, port, device)
    try:
        train(awq_dir, data, section, dataset, device, None, rank, world)
    finally:
        dist.destroy_process_group()


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
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(rank, world, port, (awq_dir, data, section, dataset, device)),
                           daemon=True) for rank in range(1, world)]
    previous_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned ranks
    try:
        for worker in workers:
            worker.start()
    finally:
        if previous_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous_threads
    log.info("finetune: %d processes (torch.distributed, %s), %d thread(s) each", world,
             "nccl" if device == "cuda" else "gloo", threads)
    try:
        _init(0, world, port, device)
        try:
            facts = train(awq_dir, data, section, dataset, device, out, 0, world)
        finally:
            dist.destroy_process_group()
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    for worker in workers:
        worker.join(timeout=120)
        if worker.exitcode != 0:
            raise PipelineError(f"finetune rank {workers.index(worker) + 1} of {world} exited with {worker.exitcode}; "
                                "see the log above, or set finetune.processes = 1")
    return {**facts, "processes": world}
