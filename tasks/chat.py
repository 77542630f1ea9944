"""The lab's chat app, done properly: one-shot or interactive, streaming, adapter on/off by name.

Turns are rendered in the package's own chat template (onnxruntime_genai's apply_chat_template on
chat_template.jinja), or in the text template the adapter was trained with when the build set
data.template (report.json says which). An interactive chat keeps the conversation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tasks.errors import PipelineError
from tasks.genai import ADAPTER_SUFFIX


def target_folder(package: Path, target: str) -> Path:
    """The model folder to load: a package root holds one folder per export target."""
    return package / target if (package / target / "genai_config.json").is_file() else package


def find_adapters(package: Path) -> dict[str, Path]:
    return {p.name.removesuffix(ADAPTER_SUFFIX): p for p in sorted(package.glob(f"*{ADAPTER_SUFFIX}"))}


def trained_template(package: Path) -> str | None:
    """The text template of the build (data.template), or None for the package's chat template."""
    for report in (package / "report.json", package.parent / "report.json"):
        if report.is_file():
            return json.loads(report.read_text(encoding="utf-8")).get("template")
    return None


def conversation_prompt(render_chat, history: list[tuple[str, str]], question: str, multi_turn: bool) -> str:
    """The text the model continues: earlier turns (each rendered as a finished exchange) and the new question."""
    from tasks.data import Record

    turns = [(role, text) for q, a in history for role, text in (("user", q), ("assistant", a))]
    record = Record((*turns, ("user", question), ("assistant", "")), 0)
    if multi_turn or not history:
        return render_chat(record.as_messages(-1), True)
    # a text template renders one exchange: earlier ones are written out in full before the new prompt
    done = "".join(render_chat(Record.pair(q, a, 0).as_messages(), False) for q, a in history)
    return done + render_chat(Record.pair(question, "", 0).as_messages(-1), True)


def chat(package: Path, adapter: str | None, prompt: str | None, max_new_tokens: int, target: str = "cpu") -> int:
    import onnxruntime_genai as og

    from tasks.data import genai_renderer
    from tasks.genai import open_model, stream

    template = trained_template(package)
    package = target_folder(package, target)
    if not (package / "genai_config.json").is_file():
        raise PipelineError(f"{package} is not an ONNX Runtime GenAI package (no genai_config.json); build it with `doit`")
    available = find_adapters(package)
    if adapter and adapter not in available:
        raise PipelineError(f"no adapter named {adapter!r} in {package}; available: {', '.join(available) or 'none'} (or --no-adapter)")
    model, adapters = open_model(package, target, {adapter: available[adapter]} if adapter else {})
    tokenizer = og.Tokenizer(model)
    render_chat = genai_renderer(tokenizer, template)
    label = f"adapter {adapter}" if adapter else "base model, no adapter"
    history: list[tuple[str, str]] = []

    def answer(question: str) -> None:
        pieces = []
        text = conversation_prompt(render_chat, history, question, multi_turn=template is None)
        for piece in stream(model, tokenizer, adapters, adapter, text, max_new_tokens):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append((question, "".join(pieces).strip() or "..."))

    if prompt is not None:
        answer(prompt)
        return 0
    print(f"Chatting with {package} ({label}). The conversation is kept; empty line or Ctrl-D quits.")
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if not question:
            break
        try:
            answer(question)
        except PipelineError as exc:  # the prompt does not fit the package's context (export.max_context)
            if not history:
                print(f"error: {exc}", file=sys.stderr)
                continue
            print("(the conversation no longer fits this package's context: starting a new one)", file=sys.stderr)
            history.clear()
            try:
                answer(question)
            except PipelineError as again:
                print(f"error: {again}", file=sys.stderr)
    return 0
