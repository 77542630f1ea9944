"""The finetuning dataset: strict JSON-lines reading, the chat template and the held-out split.

Every problem is reported as ``file:line: problem; fix`` before any model is touched. Data is data:
a record's text fills the template's fields once and is never read as a template, and a record that
holds a special token of the chat format (``<|end|>``, ``<|assistant|>``...) is refused rather than
trained as a turn boundary.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import PipelineError

REQUIRED = ("prompt", "response")
MAX_LINE_BYTES = 1 << 20  # one record; a longer line is a broken file far more often than a real example


@dataclass(frozen=True)
class Record:
    prompt: str
    response: str
    line: int


def load_records(path: Path) -> list[Record]:
    """Parse a JSONL file of {"prompt", "response"} objects; one-line errors with file:line."""
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
            raise PipelineError(f"{path}:{number}: expected a JSON object with prompt and response, got {type(obj).__name__}")
        for key in REQUIRED:
            if key not in obj:
                raise PipelineError(f"{path}:{number}: missing field {key!r}; every record needs prompt and response")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise PipelineError(f"{path}:{number}: field {key!r} must be a non-empty string")
            try:
                obj[key].encode("utf-8")
            except UnicodeEncodeError:
                raise PipelineError(f"{path}:{number}: field {key!r} holds an invalid \\u escape (a lone surrogate); "
                                    "fix the text") from None
        records.append(Record(obj["prompt"], obj["response"], number))
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
    """The training text: each field filled once; the record's text stays plain text."""
    values = {"prompt": record.prompt, "response": record.response, None: ""}
    return "".join(literal + values[field] for literal, field in template_parts(template))


def template_markers(template: str) -> set[str]:
    """The chat markers (``<|...|>``) the template itself uses."""
    return set(MARKER_RE.findall(template))


def check_special_tokens(path: Path, records: list[Record], template: str, tokens=()) -> None:
    """Refuse a record whose text holds a special token: the tokenizer would encode it as the real
    token, so a record could end its turn or open another one (and the loss mask would no longer
    match). Checked are the template's own ``<|...|>`` markers plus ``tokens``: the tokenizer's
    special and added tokens where they are known (the built-in profiles' at check time, the loaded
    tokenizer's in finetune)."""
    own = template_markers(template)
    known = sorted(own | {t for t in tokens if t}, key=len, reverse=True)
    if not known:
        return
    pattern = re.compile("|".join(re.escape(t) for t in known))
    for record in sorted(records, key=lambda r: r.line):
        for field in REQUIRED:
            found = pattern.search(getattr(record, field))
            if found:
                token = found.group()
                where = "the chat template" if token in own else "the model's tokenizer"
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


def load_dataset(path: Path, template: str, eval_fraction: float, seed: int,
                 special_tokens=()) -> tuple[list[Record], list[Record]]:
    """Records, checked against the template and ``special_tokens`` (see check_special_tokens), split."""
    check_template(template)
    records = load_records(path)
    check_special_tokens(path, records, template, special_tokens)
    return split(records, eval_fraction, seed)


def read_heldout(finetune_dir: Path) -> tuple[str, list[dict]]:
    """The template a finetune trained with and its held-out records (metrics.json, heldout.jsonl),
    which export checks logits on and evaluate scores."""
    template = json.loads((finetune_dir / "metrics.json").read_text(encoding="utf-8"))["template"]
    held = [json.loads(line) for line in (finetune_dir / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    return template, held
