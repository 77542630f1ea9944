"""Cheap checks of every input before any expensive stage runs (doit runs this first)."""

from __future__ import annotations

from tasks.config import PipelineConfig, adapter_data
from tasks.data import load_dataset
from tasks.errors import PipelineError
from tasks.paths import Paths


def preflight(cfg: PipelineConfig, paths: Paths) -> None:
    """Raise PipelineError naming the first problem; return quietly when everything is usable."""
    tokens = known_special_tokens(cfg)
    load_dataset(paths.check_input("data.path", cfg.data.path), cfg.data.template, cfg.data.eval_fraction,
                 cfg.data.split_seed, tokens)
    for name in sorted(cfg.adapters):
        spec = adapter_data(cfg, name)
        load_dataset(paths.check_input(f"adapters.{name}.path", spec.path), spec.template, spec.eval_fraction,
                     spec.split_seed, tokens)
    named = {"quantize.calibration": cfg.quantize.calibration}
    if not cfg.model.hub_source:
        named["model.tiny.tokenizer_corpus"] = cfg.model.tiny.tokenizer_corpus
    for key, rel in named.items():
        path = paths.check_input(key, rel)
        if not path.is_file():
            raise PipelineError(f"{key}: file {path} not found; restore it or point {key} at an existing file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PipelineError(f"{key}: {path} is not valid UTF-8; re-save it as UTF-8") from None
        if not text.strip():
            raise PipelineError(f"{key}: {path} is empty; it needs text, one paragraph per line")
    check_runtime_variant(cfg)
    if cfg.cache.enabled:
        from tasks.run_cache import RunCache

        RunCache.of(paths, cfg)  # claims cache.dir, or refuses a folder that is not the cache's own
    if cfg.executor.kind == "ray":
        from tasks.ray_executor import check_placement_names

        check_placement_names(cfg)  # a typo'd stage name would otherwise pin nothing, silently


def known_special_tokens(cfg: PipelineConfig) -> tuple[str, ...]:
    """Special tokens a record must not hold, known without loading a tokenizer: Phi-3.5's own for the
    built-in profiles (tiny, the shape profile and the pinned Phi-3.5-mini all use them); none for
    another Hub model. The template's own <|...|> markers are always checked too, and finetune checks
    again against the loaded tokenizer's special and added tokens."""
    if cfg.model.profile == "hub":
        return ()
    from tasks.base_model import SPECIAL_TOKENS

    return tuple(SPECIAL_TOKENS)


def check_runtime_variant(cfg: PipelineConfig) -> None:
    """The cpu and cuda locks install different ONNX Runtime builds of the same module; never both."""
    from importlib import metadata

    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda"):
        try:
            metadata.version(dist)
            installed.add(dist)
        except metadata.PackageNotFoundError:
            pass
    if {"onnxruntime", "onnxruntime-gpu"} <= installed or {"onnxruntime-genai", "onnxruntime-genai-cuda"} <= installed:
        raise PipelineError("both the cpu and the cuda ONNX Runtime packages are installed; recreate the venv from ONE of "
                            "requirements/cpu.lock.txt or requirements/cuda.lock.txt")
    if "cuda" in cfg.export.targets and "onnxruntime-genai-cuda" not in installed and _cuda_gpu():
        raise PipelineError("export.targets has 'cuda' and this host has a GPU, but onnxruntime-genai-cuda is not installed; "
                            "install requirements/cuda.lock.txt on a GPU host")


def _cuda_gpu() -> bool:
    """A CUDA GPU is visible (read from /proc, not torch: preflight must stay fast)."""
    import os

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")
