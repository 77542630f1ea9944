"""The stage graph as data: what each stage reads (upstream stages, config keys, input files, code).

dodo.py turns this into doit tasks; the runner uses it to record inputs in each manifest. Kept free
of heavy imports so that ``doit list`` and a no-op build stay fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from tasks.config import PipelineConfig

# Code every stage runs through; a change here reruns all stages (early cutoff stops the cascade
# where the bytes come out the same).
COMMON_CODE = ("tasks/__main__.py", "tasks/runner.py", "tasks/manifest.py", "tasks/config.py", "tasks/paths.py",
               "tasks/disk.py", "tasks/provenance.py",
               "tasks/run_cache.py", "tasks/gpu_slots.py", "tasks/families.py")


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str
    upstream: tuple[str, ...]
    keys: tuple[str, ...]
    """Config sections (``finetune``) or single keys (``build.device``) the stage reads."""
    code: tuple[str, ...]
    files: Callable[[PipelineConfig], list[str]] = lambda cfg: []
    """Input files named by the config (dataset, corpora)."""


def base_files(cfg: PipelineConfig) -> list[str]:
    """The base stage's input files: the tokenizer corpus of a locally built model, or every file of a
    local model folder (a Hub model is pinned by its commit instead)."""
    if cfg.model.hub_source:
        return []
    if cfg.model.profile != "local":
        return [cfg.model.tiny.tokenizer_corpus]
    import fnmatch
    from pathlib import Path

    from tasks.base_model import HUB_PATTERNS  # noqa: light module until a build function runs

    folder = Path(cfg.model.path)
    patterns = HUB_PATTERNS + (["*.py"] if cfg.model.trust_remote_code else [])
    return sorted(str(folder / p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                  and any(fnmatch.fnmatch(p.relative_to(folder).as_posix(), pat) for pat in patterns))


STAGES: tuple[Stage, ...] = (
    Stage("base", "base model: random-init model built locally (tiny or a real shape), a Hub model at a pinned "
          "commit, or a local model folder",
          (), ("model",), ("tasks/base_model.py",), lambda cfg: base_files(cfg)),
    Stage("quantize", "AWQ 4-bit (zero point, GEMM) with local calibration text",
          ("base",), ("quantize", "build.device", "model.trust_remote_code"),
          ("tasks/quantize.py", "tasks/awq_search.py", "tasks/awq_twin.py"),
          lambda cfg: [cfg.quantize.calibration]),
    Stage("finetune", "LoRA trained against the 4-bit weights (float twin of the AWQ checkpoint)",
          ("quantize",), ("data", "finetune", "build.device"),
          ("tasks/finetune.py", "tasks/finetune_ddp.py", "tasks/awq_twin.py", "tasks/data.py", "tasks/progress.py",
           "tasks/quantize.py"),  # select_device
          lambda cfg: [cfg.data.path]),
    Stage("export", "ONNX Runtime GenAI int4 base + switchable .onnx_adapter, logits checked",
          ("quantize", "finetune"), ("export",),
          ("tasks/export.py", "tasks/genai.py", "tasks/awq_twin.py", "tasks/data.py")),  # families: COMMON_CODE
    Stage("evaluate", "package = export + report (texts, tokens/s, held-out loss with/without adapter) + model card",
          ("export", "finetune"), ("evaluate", "export.targets", "export.adapter_name"),
          ("tasks/evaluate.py", "tasks/genai.py", "tasks/data.py", "tasks/export.py")),
)
BY_NAME = {s.name: s for s in STAGES}
FINETUNE_PREFIX, ADAPTER_PREFIX = "finetune_", "adapter_"


def adapter_stages(name: str) -> tuple[Stage, Stage]:
    """The two stages of an extra adapter (config ``[adapters.<name>]``): its finetune on its own
    dataset, and its .onnx_adapter for the already exported base (no second export of the base)."""
    key = f"adapters.{name}"
    return (
        Stage(f"{FINETUNE_PREFIX}{name}", f"LoRA '{name}' on its own dataset, against the same 4-bit weights",
              ("quantize",), ("data.template", "data.eval_fraction", "data.split_seed", "finetune", "build.device", key),
              BY_NAME["finetune"].code, lambda cfg: [cfg.adapters[name].path]),
        Stage(f"{ADAPTER_PREFIX}{name}", f"'{name}'.onnx_adapter for the exported base, logits checked",
              ("export", f"{FINETUNE_PREFIX}{name}"), ("export",), BY_NAME["export"].code),
    )


def stages_for(cfg: PipelineConfig) -> tuple[Stage, ...]:
    """The graph of this config: the core stages, two per extra adapter, and the package (evaluate)
    depending on every adapter."""
    extra = [stage for name in sorted(cfg.adapters) for stage in adapter_stages(name)]
    if not extra:
        return STAGES
    package = BY_NAME["evaluate"]
    package = Stage(package.name, package.doc, package.upstream + tuple(s.name for s in extra),
                    package.keys + ("adapters",), package.code, package.files)
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
    return json.dumps(config_values(cfg, stage.keys), sort_keys=True)


def upstream_closure(name: str, stages: tuple[Stage, ...] = STAGES) -> list[str]:
    """All stages ``name`` depends on, nearest last, without duplicates."""
    by_name = {s.name: s for s in stages}
    seen: list[str] = []
    for up in by_name[name].upstream:
        for dep in upstream_closure(up, stages) + [up]:
            if dep not in seen:
                seen.append(dep)
    return seen
