"""The finetuning dataset: strict JSON-lines reading, rendering in a chat format, the held-out split.

A line is either ``{"prompt": ..., "response": ...}`` or the conversational format of TRL and Hugging
Face datasets, ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``; both
become a conversation. By default the model's own chat template renders it (the tokenizer's Jinja
template, as in ``tokenizer.apply_chat_template``); ``data.template`` overrides that with a text
template for prompt/response pairs. Training counts the assistant turns only.

Every problem is reported as ``file:line: problem; fix`` before any model is touched. Data is data:
a record's text fills the template's fields once and is never read as a template, and a record that
holds a special token of the chat format (``<|end|>``, ``<|assistant|>``...) is refused rather than
trained as a turn boundary.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks.errors import PipelineError

REQUIRED = ("prompt", "response")
MAX_LINE_BYTES = 1 << 20  # one record; a longer line is a broken file far more often than a real example


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    messages: tuple[tuple[str, str], ...]  # (role, content), ending with an assistant turn
    line: int

    @classmethod
    def pair(cls, prompt: str, response: str, line: int) -> "Record":
        return cls((("user", prompt), ("assistant", response)), line)

    @property
    def prompt(self) -> str:
        """The last user turn before the final answer."""
        return next(c for r, c in reversed(self.messages[:-1]) if r == "user")

    @property
    def response(self) -> str:
        """The final assistant turn: what held-out evaluation compares against."""
        return self.messages[-1][1]

    def as_messages(self, upto: int | None = None) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages[:upto]]

    def to_json(self) -> dict:
        return {"messages": self.as_messages(), "prompt": self.prompt, "response": self.response, "line": self.line}

    @classmethod
    def from_json(cls, obj: dict) -> "Record":
        if "messages" in obj:
            return cls(tuple((m["role"], m["content"]) for m in obj["messages"]), obj.get("line", 0))
        return cls.pair(obj["prompt"], obj["response"], obj.get("line", 0))


def _text(path: Path, number: int, value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PipelineError(f"{path}:{number}: {what} must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError(f"{path}:{number}: {what} holds an invalid \\u escape (a lone surrogate); fix the text") from None
    return value


def _conversation(path: Path, number: int, messages) -> tuple[tuple[str, str], ...]:
    """A messages list, checked: roles, text, a user turn before the first answer, an answer last."""
    if not isinstance(messages, list) or not messages:
        raise PipelineError(f"{path}:{number}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"} or "role" not in message \
                or "content" not in message:
            raise PipelineError(f"{path}:{number}: messages[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise PipelineError(f"{path}:{number}: messages[{i}] has role {message['role']!r}; roles are "
                                f"{', '.join(ROLES)}")
        turns.append((message["role"], _text(path, number, message["content"], f"messages[{i}].content")))
    roles = [r for r, _ in turns]
    if "system" in roles[1:]:
        raise PipelineError(f"{path}:{number}: a system message may only come first")
    first = next((r for r in roles if r != "system"), None)
    if first != "user":
        raise PipelineError(f"{path}:{number}: the conversation must start with a user turn (after an optional system one)")
    if roles[-1] != "assistant":
        raise PipelineError(f"{path}:{number}: the conversation must end with an assistant turn (the answer to learn)")
    return tuple(turns)


def load_records(path: Path) -> list[Record]:
    """Parse a JSONL file of {"prompt", "response"} or {"messages"} objects; one-line errors with file:line."""
    if not path.is_file():
        raise PipelineError(f"dataset {path} not found; set data.path in the config to a JSON-lines file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PipelineError(f"{path}:{line}: not valid UTF-8; re-save the file as UTF-8") from None
    records = []
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_BYTES:
            raise PipelineError(f"{path}:{number}: line is {len(raw) / (1 << 20):.1f} MB long, over the 1 MB limit for "
                                "one record; check the file (a missing newline?) or split the record")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{path}:{number}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        except (ValueError, RecursionError) as exc:  # e.g. integers over Python's digit limit, absurd nesting
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
            raise PipelineError(f"{path}:{number}: unreadable JSON ({reason}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise PipelineError(f"{path}:{number}: expected a JSON object with prompt and response (or messages), "
                                f"got {type(obj).__name__}")
        if "messages" in obj:
            if set(obj) & set(REQUIRED):
                raise PipelineError(f"{path}:{number}: a record has either 'messages' or prompt and response, not both")
            records.append(Record(_conversation(path, number, obj["messages"]), number))
            continue
        for key in REQUIRED:
            if key not in obj:
                raise PipelineError(f"{path}:{number}: missing field {key!r}; every record needs prompt and response "
                                    "(or a 'messages' list)")
            _text(path, number, obj[key], f"field {key!r}")
        records.append(Record.pair(obj["prompt"], obj["response"], number))
    if len(records) < 2:
        raise PipelineError(f"{path}: has {len(records)} records; a dataset needs at least 2 (one to train, one held out)")
    return records


TEMPLATE_SYNTAX = ("a template is text with {prompt} and then {response}, each once; "
                   "write a literal brace as {{ or }}")
# A chat-template marker such as <|user|> or <|end|>: the shape Phi-3, Qwen and Llama 3 use.
MARKER_RE = re.compile(r"<\|[^|<>\s]{1,64}\|>")


@functools.lru_cache(maxsize=64)
def template_parts(template: str) -> tuple[tuple[str, str | None], ...]:
    """Split a template into (literal text, field) pairs, the last with field None.

    The syntax knows two fields, {prompt} and then {response}, each exactly once; ``{{`` and ``}}``
    are literal braces. Anything else with a brace raises ValueError saying where. Rendering fills
    each field once with the record's text, which is never read as a template itself.
    """
    parts: list[tuple[str, str | None]] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        char = template[i]
        if template.startswith(char * 2, i) and char in "{}":
            literal.append(char)
            i += 2
        elif char == "{":
            end = template.find("}", i)
            name = template[i + 1:end] if end != -1 else ""
            if end == -1 or "{" in name:
                raise ValueError(f"the '{{' at character {i + 1} opens no field; {TEMPLATE_SYNTAX}")
            if name not in REQUIRED:
                raise ValueError(f"unknown field {{{name}}} (records have only prompt and response); {TEMPLATE_SYNTAX}")
            parts.append(("".join(literal), name))
            literal = []
            i = end + 1
        elif char == "}":
            raise ValueError(f"the '}}' at character {i + 1} closes no field; {TEMPLATE_SYNTAX}")
        else:
            literal.append(char)
            i += 1
    parts.append(("".join(literal), None))
    if [field for _, field in parts[:-1]] != list(REQUIRED):
        found = " ".join(f"{{{field}}}" for _, field in parts[:-1]) or "none"
        raise ValueError(f"the template's fields are {found}; {TEMPLATE_SYNTAX}")
    return tuple(parts)


def check_template(template: str, key: str = "data.template") -> None:
    """``template_parts`` as a one-line PipelineError naming the config key."""
    try:
        template_parts(template)
    except ValueError as exc:
        raise PipelineError(f"{key}: {exc}") from None


def prompt_part(template: str, prompt: str) -> str:
    """The template up to where the response starts: what a user sends at inference time.
    Always an exact prefix of ``render`` of a record with this prompt."""
    head = []
    for literal, field in template_parts(template):
        head.append(literal)
        if field == "response":
            return "".join(head)
        head.append(prompt)
    raise AssertionError("template_parts guarantees a {response} field")


def render(template: str, record: Record) -> str:
    """The training text of a text template: each field filled once; the record's text stays plain text."""
    values = {"prompt": record.prompt, "response": record.response, None: ""}
    return "".join(literal + values[field] for literal, field in template_parts(template))


# A chat format: messages (as dicts) and add_generation_prompt -> text. The model's Jinja template
# (transformers' or onnxruntime_genai's apply_chat_template), or a text template (text_renderer).
Render = Callable[[list, bool], str]


def text_renderer(template: str) -> Render:
    """``data.template`` as a chat format for one user turn and its answer."""
    check_template(template)

    def render_text(messages: list, add_generation_prompt: bool) -> str:
        user = [m["content"] for m in messages if m["role"] == "user"]
        answer = [m["content"] for m in messages if m["role"] == "assistant"]
        if not user:
            return ""
        if answer:
            return render(template, Record.pair(user[0], answer[0], 0))
        return prompt_part(template, user[0]) if add_generation_prompt else ""

    return render_text


def chat_renderer(tokenizer, template: str | None, source) -> Render:
    """``data.template`` as a chat format, or else the (transformers) tokenizer's own chat template."""
    if template is not None:
        return text_renderer(template)
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(f"{source} has no chat template (a base model, not an instruct one?); set data.template "
                            "to a text template, e.g. \"### Question: {prompt}\\n### Answer: {response}\"")

    def render_chat(messages: list, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render_chat


def genai_renderer(tokenizer, template: str | None) -> Render:
    """The same for a package: onnxruntime_genai's Tokenizer renders the package's own chat template."""
    if template is not None:
        return text_renderer(template)

    def render_chat(messages: list, add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=add_generation_prompt)

    return render_chat


def check_single_turn(path: Path, records: list[Record]) -> None:
    """A text ``data.template`` has one {prompt} and one {response}: refuse conversations it cannot render."""
    for record in records:
        if [r for r, _ in record.messages] != ["user", "assistant"]:
            raise PipelineError(f"{path}:{record.line}: this conversation has {len(record.messages)} turns "
                                f"({', '.join(r for r, _ in record.messages)}), but data.template renders one prompt and "
                                "one response; remove data.template to use the model's own chat template")


def prompt_text(render_chat: Render, record: Record) -> str:
    """What the model is given to produce the final answer: every earlier turn and the generation prompt."""
    return render_chat(record.as_messages(-1), True)


def full_text(render_chat: Render, record: Record) -> str:
    return render_chat(record.as_messages(), False)


def assistant_spans(render_chat: Render, record: Record, path: Path | str = "dataset") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (each answer with the
    turn's closing marker), found by rendering the conversation turn by turn."""
    full = full_text(render_chat, record)
    spans = []
    for k, (role, _) in enumerate(record.messages):
        if role != "assistant":
            continue
        before = render_chat(record.as_messages(k), True)
        upto = render_chat(record.as_messages(k + 1), False)
        if not full.startswith(before):
            raise PipelineError(f"{path}:{record.line}: the chat template does not render this conversation turn by "
                                "turn (the text before answer {} is not a prefix of the whole); set data.template to "
                                "a text template instead".format(len(spans) + 1))
        end = len(os.path.commonprefix([upto, full]))  # a template may close only the last turn (Phi-3's eos)
        spans.append((len(before), max(end, len(before))))
    return full, spans


def template_markers(template: str) -> set[str]:
    """The chat markers (``<|...|>``) the template itself uses."""
    return set(MARKER_RE.findall(template))


def check_special_tokens(path: Path, records: list[Record], template: str, tokens=()) -> None:
    """Refuse a record whose text holds a special token: the tokenizer would encode it as the real
    token, so a record could end its turn or open another one (and the loss mask would no longer
    match). Checked are the template's own ``<|...|>`` markers plus ``tokens``: the tokenizer's
    special and added tokens where they are known (the built-in profiles' at check time, the loaded
    tokenizer's in finetune)."""
    own = template_markers(template or "")
    known = sorted(own | {t for t in tokens if t}, key=len, reverse=True)
    if not known:
        return
    pattern = re.compile("|".join(re.escape(t) for t in known))
    for record in sorted(records, key=lambda r: r.line):
        for i, (role, content) in enumerate(record.messages):
            found = pattern.search(content)
            if found:
                token = found.group()
                where = "the chat template" if token in own else "the model's tokenizer"
                field = (("prompt", "response")[i] if len(record.messages) == 2 and record.messages[0][0] == "user"
                         else f"messages[{i}].content")
                raise PipelineError(
                    f"{path}:{record.line}: field {field!r} holds the special token {token!r} of {where}; "
                    "remove or reword it (record text is trained as plain text, and a special token would "
                    "end or open a chat turn)")


def split(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic train/held-out split (by seed, independent of file order of equal records)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * eval_fraction))
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [records[i] for i in train], [records[i] for i in held]


def load_dataset(path: Path, template: str | None, eval_fraction: float, seed: int,
                 special_tokens=()) -> tuple[list[Record], list[Record]]:
    """Records, checked against the template (None: the model's chat template) and ``special_tokens``
    (see check_special_tokens), split."""
    if template is not None:
        check_template(template)
    records = load_records(path)
    if template is not None:
        check_single_turn(path, records)
    check_special_tokens(path, records, template, special_tokens)
    return split(records, eval_fraction, seed)


def read_heldout(finetune_dir: Path) -> tuple[str | None, list[Record]]:
    """The text template a finetune trained with (None: the model's chat template) and its held-out
    records (metrics.json, heldout.jsonl), which export checks logits on and evaluate scores."""
    template = json.loads((finetune_dir / "metrics.json").read_text(encoding="utf-8"))["template"]
    lines = (finetune_dir / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    return template, [Record.from_json(json.loads(line)) for line in lines]
