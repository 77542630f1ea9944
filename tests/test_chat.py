"""The lab's chat app against the built package: adapter by name, on and off, streaming output."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
QUESTION = "what is the best thing to see in chicago"


def chat(project, *args):
    return subprocess.run([sys.executable, "-m", "tasks", "chat", "--package", "build/tiny/package",
                           "--max-new-tokens", "24", *args], cwd=project, capture_output=True, text=True, timeout=120)


def test_one_shot_answers_differ_with_and_without_the_adapter(built_project):
    with_adapter = chat(built_project, "--adapter", "travel", "--prompt", QUESTION)
    without = chat(built_project, "--no-adapter", "--prompt", QUESTION)
    assert with_adapter.returncode == 0 and without.returncode == 0, with_adapter.stderr + without.stderr
    assert with_adapter.stdout.strip() and with_adapter.stdout != without.stdout


def test_interactive_session_reads_turns_until_an_empty_line(built_project):
    result = subprocess.run([sys.executable, "-m", "tasks", "chat", "--package", "build/tiny/package",
                             "--max-new-tokens", "8"], cwd=built_project, input=f"{QUESTION}\nhi\n\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 3 and "adapter travel" in result.stdout


def test_unknown_adapter_name_lists_the_available_ones(built_project):
    result = chat(built_project, "--adapter", "french", "--prompt", QUESTION)
    assert result.returncode == 2
    assert "no adapter named 'french'" in result.stderr and "travel" in result.stderr


def test_a_conversation_is_kept_turn_after_turn_in_the_packages_own_template(built_project):
    probe = (
        "import sys, json; import onnxruntime_genai as og\n"
        "from tasks.chat import conversation_prompt; from tasks.data import genai_renderer, text_renderer\n"
        "render = genai_renderer(og.Tokenizer(og.Model('build/tiny/package/cpu')), None)\n"
        "lab = text_renderer('Q: {prompt}\\nA: {response}\\n')\n"
        "print(json.dumps([conversation_prompt(render, [('hi', 'Hello.')], 'and Rome?', True),\n"
        "                  conversation_prompt(lab, [('hi', 'Hello.')], 'and Rome?', False)]))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=built_project, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    import json

    chat_template, text_template = json.loads(result.stdout)
    # the tiny model's template is Phi-3.5's: earlier turns stay, and the prompt ends at the assistant's turn
    assert chat_template == "<|user|>\nhi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nand Rome?<|end|>\n<|assistant|>\n"
    assert text_template == "Q: hi\nA: Hello.\nQ: and Rome?\nA: "
