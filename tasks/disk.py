"""Disk space: a preflight estimate per stage, and a clear error when the disk fills up mid-stage.

The estimates are upper bounds from what the stage reads (its upstream outputs) or, for a locally
built model, from the model's parameter count; a stage does not start unless that much is free in
the build folder. If the disk fills anyway (another process, a bad estimate), the stage stops with
one line naming the folder, its staging space is removed, and the previous output stays published.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.errors import PipelineError
from tasks.paths import Paths
from tasks.manifest import MANIFEST

MB = 1 << 20
SLACK = 64 * MB  # logs, manifests, tokenizer files, builder caches


def _published_bytes(folder: Path) -> int:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return 0
    return sum(f["size"] for f in json.loads(manifest.read_text(encoding="utf-8"))["files"].values())


def random_model_bytes(cfg: PipelineConfig) -> int:
    """bf16 bytes of a locally built model (embedding + lm_head + decoder layers; full attention, so an
    upper bound for the grouped-query families)."""
    spec = cfg.model.random_spec
    h, i, n, v = spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers, spec.vocab_size
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return 2 * (2 * v * h + n * per_layer + h)


# What a stage may write into the build folder, named by its spec (STAGE in its module; the base stage's
# own is there); None when it cannot be known beforehand.

def need_quantize(cfg: PipelineConfig, paths: Paths) -> int | None:
    return _published_bytes(paths.stage("base")) + SLACK  # int4 + fp16 embeddings < the bf16 base


def need_finetune(cfg: PipelineConfig, paths: Paths) -> int | None:
    return SLACK


def need_adapter(cfg: PipelineConfig, paths: Paths) -> int | None:
    return len(cfg.export.targets) * SLACK  # one adapter file per target


def need_export(cfg: PipelineConfig, paths: Paths) -> int | None:
    # Per target: the builder's model in scratch, then the grafted copy; each <= the AWQ folder + rope caches.
    return len(cfg.export.targets) * 2 * (_published_bytes(paths.stage("quantize")) + SLACK)


def need_evaluate(cfg: PipelineConfig, paths: Paths) -> int | None:
    return _published_bytes(paths.stage("export")) + SLACK  # the package holds a copy of the export files


def check_free_space(stage, cfg: PipelineConfig, paths: Paths) -> int | None:
    """Refuse to start ``stage`` (a tasks.stage_spec.Stage) unless its declared disk need is free."""
    name = stage.name
    need = stage.disk(cfg, paths)
    if need is None:
        return None
    paths.build.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(paths.build).free
    if free < need:
        raise PipelineError(
            f"not enough disk space for stage {name}: it needs about {need // MB} MB in {paths.build}, "
            f"{free // MB} MB are free; free some space or set build.dir to a bigger disk"
        )
    return need


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain, or a library's own wording of it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
