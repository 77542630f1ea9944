"""The lab's chat app, done properly: one-shot or interactive, streaming, adapter on/off by name."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.errors import PipelineError
from tasks.export import ADAPTER_SUFFIX

TURN = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n"


def target_folder(package: Path, target: str) -> Path:
    """The model folder to load: a package root holds one folder per export target."""
    return package / target if (package / target / "genai_config.json").is_file() else package


def find_adapters(package: Path) -> dict[str, Path]:
    return {p.name.removesuffix(ADAPTER_SUFFIX): p for p in sorted(package.glob(f"*{ADAPTER_SUFFIX}"))}


def chat(package: Path, adapter: str | None, prompt: str | None, max_new_tokens: int, target: str = "cpu") -> int:
    import onnxruntime_genai as og

    from tasks.genai import open_model, stream

    package = target_folder(package, target)
    if not (package / "genai_config.json").is_file():
        raise PipelineError(f"{package} is not an ONNX Runtime GenAI package (no genai_config.json); build it with `doit`")
    available = find_adapters(package)
    if adapter and adapter not in available:
        raise PipelineError(f"no adapter named {adapter!r} in {package}; available: {', '.join(available) or 'none'} (or --no-adapter)")
    model, adapters = open_model(package, target, {adapter: available[adapter]} if adapter else {})
    tokenizer = og.Tokenizer(model)
    label = f"adapter {adapter}" if adapter else "base model, no adapter"

    def answer(question: str) -> None:
        for piece in stream(model, tokenizer, adapters, adapter, TURN.format(prompt=question), max_new_tokens):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    if prompt is not None:
        answer(prompt)
        return 0
    print(f"Chatting with {package} ({label}). Empty line or Ctrl-D quits.")
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if not question:
            break
        answer(question)
    return 0
