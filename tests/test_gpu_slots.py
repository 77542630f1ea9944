"""GPU slots: parallel builds never run more GPU stages at once than build.gpu_slots allows, and a
killed build never keeps a slot."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.gpu_slots import gpu_slot
from tasks.stages import STAGES
from tests.conftest import REPO


def _hold(args) -> tuple[float, float]:
    slots, folder, seconds = args
    with gpu_slot(slots, "test stage", Path(folder), poll_s=0.02):
        start = time.monotonic()
        time.sleep(seconds)
        return start, time.monotonic()


def _most_at_once(intervals) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("slots", [1, 2])
def test_parallel_gpu_stages_never_exceed_the_slots(tmp_path, slots):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        intervals = pool.map(_hold, [(slots, str(tmp_path), 0.4)] * 4)
    assert _most_at_once(intervals) == slots


def test_a_killed_build_frees_its_slot_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tasks.gpu_slots import gpu_slot\n"
        f"with gpu_slot(1, 'victim', Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    with gpu_slot(1, "next", tmp_path):
        assert time.monotonic() - start < 1


def test_which_stages_take_a_gpu_slot():
    cpu = load_config(REPO / "pipeline.toml")
    gpu = load_config(REPO / "pipeline.toml", ["build.device=cuda", 'export.targets=["cpu", "cuda"]'])
    assert [s.name for s in STAGES if s.gpu(cpu)] == []
    assert [s.name for s in STAGES if s.gpu(gpu)] == ["quantize", "finetune", "export", "evaluate"]
