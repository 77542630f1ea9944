"""Cheap checks of every input before any expensive stage runs (doit runs this first)."""

from __future__ import annotations

from tasks.config import PipelineConfig, adapter_data
from tasks.data import load_dataset
from tasks.errors import PipelineError
from tasks.paths import Paths


def preflight(cfg: PipelineConfig, paths: Paths) -> None:
    """Raise PipelineError naming the first problem; return quietly when everything is usable."""
    family = model_family(cfg, paths)
    family.target_modules(cfg.finetune.target_modules)  # a name this family does not have: one line
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


def model_family(cfg: PipelineConfig, paths: Paths | None = None):
    """The model's family, before anything is built or downloaded. A Hub model's config.json (a few KB)
    is read first, from the HF cache or the Hub, so an unsupported architecture is refused in one line
    instead of after a multi-GB download."""
    from tasks.config import SHAPE_PROFILES
    from tasks.families import FAMILIES, family_of

    if cfg.model.profile in SHAPE_PROFILES:
        return FAMILIES[SHAPE_PROFILES[cfg.model.profile].get("family", "phi3")]
    if cfg.model.profile == "local":
        import json
        from pathlib import Path

        config = (paths.data(cfg.model.path) if paths else Path(cfg.model.path)) / "config.json"
        if not config.is_file():
            raise PipelineError(f"model.path: {cfg.model.path} has no config.json; point it at a Hugging Face model folder")
        try:
            return family_of(json.loads(config.read_text(encoding="utf-8")), str(config))
        except (ValueError, UnicodeDecodeError):
            raise PipelineError(f"model.path: {config} is not valid JSON") from None
    if not cfg.model.hub_source:
        return FAMILIES[cfg.model.tiny.family]
    repo_id, revision = cfg.model.hub_source
    return family_of(hub_config(repo_id, revision), f"{repo_id}@{revision[:12]} config.json")


def hub_config(repo_id: str, revision: str) -> dict:
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from tasks.base_model import hub_errors

    try:
        with hub_errors(repo_id, revision):
            path = hf_hub_download(repo_id, "config.json", revision=revision)
    except EntryNotFoundError:  # the repository and commit exist, the file does not
        raise PipelineError(f"{repo_id}@{revision[:12]} has no config.json; it is not a transformers model") from None
    try:
        return json.loads(open(path, encoding="utf-8").read())
    except (ValueError, UnicodeDecodeError):
        raise PipelineError(f"{repo_id}@{revision[:12]}: config.json is not valid JSON") from None


def known_special_tokens(cfg: PipelineConfig) -> tuple[str, ...]:
    """Special tokens a record must not hold, known without loading a tokenizer: the family's own for
    the locally built profiles, Phi-3.5's for the pinned Phi-3.5-mini (Phi-3.5's markers, as in the
    tiny Phi-3); none for another Hub model. The template's own <|...|> markers are always checked too,
    and finetune checks again against the loaded tokenizer's special and added tokens."""
    from tasks.families import FAMILIES

    if cfg.model.profile in ("hub", "local"):
        return ()
    return FAMILIES["phi3"].special_tokens if cfg.model.hub_source else model_family(cfg).special_tokens


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
