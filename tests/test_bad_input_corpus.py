"""Generated bad input: every malformed dataset or config is one clear error, never a crash.

In-process properties (hypothesis) cover the readers; a fixed corpus of the nastiest cases then runs
through `doit` end to end: one `error:` line, non-zero exit, no traceback, nothing overwritten.
More examples: HYPOTHESIS_PROFILE=long (see RELIABILITY.md).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.config import load_config
from tasks.data import load_records
from tasks.errors import PipelineError

from conftest import REPO, manifest_digests

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
record = st.fixed_dictionaries({"prompt": st.text(max_size=30), "response": st.text(max_size=30)},
                                optional={"extra": json_values})
line = st.one_of(
    record.map(json.dumps),
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(["prompt", "response", "promt", "answer"]), json_values, max_size=3).map(json.dumps),
    record.map(json.dumps).map(lambda s: s[: len(s) // 2]),   # truncated
    st.text(max_size=60),
)


def one_line_error(exc: PipelineError, path: Path) -> None:
    message = str(exc)
    assert "\n" not in message and message.startswith(str(path)), message


def check_dataset(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        try:
            records = load_records(path)
        except PipelineError as exc:
            one_line_error(exc, path)
            return
        assert len(records) >= 2
        for r in records:
            assert r.prompt.strip() and r.response.strip()
            r.prompt.encode("utf-8"), r.response.encode("utf-8")


@given(st.lists(line, max_size=8))
def test_generated_jsonl_lines_load_or_fail_with_one_file_line_error(lines):
    check_dataset("\n".join(lines).encode("utf-8", "surrogatepass"))


@given(st.binary(max_size=400))
def test_arbitrary_bytes_load_or_fail_with_one_file_line_error(data):
    check_dataset(data)


@given(st.lists(line, min_size=1, max_size=4), st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252"]))
def test_other_encodings_fail_with_one_line_naming_utf8(lines, encoding):
    text = "\n".join(lines) + "\nnaïve café"
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        with pytest.raises(PipelineError) as info:
            load_records(path)
        one_line_error(info.value, path)


toml_scalars = st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                         st.text(max_size=12).map(json.dumps), st.just("[1, 2]"), st.just('["cpu", "cuda"]'))
keys = st.sampled_from(["build.dir", "build.device", "model.profile", "model.revision", "quantize.group_size",
                        "quantize.search", "finetune.rank", "finetune.learning_rate", "finetune.target_modules",
                        "export.targets", "export.adapter_name", "data.template", "data.eval_fraction",
                        "evaluate.prompts", "model.tiny.hidden_size", "finetune.rnak", "nosuch.key", "x"])


@given(st.lists(st.tuples(keys, toml_scalars), max_size=4))
def test_generated_configs_load_or_fail_with_one_line_naming_the_file(pairs):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.toml"
        sections: dict[str, list[str]] = {}
        for key, value in pairs:
            section, _, leaf = key.rpartition(".")
            sections.setdefault(section, []).append(f"{leaf} = {value}")
        path.write_text("\n".join(f"[{s}]\n" + "\n".join(v) if s else "\n".join(v) for s, v in sections.items()) + "\n")
        try:
            load_config(path)
        except PipelineError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)


@given(st.text(max_size=300))
def test_arbitrary_text_as_config_or_override_never_crashes(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        for attempt in (lambda: load_config(path), lambda: load_config(REPO / "pipeline.toml", [text])):
            try:
                attempt()
            except PipelineError as exc:
                assert "\n" not in str(exc).strip()


# --- end to end: the nastiest cases through doit ------------------------------------------------------


GOOD = json.dumps({"prompt": "Best time for Kyoto?", "response": "Late autumn."}) + "\n"
CASES = {
    "utf16": ("data", (GOOD * 3).encode("utf-16"), r"data/travel_qa.jsonl:1: not valid UTF-8"),
    "latin1": ("data", GOOD.encode() + '{"prompt": "café", "response": "x"}\n'.encode("latin-1"), r":2: not valid UTF-8"),
    "truncated": ("data", (GOOD * 3 + GOOD[:20]).encode(), r":4: invalid JSON"),
    "huge_line": ("data", GOOD.encode() + b'{"prompt": "' + b"a" * (2 << 20) + b'", "response": "x"}\n', r":2: line is 2.0 MB long"),
    "wrong_type": ("data", (GOOD + json.dumps({"prompt": ["a"], "response": "x"}) + "\n").encode(), r":2: field 'prompt' must be"),
    "deep": ("data", GOOD.encode() + b"[" * 200000 + b"\n", r":2: unreadable JSON \(nested too deeply\)"),
    "empty": ("data", b"", r"has 0 records"),
    "symlink_out": ("symlink", None, r"data.path: data/travel_qa.jsonl links to /etc/hostname, outside the project"),
    "config_unknown_key": ("config", "[finetune]\nlearning_rat = 0.1\n", r"did you mean 'finetune.learning_rate'"),
    "config_wrong_type": ("config", "[finetune]\nrank = \"eight\"\n", r"finetune.rank"),
    "config_binary": ("config", "\x00\x01[build\n", r"not valid TOML"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_through_doit_is_one_line_and_overwrites_nothing(project_copy, case):
    kind, content, pattern = CASES[case]
    before = manifest_digests(project_copy)
    if kind == "data":
        (project_copy / "data/travel_qa.jsonl").write_bytes(content)
    elif kind == "symlink":
        (project_copy / "data/travel_qa.jsonl").unlink()
        os.symlink("/etc/hostname", project_copy / "data/travel_qa.jsonl")
    else:
        (project_copy / "pipeline.toml").write_text(content)
    result = subprocess.run([sys.executable, "-m", "doit"], cwd=project_copy, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    import re
    assert re.search(pattern, errors[0]), errors[0]
    assert manifest_digests(project_copy) == before
