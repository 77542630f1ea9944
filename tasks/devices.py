"""Which device a stage computes on, shared by the stages that need to know (none imports another)."""

from __future__ import annotations

import os

from tasks.errors import PipelineError

NO_GPU = "no CUDA GPU on the build host"


def select_device(device: str) -> None:
    """Make AutoAWQ and torch (which pick the 'best' device themselves) use exactly the configured one."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    import torch

    if not torch.cuda.is_available():
        raise PipelineError("build.device is 'cuda' but torch sees no CUDA GPU; set build.device = \"cpu\" or run on a GPU host")


def target_runs_here(target: str) -> bool:
    """Whether this host can run ``target``'s model (the cuda one needs a CUDA GPU)."""
    if target == "cpu":
        return True
    import torch

    return torch.cuda.is_available()
