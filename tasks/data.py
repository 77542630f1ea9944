"""The finetuning dataset: strict JSON-lines reading, the chat template and the held-out split.

Every problem is reported as ``file:line: problem; fix`` before any model is touched.
"""

from __future__ import annotations

import json
import random
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


def check_template(template: str, path: Path, records: list[Record]) -> None:
    """The template may only use fields that every record has."""
    import string

    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = sorted(fields - set(REQUIRED))
    if missing:
        raise PipelineError(
            f"data.template uses field {{{missing[0]}}} which the records in {path} do not have; "
            f"use only {{prompt}} and {{response}}"
        )


def prompt_part(template: str, prompt: str) -> str:
    """The template up to where the response starts: what a user sends at inference time."""
    head = template[: template.index("{response}")]
    return head.replace("{prompt}", prompt)


def render(template: str, record: Record) -> str:
    return template.replace("{prompt}", record.prompt).replace("{response}", record.response)


def split(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic train/held-out split (by seed, independent of file order of equal records)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * eval_fraction))
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [records[i] for i in train], [records[i] for i in held]


def load_dataset(path: Path, template: str, eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    records = load_records(path)
    check_template(template, path, records)
    return split(records, eval_fraction, seed)


def read_heldout(finetune_dir: Path) -> tuple[str, list[dict]]:
    """The template a finetune trained with and its held-out records (metrics.json, heldout.jsonl),
    which export checks logits on and evaluate scores."""
    template = json.loads((finetune_dir / "metrics.json").read_text(encoding="utf-8"))["template"]
    held = [json.loads(line) for line in (finetune_dir / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    return template, held
