"""What a stage is: the ``Stage`` spec each stage module declares once (as ``STAGE``), the predicates
specs share, and the code a stage depends on, read off its imports.

Kept free of heavy imports (torch and friends load only inside a stage's entry) so that ``doit list``
and a no-op build stay fast.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks.config import PipelineConfig
from tasks.paths import Paths

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


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


def never(cfg: PipelineConfig) -> bool:
    return False


def on_build_device(cfg: PipelineConfig) -> bool:
    return cfg.build.device == "cuda"


def runs_cuda_target(cfg: PipelineConfig) -> bool:
    return "cuda" in cfg.export.targets


def one(cfg: PipelineConfig) -> int:
    return 1


@dataclass(frozen=True)
class Stage:
    """Everything about one stage, declared once, in the stage's own module (``STAGE``): doit's task
    (dodo.py), the runner, the disk and GPU checks, the Ray executor and the run cache read this, and
    nothing branches on a stage's name."""

    name: str
    doc: str
    upstream: tuple[str, ...]
    keys: tuple[str, ...]
    """Config sections (``finetune``) or single keys (``build.device``) the stage reads."""
    entry: str
    """``module:function`` called as function(cfg, paths, out, *entry_args) in the stage's own process."""
    files: Callable[[PipelineConfig], list[str]] = lambda cfg: []
    """Input files named by the config (dataset, corpora)."""
    gpu: Callable[[PipelineConfig], bool] = never
    """Whether the stage computes on the GPU for this config (it then holds a build.gpu_slots slot)."""
    disk: Callable[[PipelineConfig, Paths], int | None] = lambda cfg, paths: None
    """Upper bound of the bytes it writes into the build folder (checked before it starts)."""
    processes: Callable[[PipelineConfig], int] = one
    """Processes it runs (each gets executor.cpus_per_stage, or a GPU, on a Ray cluster)."""
    entry_args: tuple = ()
    more_keys: Callable[[PipelineConfig], tuple[str, ...]] = lambda cfg: ()
    """Keys that this config makes the stage read too (export's merged mode reads [quantize])."""

    def keys_for(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The config keys the stage reads for ``cfg``: its fingerprint and its cache key."""
        return self.keys + self.more_keys(cfg)

    @property
    def code(self) -> tuple[str, ...]:
        """The stage's own code: its entry module and what that imports, less the common code."""
        return tuple(p for p in code_of(self.entry.partition(":")[0]) if p not in COMMON_CODE)
