"""Bad input: one line naming problem and fix, non-zero exit, before any expensive stage, and the
earlier good build untouched."""

import re

import pytest


from conftest import doit, executed, manifest_digests

pytestmark = pytest.mark.slow


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def expect_refusal(project, args, pattern):
    before = manifest_digests(project)
    result = doit(project, *args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = error_lines(result)
    assert len(lines) == 1, (result.stdout, result.stderr)
    assert re.search(pattern, lines[0]), lines[0]
    assert executed(result) == []
    assert manifest_digests(project) == before


@pytest.mark.parametrize("content, pattern", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp', r"travel_qa.jsonl:2: invalid JSON"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', r"travel_qa.jsonl:2: missing field 'response'"),
    ('{"prompt": "a", "response": "b"}\n["a", "b"]\n', r":2: expected a JSON object"),
    ("", r"has 0 records"),
])
def test_malformed_dataset(project_copy, content, pattern):
    (project_copy / "data/travel_qa.jsonl").write_text(content, encoding="utf-8")
    expect_refusal(project_copy, [], pattern)


def test_template_field_not_in_the_data(project_copy):
    expect_refusal(project_copy, ['data.template=<|user|>\n{prompt}{context}<|end|>\n{response}'], r"\{context\}")


def test_unknown_profile(project_copy):
    expect_refusal(project_copy, ["model.profile=llama-9"], r"unknown profile 'llama-9'")


def test_revision_that_is_not_a_commit(project_copy):
    expect_refusal(project_copy, ["model.profile=hub", "model.repo_id=microsoft/Phi-3.5-mini-instruct",
                                  "model.revision=main"], r"not a 40-hex commit")


def test_missing_calibration_file(project_copy):
    (project_copy / "data/calibration.txt").unlink()
    expect_refusal(project_copy, [], r"calibration.*not found")


def test_unknown_config_key(project_copy):
    expect_refusal(project_copy, ["finetune.learning_rat=0.1"], r"unknown key 'finetune.learning_rat'")
