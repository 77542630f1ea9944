"""The core promise, with the real tiny pipeline: one command builds the package, and only what is
stale rebuilds."""

import json

import pytest

from tasks.manifest import file_table, sha256_file

from conftest import LAB_DATA, STAGES, doit, executed, manifest

pytestmark = pytest.mark.slow


def test_default_build_produces_a_package_with_int4_base_adapter_report_and_model_card(built_project):
    package = built_project / "build/tiny/package"
    for name in ("cpu/model.onnx", "cpu/model.onnx.data", "cpu/genai_config.json", "cpu/tokenizer.json",
                 "cpu/travel.onnx_adapter", "report.json", "report.md", "speed.json", "README.md", "MANIFEST.json"):
        assert (package / name).is_file(), name
    check = json.loads((package / "export_check.json").read_text())["cpu"]
    assert check["checked"]
    for label in ("base", "adapter"):
        assert check[label]["max_abs_diff"] < 0.01 and check[label]["min_cosine"] > 0.99999
    report = json.loads((package / "report.json").read_text())["targets"]["cpu"]
    loss = report["loss"]
    assert loss["with_adapter"]["loss"] < loss["without_adapter"]["loss"], "the adapter should fit the travel data"
    assert any(g["with_adapter"] != g["without_adapter"] for g in report["generations"])
    assert all(g["with_adapter"].strip() for g in report["generations"])
    finetune_metrics = json.loads((built_project / "build/tiny/finetune/metrics.json").read_text())
    assert finetune_metrics["heldout_loss_after"] < finetune_metrics["heldout_loss_before"]
    # the report shows the loss curve; the model card is a Hugging Face card with metadata
    assert "(loss_curve.png)" in (package / "report.md").read_text() and (package / "loss_curve.png").stat().st_size
    from huggingface_hub import ModelCard

    card = ModelCard.load(package / "README.md")
    assert card.data.library_name == "onnxruntime-genai" and {"phi3", "lora", "awq"} <= set(card.data.tags)


def test_every_manifest_matches_its_files_and_chains_to_its_inputs(built_project):
    for stage in STAGES:
        folder = built_project / "build/tiny" / ("package" if stage == "evaluate" else stage)
        m = manifest(built_project, stage)
        assert m["files"] == file_table(folder), stage
        for upstream, digest in m["inputs"].items():
            up = "package" if upstream == "evaluate" else upstream
            assert digest == sha256_file(built_project / "build/tiny" / up / "MANIFEST.json")
    assert manifest(built_project, "finetune")["input_files"].keys() == {"data/travel_qa.jsonl"}
    assert "torch" in manifest(built_project, "quantize")["packages"]


def test_second_run_executes_nothing(built_project):
    result = doit(built_project)
    assert executed(result) == []
    assert result.stdout.count("-- ") >= len(STAGES)


def test_editing_dataset_rebuilds_only_finetune_and_later(project_copy):
    with open(project_copy / "data/travel_qa.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "Is Oslo walkable?", "response": "Yes, the centre is compact."}) + "\n")
    info = doit(project_copy, "info", "finetune", check=False)  # exit 1 = "would run"
    assert "file dependencies have changed" in info.stdout and "- data/travel_qa.jsonl" in info.stdout
    assert executed(doit(project_copy)) == ["finetune", "export", "evaluate"]


def test_editing_calibration_text_rebuilds_quantize_and_later(project_copy):
    with open(project_copy / "data/calibration.txt", "a", encoding="utf-8") as fh:
        fh.write("Porto's riverside cellars open for tastings in the late afternoon, and the bridge glows at dusk.\n")
    assert executed(doit(project_copy)) == ["quantize", "finetune", "export", "evaluate"]


def test_changing_only_the_lora_rank_rebuilds_finetune_and_later(project_copy):
    before = manifest(project_copy, "quantize")
    assert executed(doit(project_copy, "finetune.rank=4")) == ["finetune", "export", "evaluate"]
    assert manifest(project_copy, "quantize") == before
    assert manifest(project_copy, "finetune")["config"]["finetune"]["rank"] == 4


def test_changing_awq_group_size_rebuilds_quantize_and_makes_finetune_stale(project_copy):
    # (the cascade from quantize to the package is test_editing_calibration_text_rebuilds_quantize_and_later;
    # here only the first link, which is what a [quantize] key adds)
    assert executed(doit(project_copy, "quantize", "quantize.group_size=64")) == ["quantize"]
    assert json.loads((project_copy / "build/tiny/quantize/config.json").read_text())["quantization_config"]["group_size"] == 64
    info = doit(project_copy, "info", "finetune", "quantize.group_size=64", check=False)  # exit 1 = "would run"
    assert info.returncode == 1 and "file dependencies have changed" in info.stdout, info.stdout
    assert "quantize/MANIFEST.json" in info.stdout


def test_a_stage_that_reproduces_identical_bytes_does_not_cascade(project_copy):
    code = project_copy / "tasks/base_model.py"
    code.write_text(code.read_text() + "\n# a comment changes the code digest, not the output\n")
    before = sha256_file(project_copy / "build/tiny/base/MANIFEST.json")
    assert executed(doit(project_copy)) == ["base"]
    assert sha256_file(project_copy / "build/tiny/base/MANIFEST.json") == before


def test_clean_removes_a_stage_and_the_next_run_rebuilds_only_it(project_copy):
    doit(project_copy, "clean", "export")
    assert not (project_copy / "build/tiny/export").exists()
    # export comes back byte-identical, so evaluate (which depends on its manifest) stays up to date
    assert executed(doit(project_copy)) == ["export"]


def test_list_shows_every_stage_with_its_doc(built_project):
    out = doit(built_project, "list").stdout
    for stage in STAGES:
        assert stage in out
    assert "AWQ 4-bit" in out and "LoRA" in out


def test_variant_build_from_the_command_line_goes_to_its_own_folder(project_copy):
    default_package = sha256_file(project_copy / "build/tiny/package/MANIFEST.json")
    result = doit(project_copy, "build.dir=build/fewsteps", "finetune.max_steps=5", "finetune", check=True)
    assert executed(result) == ["base", "quantize", "finetune"]
    assert manifest(project_copy, "finetune", "build/fewsteps")["config"]["finetune"]["max_steps"] == 5
    assert sha256_file(project_copy / "build/tiny/package/MANIFEST.json") == default_package


def test_export_fails_past_its_logit_bound_and_keeps_the_previous_package(project_copy):
    before = {s: sha256_file(project_copy / "build/tiny" / d / "MANIFEST.json")
              for s, d in (("export", "export"), ("evaluate", "package"))}
    result = doit(project_copy, "export.max_abs_logit_diff=1e-9", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "too far from the AWQ checkpoint" in errors[0], result.stderr
    after = {s: sha256_file(project_copy / "build/tiny" / d / "MANIFEST.json")
             for s, d in (("export", "export"), ("evaluate", "package"))}
    assert after == before
    assert not list((project_copy / "build/tiny/.staging").iterdir())


@pytest.mark.skipif(not LAB_DATA.exists(), reason="the lab's dataset is not present on this machine")
def test_the_labs_own_dataset_builds_a_package_with_a_working_adapter(project_copy):
    """An outside input: the Olive lab's travel data (CRLF lines, no final newline), never committed."""
    result = doit(project_copy, f"data.path={LAB_DATA}")
    assert executed(result) == ["finetune", "export", "evaluate"]
    m = manifest(project_copy, "finetune")
    assert m["facts"]["heldout_loss_after"] < m["facts"]["heldout_loss_before"]
    report = json.loads((project_copy / "build/tiny/package/report.json").read_text())
    assert report["heldout_records"] == 29  # 10% of the lab's 289 records


def test_a_second_doit_on_the_same_build_folder_exits_naming_the_first(project_copy):
    import os
    import subprocess
    import sys
    import time

    with open(project_copy / "data/travel_qa.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "Is Oslo walkable?", "response": "Yes, the centre is compact."}) + "\n")
    log = project_copy / "build/tiny/logs/finetune.log"
    log.unlink()  # the copied project has the previous build's log: wait for this run's
    first = subprocess.Popen([sys.executable, "-m", "doit", "finetune"], cwd=project_copy, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    while first.poll() is None and not (log.is_file() and "building into" in log.read_text()):
        time.sleep(0.1)
    second = doit(project_copy, check=False)
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"pid {first.pid}" in errors[0], second.stderr
    assert doit(project_copy, "list").returncode == 0  # read-only commands do not wait
    assert first.wait(timeout=600) == 0
    assert executed(doit(project_copy, "finetune")) == []


def test_verify_names_a_damaged_file_and_the_next_build_redoes_that_stage_and_later(project_copy):
    assert "matches its manifest" in doit(project_copy, "verify").stdout
    weights = project_copy / "build/tiny/finetune/adapter/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (project_copy / "build/tiny/export/stray.txt").write_text("not built by us")
    result = doit(project_copy, "verify", check=False)
    assert result.returncode != 0
    assert "finetune: changed adapter/adapter_model.safetensors" in result.stdout
    assert "export: extra stray.txt" in result.stdout
    assert executed(doit(project_copy)) == ["finetune", "export", "evaluate"]
    assert "matches its manifest" in doit(project_copy, "verify").stdout


def test_one_build_exports_cpu_and_cuda_targets_and_says_which_it_could_not_check(project_copy):
    """On a host without a GPU the cuda model is still built (fp16 activations, int4 weights), but
    the logit check and the evaluation say plainly that it was not run."""
    import onnx

    result = doit(project_copy, 'export.targets=["cpu", "cuda"]')
    assert executed(result) == ["export", "evaluate"]
    export = project_copy / "build/tiny/export"
    for target in ("cpu", "cuda"):
        for name in ("model.onnx", "genai_config.json", "travel.onnx_adapter"):
            assert (export / target / name).is_file(), (target, name)
    cuda_config = json.loads((export / "cuda/genai_config.json").read_text())
    assert "cuda" in json.dumps(cuda_config["model"]["decoder"]["session_options"]["provider_options"])
    io_types = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(export / "cuda/model.onnx"), load_external_data=False).graph.input}
    assert io_types["model.layers.0.attn.o_proj.lora_A"] == onnx.TensorProto.FLOAT16
    check = json.loads((export / "export_check.json").read_text())
    import torch
    if not torch.cuda.is_available():
        assert check["cuda"]["checked"] is False and check["cuda"]["reason"] == "no CUDA GPU on the build host"
        report = json.loads((project_copy / "build/tiny/package/report.json").read_text())
        assert report["targets"]["cuda"]["evaluated"] is False
    assert check["cpu"]["checked"] and (project_copy / "build/tiny/package/cuda/model.onnx").is_file()


def test_the_terminal_shows_our_lines_and_a_summary_and_the_log_keeps_library_output(project_copy):
    result = doit(project_copy, "export.check_prompts=3")
    assert executed(result) == ["export", "evaluate"]
    terminal = result.stdout + result.stderr
    # the model builder's prints and progress bars, and library warnings, are in the export log only
    for noise in ("Saving ONNX model", "Reading layer", "it/s]", "[transformers]", "Warning"):
        assert noise not in terminal, noise
    log = (project_copy / "build/tiny/logs/export.log").read_text()
    assert "Saving ONNX model" in log and "Reading layer" in log
    summary = [line for line in result.stdout.splitlines() if line.startswith("summary: ")]
    assert summary[0].startswith("summary: built export ") and "up to date: base, quantize, finetune" in summary[0]
    assert summary[1].endswith("next: python -m tasks chat --package build/tiny/package")
    again = doit(project_copy, "export.check_prompts=3")
    assert "summary: nothing to do, all 5 stages up to date; package: build/tiny/package" in again.stdout
