"""export.max_context: a package with a fixed context, its limit stated, a longer prompt refused."""

import json
import subprocess
import sys

import pytest

from tasks.context_limit import apply, model_context
from tasks.errors import PipelineError

from conftest import doit, executed


def chat(project, prompt: str, max_new_tokens: int = 100) -> subprocess.CompletedProcess:
    """`python -m tasks chat --prompt` on the project's package."""
    return subprocess.run([sys.executable, "-m", "tasks", "chat", "--package", "build/tiny/package",
                           "--max-new-tokens", str(max_new_tokens), "--prompt", prompt], cwd=project,
                          capture_output=True, text=True, timeout=120)


PHI3_CONFIG = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
               "rope_parameters": {"rope_type": "longrope"}}


def test_the_models_context_and_longropes_original_one_are_read_from_config_json():
    assert model_context(PHI3_CONFIG) == (131072, 4096)
    assert model_context({"max_position_embeddings": 32768, "rope_scaling": None}) == (32768, None)
    llama3 = {"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "original_max_position_embeddings": 8192}}
    assert model_context(llama3) == (131072, None)  # llama3 scaling is static: no switch in the graph


def test_a_max_context_past_the_models_own_is_refused_in_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"export.max_context=200000 is more than the model's context \(131072"):
        apply(tmp_path, PHI3_CONFIG, 200000, "cpu")


@pytest.mark.slow
def test_a_fixed_context_package_folds_the_rope_switch_states_its_limit_and_refuses_a_longer_prompt(project_copy):
    import onnx

    result = doit(project_copy, "export.max_context=64")
    assert executed(result) == ["export", "evaluate"]
    cpu = project_copy / "build/tiny/package/cpu"
    graph = onnx.load(str(cpu / "model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "If"]  # the export's logit check ran on this graph
    genai = json.loads((cpu / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 64 and genai["search"]["max_length"] == 64
    assert json.loads((project_copy / "build/tiny/package/report.json").read_text())["context_length"] == 64
    assert "- Context: 64 tokens in all" in (project_copy / "build/tiny/package/README.md").read_text()

    short = chat(project_copy, "where to go in Rome")
    assert short.returncode == 0 and short.stdout.strip(), short.stderr  # generation stops at the context
    long = chat(project_copy, "where to go in Rome " * 40)
    assert long.returncode != 0
    assert "tokens and this package supports 64" in long.stderr and "export.max_context" in long.stderr
    assert "Traceback" not in long.stderr and len(long.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_merged_package_is_the_plain_graph_and_reports_the_loss_with_and_without_merging(project_copy):
    import onnx

    result = doit(project_copy, "export.adapter_mode=merged")
    assert executed(result) == ["export", "evaluate"]
    package = project_copy / "build/tiny/package"
    graph = onnx.load(str(package / "cpu/model.onnx"), load_external_data=False).graph
    assert not [i.name for i in graph.input if "lora" in i.name] and not [n for n in graph.node if "lora" in n.name]
    assert not list(package.glob("cpu/*.onnx_adapter"))
    check = json.loads((project_copy / "build/tiny/export/export_check.json").read_text())
    assert check["cpu"]["merged"]["max_abs_diff"] < 1e-3  # the graph computes the requantized merged model
    report = json.loads((package / "report.json").read_text())
    merge = report["merge"]
    assert merge["unmerged"] < merge["base"] and merge["merged"] < merge["base"]  # the adapter's gain survives
    assert abs(report["targets"]["cpu"]["loss"]["with_adapter"]["loss"] - merge["merged"]) < 1e-3
    assert "warning" not in merge and "Warning" not in (package / "report.md").read_text()  # 99% of the gain kept
    assert "merged into the weights" in (package / "README.md").read_text()
    answer = chat(project_copy, "where to go in Rome", max_new_tokens=8)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr


@pytest.mark.slow
def test_a_merge_that_rounds_the_adapter_away_says_so_in_the_log_and_the_report(project_copy):
    # Two optimizer steps: the LoRA lowers the held-out loss by about 0.1, and requantizing the merged weights
    # to int4 rounds nearly all of that away (3% kept here). The package is still built; the user is told.
    result = doit(project_copy, "export.adapter_mode=merged", "finetune.max_steps=2")
    assert executed(result) == ["finetune", "export", "evaluate"]
    merge = json.loads((project_copy / "build/tiny/package/report.json").read_text())["merge"]
    assert merge["gain_kept"] is not None and merge["gain_kept"] < 0.5, merge
    assert merge["warning"].startswith("merging kept ") and 'export.adapter_mode = "switchable"' in merge["warning"]
    assert f"**Warning:** {merge['warning']}." in (project_copy / "build/tiny/package/report.md").read_text()
    assert merge["warning"] in (project_copy / "build/tiny/logs/export.log").read_text()


def test_merged_mode_with_extra_adapters_is_refused_in_one_line(tmp_path):
    from tasks.config import load_config

    config = tmp_path / "pipeline.toml"
    config.write_text('[export]\nadapter_mode = "merged"\n[adapters.legal]\npath = "data/legal.jsonl"\n')
    with pytest.raises(Exception, match=r"folds one adapter into the model; \[adapters\] \(legal\) need"):
        load_config(config)
