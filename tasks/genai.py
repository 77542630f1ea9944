"""Thin helpers over onnxruntime_genai's current API (Model, Adapters, Generator.append_tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

ADAPTER_SUFFIX = ".onnx_adapter"  # onnxruntime's adapter file format


def open_model(package: Path, target: str = "cpu", adapter_files: dict[str, Path] | None = None):
    """Load the package for ``target`` ("cpu" or "cuda") and its adapters; clear error if impossible."""
    import onnxruntime_genai as og

    from tasks.errors import PipelineError

    config = og.Config(str(package))
    config.clear_providers()
    if target == "cuda":
        config.append_provider("cuda")
    try:
        model = og.Model(config)
    except Exception as exc:  # onnxruntime_genai raises plain RuntimeError/OrtException
        hint = " (install the cuda lock on a GPU host)" if target == "cuda" else ""
        raise PipelineError(f"cannot load {package} for {target}: {str(exc).splitlines()[0]}{hint}") from None
    adapters = og.Adapters(model)
    for name, path in (adapter_files or {}).items():
        adapters.load(str(path), name)
    return model, adapters


def _generator(model, adapters, adapter: str | None, max_length: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    if adapter:
        generator.set_active_adapter(adapters, adapter)
    return generator


def all_logits(model, adapters, adapter: str | None, ids: list[int]):
    """Logits for every position of ``ids`` after one prefill, shape [len(ids), vocab] (float32)."""
    import numpy as np

    generator = _generator(model, adapters, adapter, len(ids) + 1)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
    return logits.reshape(-1, logits.shape[-1])[-len(ids):]


def last_token_logits(model, adapters, adapter: str | None, ids: list[int]):
    return all_logits(model, adapters, adapter, ids)[-1]


def stream(model, tokenizer, adapters, adapter: str | None, prompt: str, max_new_tokens: int) -> Iterator[str]:
    """Greedy decode; yield text pieces as they are produced."""
    ids = tokenizer.encode(prompt)
    generator = _generator(model, adapters, adapter, len(ids) + max_new_tokens)
    generator.append_tokens(ids)
    decoder = tokenizer.create_stream()
    while not generator.is_done():
        generator.generate_next_token()
        yield decoder.decode(generator.get_next_tokens()[0])
