"""The stage graph as data: the stage modules, in build order, and the graph a config gives (two extra
stages per extra adapter).

Each stage declares itself once, as ``STAGE`` in its own module (tasks/stage_spec.py says what a spec
holds). Adding a stage: its module, with a ``run(cfg, paths, out)`` entry and its ``STAGE``, and one
line in ``STAGE_MODULES`` below. The modules are named as strings and imported here by name, so that a
stage's code (read off its import statements, tasks/stage_spec.code_of) never includes another stage's.
Their top levels import nothing heavy: ``doit list`` and a no-op build stay fast.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import replace

from tasks.config import PipelineConfig
from tasks.stage_spec import COMMON_CODE, Stage, code_of, runs_cuda_target  # noqa: F401  (the graph's vocabulary)
from tasks import disk

FINETUNE_PREFIX, ADAPTER_PREFIX = "finetune_", "adapter_"

STAGE_MODULES = ("tasks.base_model", "tasks.quantize", "tasks.finetune", "tasks.export", "tasks.evaluate")

STAGES: tuple[Stage, ...] = tuple(importlib.import_module(module).STAGE for module in STAGE_MODULES)
BY_NAME = {s.name: s for s in STAGES}


def adapter_stages(name: str) -> tuple[Stage, Stage]:
    """The two stages of an extra adapter (config ``[adapters.<name>]``): its finetune on its own
    dataset, and its .onnx_adapter for the already exported base (no second export of the base)."""
    key = f"adapters.{name}"
    return (
        replace(BY_NAME["finetune"], name=f"{FINETUNE_PREFIX}{name}",
                doc=f"LoRA '{name}' on its own dataset, against the same 4-bit weights",
                keys=("data.template", "data.eval_fraction", "data.split_seed", "finetune", "build.device", key),
                files=lambda cfg: [cfg.adapters[name].path], entry_args=(name,)),
        Stage(f"{ADAPTER_PREFIX}{name}", f"'{name}'.onnx_adapter for the exported base, logits checked",
              ("export", f"{FINETUNE_PREFIX}{name}"), ("export",), "tasks.export:run_adapter",
              gpu=runs_cuda_target, disk=disk.need_adapter, entry_args=(name,)),
    )


def stages_for(cfg: PipelineConfig) -> tuple[Stage, ...]:
    """The graph of this config: the core stages, two per extra adapter, and the package (evaluate)
    depending on every adapter."""
    extra = [stage for name in sorted(cfg.adapters) for stage in adapter_stages(name)]
    if not extra:
        return STAGES
    package = BY_NAME["evaluate"]
    package = replace(package, upstream=package.upstream + tuple(s.name for s in extra), keys=package.keys + ("adapters",))
    return STAGES[:-1] + tuple(extra) + (package,)


def config_values(cfg: PipelineConfig, keys: tuple[str, ...]) -> dict:
    """The slice of the config a stage reads, as plain JSON-able data."""
    dumped = cfg.model_dump(mode="json")
    values: dict = {}
    for key in keys:
        node = dumped
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def config_fingerprint(cfg: PipelineConfig, stage: Stage) -> str:
    return json.dumps(config_values(cfg, stage.keys_for(cfg)), sort_keys=True)


def upstream_closure(name: str, stages: tuple[Stage, ...] = STAGES) -> list[str]:
    """All stages ``name`` depends on, nearest last, without duplicates."""
    by_name = {s.name: s for s in stages}
    seen: list[str] = []
    for up in by_name[name].upstream:
        for dep in upstream_closure(up, stages) + [up]:
            if dep not in seen:
                seen.append(dep)
    return seen
