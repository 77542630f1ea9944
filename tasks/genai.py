"""Thin helpers over onnxruntime_genai's current API (Model, Adapters, Generator.append_tokens)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Iterator

ADAPTER_SUFFIX = ".onnx_adapter"  # onnxruntime's adapter file format

# The context each loaded model supports (genai_config.json's context_length; export.max_context).
# onnxruntime-genai 0.14.1 aborts the whole process on a prompt that does not fit, so we check first.
_CONTEXT: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()


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
    _CONTEXT[model] = int(json.loads((package / "genai_config.json").read_text(encoding="utf-8"))["model"]
                          ["context_length"])
    adapters = og.Adapters(model)
    for name, path in (adapter_files or {}).items():
        adapters.load(str(path), name)
    return model, adapters


def context_length(model) -> int | None:
    """Tokens of context (prompt + generated) a model from ``open_model`` supports."""
    return _CONTEXT.get(model)


def _generator(model, adapters, adapter: str | None, max_length: int, prompt_tokens: int):
    """A greedy generator for ``max_length`` tokens in all (cut to the model's context); a prompt that
    leaves no room in the context is refused in one line."""
    import onnxruntime_genai as og

    from tasks.errors import PipelineError

    context = context_length(model)
    if context is not None:
        if prompt_tokens >= context:
            raise PipelineError(f"the prompt is {prompt_tokens} tokens and this package supports {context} in all "
                                "(genai_config.json context_length, export.max_context); shorten the prompt or "
                                "rebuild with a larger export.max_context")
        max_length = min(max_length, context)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    if adapter:
        generator.set_active_adapter(adapters, adapter)
    return generator


def all_logits(model, adapters, adapter: str | None, ids: list[int]):
    """Logits for every position of ``ids`` after one prefill, shape [len(ids), vocab] (float32)."""
    import numpy as np

    generator = _generator(model, adapters, adapter, len(ids) + 1, len(ids))
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
    return logits.reshape(-1, logits.shape[-1])[-len(ids):]


def last_token_logits(model, adapters, adapter: str | None, ids: list[int]):
    return all_logits(model, adapters, adapter, ids)[-1]


def stream(model, tokenizer, adapters, adapter: str | None, prompt: str, max_new_tokens: int) -> Iterator[str]:
    """Greedy decode; yield text pieces as they are produced."""
    ids = tokenizer.encode(prompt)
    generator = _generator(model, adapters, adapter, len(ids) + max_new_tokens, len(ids))
    generator.append_tokens(ids)
    decoder = tokenizer.create_stream()
    while not generator.is_done():
        generator.generate_next_token()
        yield decoder.decode(generator.get_next_tokens()[0])
