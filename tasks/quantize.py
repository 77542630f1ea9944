"""Stage 2, quantize: the base model in AWQ 4-bit (zero point, GEMM layout), calibrated on local text
(tasks/awq_quantize.py does the work)."""

from __future__ import annotations

from pathlib import Path

from tasks import disk
from tasks.awq_quantize import build
from tasks.stage_spec import Stage, on_build_device


STAGE = Stage(
    "quantize", "AWQ 4-bit (zero point, GEMM) with local calibration text",
    upstream=("base",), keys=("quantize", "build.device", "model.trust_remote_code"), entry="tasks.quantize:run",
    files=lambda cfg: [cfg.quantize.calibration], gpu=on_build_device, disk=disk.need_quantize,
)


def run(cfg, paths, out: Path) -> dict:
    """The stage's entry (STAGE above): config and paths onto ``build``."""
    return build(paths.stage("base"), cfg.quantize, paths.data(cfg.quantize.calibration), cfg.build.device, out,
                 cfg.model.trust_remote_code)
