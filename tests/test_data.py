"""The dataset reader: the lab's format, and one-line errors that name file and line."""

import json

import pytest

from tasks.config import LAB_TEMPLATE
from tasks.data import check_template, load_dataset, load_records, prompt_part, render, split
from tasks.errors import PipelineError

from conftest import LAB_DATA, REPO


def write_lines(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(p="Where to go?", r="Paris."):
    return json.dumps({"prompt": p, "response": r})


def test_project_dataset_loads_and_splits_deterministically():
    train, held = load_dataset(REPO / "data" / "travel_qa.jsonl", LAB_TEMPLATE, 0.1, 0)
    assert len(train) + len(held) >= 300 and len(held) == round((len(train) + len(held)) * 0.1)
    again = load_dataset(REPO / "data" / "travel_qa.jsonl", LAB_TEMPLATE, 0.1, 0)
    assert (train, held) == again
    assert not {r.line for r in train} & {r.line for r in held}


@pytest.mark.skipif(not LAB_DATA.exists(), reason="the lab's dataset is not present on this machine")
def test_the_labs_own_dataset_with_crlf_lines_is_accepted():
    records = load_records(LAB_DATA)
    assert len(records) == 289
    assert all("\r" not in r.response for r in records)


def test_invalid_json_reports_file_and_line(tmp_path):
    path = write_lines(tmp_path, [record(), '{"prompt": "x", "response": ', record()])
    with pytest.raises(PipelineError, match=rf"{path}:2: invalid JSON"):
        load_records(path)


def test_missing_field_reports_line_and_field(tmp_path):
    path = write_lines(tmp_path, [record(), record(), json.dumps({"prompt": "only"})])
    with pytest.raises(PipelineError, match=r":3: missing field 'response'"):
        load_records(path)


def test_wrong_type_and_empty_string_are_rejected(tmp_path):
    with pytest.raises(PipelineError, match=r":1: field 'prompt' must be a non-empty string"):
        load_records(write_lines(tmp_path, [json.dumps({"prompt": 3, "response": "x"}), record()]))
    with pytest.raises(PipelineError, match=r":2: field 'response'"):
        load_records(write_lines(tmp_path, [record(), json.dumps({"prompt": "x", "response": " "})], "e.jsonl"))


def test_empty_dataset_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(PipelineError, match=r"has 0 records"):
        load_records(path)


def test_non_utf8_reports_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((record() + "\n").encode() + '{"prompt": "café", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(PipelineError, match=r":2: not valid UTF-8"):
        load_records(path)


def test_template_field_not_in_data_is_named(tmp_path):
    records = load_records(write_lines(tmp_path, [record(), record()]))
    with pytest.raises(PipelineError, match=r"\{context\}"):
        check_template("{context} {prompt} {response}", tmp_path / "d.jsonl", records)


def test_lab_template_renders_and_prompt_part_ends_at_the_assistant_turn():
    from tasks.data import Record

    r = Record("what is the best thing to see in chicago", "The Bean.", 1)
    assert render(LAB_TEMPLATE, r) == "<|user|>\nwhat is the best thing to see in chicago<|end|>\n<|assistant|>\nThe Bean.<|end|>"
    assert prompt_part(LAB_TEMPLATE, r.prompt) == "<|user|>\nwhat is the best thing to see in chicago<|end|>\n<|assistant|>\n"


def test_split_keeps_at_least_one_record_out():
    from tasks.data import Record

    records = [Record(f"p{i}", "r", i) for i in range(5)]
    train, held = split(records, 0.01, 0)
    assert len(held) == 1 and len(train) == 4
