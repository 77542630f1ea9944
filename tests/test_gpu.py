"""GPU-only paths: run on a CUDA host (the cuda lock, or the device image); skipped elsewhere with the reason.

On the CPU-only CI machine these skip; the same paths ran on an H100 through bench/gpu_bench.py
--profile tiny (BENCHMARKS.md, "GPU (H100)")."""

import json

import pytest

from conftest import doit, executed

pytestmark = pytest.mark.slow


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (and requirements/cuda.lock.txt)")


@needs_gpu
def test_one_gpu_build_checks_and_evaluates_both_targets(project_copy):
    result = doit(project_copy, "build.device=cuda", 'export.targets=["cuda", "cpu"]', "build.dir=build/gpu")
    assert executed(result) == ["base", "quantize", "finetune", "export", "evaluate"]
    check = json.loads((project_copy / "build/gpu/export/export_check.json").read_text())
    for target in ("cuda", "cpu"):
        assert check[target]["checked"], target
        assert check[target]["adapter"]["same_argmax"] == "5/5"
    report = json.loads((project_copy / "build/gpu/package/report.json").read_text())["targets"]
    assert report["cuda"]["evaluated"] and report["cpu"]["evaluated"]
    loss = report["cuda"]["loss"]
    assert loss["with_adapter"]["loss"] < loss["without_adapter"]["loss"]
