"""Bring your own model: every supported family builds end to end from a local cache in the Hub's
layout, offline, with the hub profile (nothing can be downloaded here, so each model is a tiny
random-init one of that family, with its real structural options, its own BPE tokenizer, special
tokens and chat template, made by the tiny profile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import doit, make_hub_cache, make_project
from tasks.families import FAMILIES

pytestmark = pytest.mark.slow
REVISION = "abcdef0123456789abcdef0123456789abcdef01"
# Small enough for CI (AWQ's group of 128 still divides every linear's input), real enough to train.
SIZES = ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=256", "model.tiny.num_hidden_layers=2",
         "model.tiny.num_attention_heads=4", "model.tiny.vocab_size=1000"]
FAST = ["quantize.calibration_samples=32", "quantize.calibration_seq_len=128", "finetune.max_steps=40",
        "finetune.eval_every=40", "export.check_prompts=3", "evaluate.prompts=2", "evaluate.max_new_tokens=12",
        "evaluate.loss_records=8"]
QUESTION = "what is the best thing to see in chicago"


@pytest.fixture(scope="module")
def families_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("families") / "project")
    return project, tmp_path_factory.mktemp("hf")


def hub_env(hf_home) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_end_to_end_from_the_hub_layout_offline(families_project, family):
    project, hf_home = families_project
    # the model a user would download: this family's tiny model, put into the HF cache's layout
    doit(project, "base", f"model.tiny.family={family}", *SIZES, f"build.dir=build/src-{family}")
    repo_id = f"local-org/tiny-{family}"
    make_hub_cache(project / f"build/src-{family}/base", hf_home, repo_id, REVISION)

    build = f"build/{family}"
    doit(project, "model.profile=hub", f"model.repo_id={repo_id}", f"model.revision={REVISION}", f"build.dir={build}",
         *FAST, env=hub_env(hf_home))
    package = project / build / "package"
    fam = FAMILIES[family]

    # export's logit check passed (it fails the stage otherwise) on every linear of the family
    checks = json.loads((package / "export_check.json").read_text())["cpu"]
    assert checks["checked"] and checks["adapter"]["max_abs_diff"] < 0.01
    # int4 MatMuls that read the same activation (gate and up) share one LoRA A: one x A per activation
    import onnx

    graph = onnx.load(str(package / "cpu/model.onnx"), load_external_data=False).graph
    grafted = {n.input[0] for n in graph.node if n.op_type == "MatMulNBits" and n.output[0].endswith("/base")}
    assert len([n for n in graph.node if n.name.endswith("/lora_A/MatMul")]) == len(grafted)
    # with no adapter active the LoRA branch multiplies by empty matrices (A is K x 0, B 0 x N), which the
    # check above found exact (max |d| vs the checkpoint, base label)
    defaults = {i.name: list(i.dims) for i in graph.initializer if ".lora_" in i.name}
    assert defaults and all(0 in dims and len(dims) == 2 for dims in defaults.values()), defaults
    assert checks["base"]["max_abs_diff"] < 0.01
    tuned = json.loads((project / build / "finetune/metrics.json").read_text())
    assert tuned["target_modules"] == sorted(fam.linears) and tuned["template"] is None
    assert tuned["chat_template"] == fam.chat_template
    # the adapter switches on and off, and on it changes what the model says and lowers the held-out loss
    report = json.loads((package / "report.json").read_text())["targets"]["cpu"]
    assert report["loss"]["with_adapter"]["loss"] < report["loss"]["without_adapter"]["loss"]
    assert report["max_logit_shift_from_adapter"] > 1e-3
    from huggingface_hub import ModelCard

    card = ModelCard.load(package / "README.md").data
    assert card.base_model == repo_id and family in card.tags

    # chat renders the conversation in the package's own template, turn after turn
    probe = (
        "import sys, json; from pathlib import Path; import onnxruntime_genai as og\n"
        "from tasks.chat import conversation_prompt; from tasks.data import genai_renderer\n"
        "tok = og.Tokenizer(og.Model(sys.argv[1]))\n"
        "print(json.dumps(conversation_prompt(genai_renderer(tok, None), [('hi', 'Hello.')], sys.argv[2], True)))\n")
    shown = subprocess.run([sys.executable, "-c", probe, str(package / "cpu"), QUESTION], cwd=project,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    rendered = json.loads(shown.stdout)
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": QUESTION}]
    from jinja2 import Template  # the family's template rendered independently of the package
    assert rendered == Template(fam.chat_template).render(messages=expected, add_generation_prompt=True,
                                                          bos_token=fam.bos or "", eos_token=fam.eos)
    talk = subprocess.run([sys.executable, "-m", "tasks", "chat", "--package", str(package), "--prompt", QUESTION,
                           "--max-new-tokens", "8"], cwd=project, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **hub_env(hf_home)})
    assert talk.returncode == 0 and talk.stdout.endswith("\n") and not talk.stderr, talk.stderr


def check(project, *settings, env=None):
    return subprocess.run([sys.executable, "-m", "tasks", "check", *(a for s in settings for a in ("--set", s))],
                          cwd=project, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_an_unsupported_family_is_refused_at_check_in_one_line_before_any_download(tmp_path):
    project = make_project(tmp_path / "project")
    only_config = tmp_path / "gpt2"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    make_hub_cache(only_config, tmp_path / "hf", "openai-community/gpt2", REVISION)
    result = check(project, "model.profile=hub", "model.repo_id=openai-community/gpt2", f"model.revision={REVISION}",
                   env=hub_env(tmp_path / "hf"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "model_type 'gpt2' (GPT2LMHeadModel) is not a supported family" in result.stderr
    assert all(f.label in result.stderr for f in FAMILIES.values())
    assert not (project / "build").exists() or not any((project / "build").rglob("*.safetensors"))


def test_a_lora_target_the_family_does_not_have_is_one_line_naming_its_linears(tmp_path):
    project = make_project(tmp_path / "project")
    result = check(project, "model.tiny.family=llama", 'finetune.target_modules=["qkv_proj"]')
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "Llama has no linear 'qkv_proj'" in result.stderr and "q_proj" in result.stderr


def test_a_local_model_folder_is_a_profile_and_its_files_are_inputs_of_the_build(tmp_path):
    project = make_project(tmp_path / "project")
    doit(project, "base", "model.tiny.family=qwen2", *SIZES, "build.dir=build/src")
    folder = project / "models/my-qwen"
    folder.mkdir(parents=True)
    for path in (project / "build/src/base").iterdir():
        if path.name != "MANIFEST.json":
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights are never taken")
    local = ["model.profile=local", "model.path=models/my-qwen", "build.dir=build/local"]
    doit(project, "base", *local)
    base = project / "build/local/base"
    assert sorted(p.name for p in base.iterdir()) == sorted([p.name for p in folder.iterdir()
                                                             if p.suffix != ".bin"] + ["MANIFEST.json"])
    assert json.loads((base / "MANIFEST.json").read_text())["facts"]["source"] == "local"
    assert "-- base" in doit(project, "base", *local).stdout  # up to date
    (folder / "generation_config.json").write_text('{"do_sample": false}\n')
    assert ".  base" in doit(project, "base", *local).stdout  # an edited model file rebuilds base
