"""The stage graph as data: each stage declared once (upstream stages, config keys, input files, entry
point, GPU use, disk need, processes), and the code it depends on read off its imports.

dodo.py turns this into doit tasks; the runner, the disk and GPU checks, the Ray executor and the run
cache read the same specs. Kept free of heavy imports (stage modules are only named, never imported
here) so that ``doit list`` and a no-op build stay fast. Adding a stage: its module with a
``run(cfg, paths, out)`` entry, and one ``Stage(...)`` line below.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from tasks import disk
from tasks.config import PipelineConfig
from tasks.paths import Paths

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
FINETUNE_PREFIX, ADAPTER_PREFIX = "finetune_", "adapter_"


_FROM_MODULE = re.compile(r"^\s*from\s+(tasks(?:\.\w+)+)\s+import\b", re.MULTILINE)
_IMPORT = re.compile(r"^\s*import\s+(tasks\.\w+)", re.MULTILINE)
_FROM_PACKAGE = re.compile(r"^\s*from\s+tasks\s+import\s+\(?([\w\s,]+)", re.MULTILINE)


@functools.lru_cache(maxsize=None)
def _imports(path: Path) -> tuple[str, ...]:
    """Project modules named by the import statements of one file (a line scan: a no-op build reads
    these on every run, and a parse of every module would cost it a second)."""
    text = path.read_text(encoding="utf-8")
    found = _FROM_MODULE.findall(text) + _IMPORT.findall(text)
    for names in _FROM_PACKAGE.findall(text):
        found += [f"tasks.{n.strip()}" for n in names.split(",") if n.strip()]
    return tuple(found)


@functools.lru_cache(maxsize=None)
def code_of(module: str) -> tuple[str, ...]:
    """``module`` (``tasks.x``) and every project module it imports, at the top or inside a function,
    transitively, as sorted project-relative paths: the code a stage's output depends on, read off the
    imports so that the list cannot drift."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = PACKAGE_ROOT / (name.replace(".", "/") + ".py")
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        todo += _imports(path)
    return tuple(sorted(n.replace(".", "/") + ".py" for n in seen))


# Code every stage runs through (the command line and the runner, with what they import); a change
# here reruns all stages (early cutoff stops the cascade where the bytes come out the same).
COMMON_CODE = tuple(sorted({"tasks/__main__.py", *code_of("tasks.runner")}))


def _never(cfg: PipelineConfig) -> bool:
    return False


def _on_build_device(cfg: PipelineConfig) -> bool:
    return cfg.build.device == "cuda"


def _runs_cuda_target(cfg: PipelineConfig) -> bool:
    return "cuda" in cfg.export.targets


def _one(cfg: PipelineConfig) -> int:
    return 1


def _training_processes(cfg: PipelineConfig) -> int:
    return cfg.finetune.processes


@dataclass(frozen=True)
class Stage:
    """Everything about one stage, declared once: doit's task (dodo.py), the runner, the disk and GPU
    checks, the Ray executor and the run cache read this, and nothing branches on a stage's name."""

    name: str
    doc: str
    upstream: tuple[str, ...]
    keys: tuple[str, ...]
    """Config sections (``finetune``) or single keys (``build.device``) the stage reads."""
    entry: str
    """``module:function`` called as function(cfg, paths, out, *entry_args) in the stage's own process."""
    files: Callable[[PipelineConfig], list[str]] = lambda cfg: []
    """Input files named by the config (dataset, corpora)."""
    gpu: Callable[[PipelineConfig], bool] = _never
    """Whether the stage computes on the GPU for this config (it then holds a build.gpu_slots slot)."""
    disk: Callable[[PipelineConfig, Paths], int | None] = lambda cfg, paths: None
    """Upper bound of the bytes it writes into the build folder (checked before it starts)."""
    processes: Callable[[PipelineConfig], int] = _one
    """Processes it runs (each gets executor.cpus_per_stage, or a GPU, on a Ray cluster)."""
    entry_args: tuple = ()

    @property
    def code(self) -> tuple[str, ...]:
        """The stage's own code: its entry module and what that imports, less the common code."""
        return tuple(p for p in code_of(self.entry.partition(":")[0]) if p not in COMMON_CODE)


def base_files(cfg: PipelineConfig) -> list[str]:
    """The base stage's input files: the tokenizer corpus of a locally built model, or every file of a
    local model folder (a Hub model is pinned by its commit instead)."""
    if cfg.model.hub_source:
        return []
    if cfg.model.profile != "local":
        return [cfg.model.tiny.tokenizer_corpus]
    from tasks.model_files import model_files

    folder = Path(cfg.model.path)
    return [str(folder / p.relative_to(folder)) for p in model_files(folder, cfg.model.trust_remote_code)]


STAGES: tuple[Stage, ...] = (
    Stage("base", "base model: random-init model built locally (tiny or a real shape), a Hub model at a pinned "
          "commit, or a local model folder",
          (), ("model",), "tasks.base_model:run", base_files, disk=disk.need_base),
    Stage("quantize", "AWQ 4-bit (zero point, GEMM) with local calibration text",
          ("base",), ("quantize", "build.device", "model.trust_remote_code"), "tasks.quantize:run",
          lambda cfg: [cfg.quantize.calibration], _on_build_device, disk.need_quantize),
    Stage("finetune", "LoRA trained against the 4-bit weights (float twin of the AWQ checkpoint)",
          ("quantize",), ("data", "finetune", "build.device"), "tasks.finetune:run",
          lambda cfg: [cfg.data.path], _on_build_device, disk.need_finetune, _training_processes),
    Stage("export", "ONNX Runtime GenAI int4 base + switchable .onnx_adapter, logits checked",
          ("quantize", "finetune"), ("export",), "tasks.export:run", gpu=_runs_cuda_target, disk=disk.need_export),
    Stage("evaluate", "package = export + report (texts, tokens/s, held-out loss with/without adapter) + model card",
          ("export", "finetune"), ("evaluate", "export.targets", "export.adapter_name"), "tasks.evaluate:run",
          gpu=_runs_cuda_target, disk=disk.need_evaluate),
)
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
              gpu=_runs_cuda_target, disk=disk.need_adapter, entry_args=(name,)),
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
