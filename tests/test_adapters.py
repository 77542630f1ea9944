"""Multi-LoRA packages: one quantized, exported base and one .onnx_adapter per dataset, switched by name;
adding a dataset trains and exports only that adapter; independent adapters build in parallel."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.errors import PipelineError
from tests.conftest import REPO, doit, manifest_digests
from tools.harness import write_dataset

pytestmark = pytest.mark.slow


def ran(result) -> list[str]:
    return re.findall(r"^\.  (\w+)$", result.stdout, re.MULTILINE)


def chat(project: Path, adapter: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tasks", "chat", "--package", str(project / "build/tiny/package"),
                          "--adapter", adapter, "--prompt", "Best time to visit Lisbon?", "--max-new-tokens", "10"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_adding_datasets_trains_and_exports_only_their_adapters_into_one_package(project_copy):
    before = manifest_digests(project_copy)
    support = write_dataset(project_copy, "support", lambda r: "Please contact the support desk about " + r["prompt"][:30])
    hotels = write_dataset(project_copy, "hotels", lambda r: "Our concierge suggests: " + r["response"][:50])

    second = doit(project_copy, support)
    assert ran(second) == ["check", "finetune_support", "adapter_support", "evaluate"]
    third = doit(project_copy, support, hotels)
    assert ran(third) == ["check", "finetune_hotels", "adapter_hotels", "evaluate"]
    after = manifest_digests(project_copy)
    assert {s: after[s] == before[s] for s in before} == {"base": True, "quantize": True, "finetune": True,
                                                          "export": True, "evaluate": False}

    target = project_copy / "build/tiny/package/cpu"
    assert sorted(p.name for p in target.glob("*.onnx*")) == [
        "hotels.onnx_adapter", "model.onnx", "model.onnx.data", "support.onnx_adapter", "travel.onnx_adapter"]
    report = json.loads((project_copy / "build/tiny/package/report.json").read_text())
    for name in ("support", "hotels"):
        loss = report["extra_adapters"][name]["targets"]["cpu"]["loss"]
        assert loss["with_adapter"]["loss"] < loss["without_adapter"]["loss"]  # each learned its own data
    replies = {name: chat(project_copy, name) for name in ("travel", "support", "hotels")}
    assert len(set(replies.values())) == 3  # switched by name: three different models of one base
    assert doit(project_copy, "verify", support, hotels).returncode == 0


def test_independent_adapters_build_in_parallel_within_one_build(project_copy):
    support = write_dataset(project_copy, "support", lambda r: "Support: " + r["prompt"][:30])
    hotels = write_dataset(project_copy, "hotels", lambda r: "Hotels: " + r["response"][:40])
    result = doit(project_copy, "-n", "2", support, hotels)
    assert sorted(ran(result)) == sorted(["check", "finetune_hotels", "finetune_support", "adapter_hotels",
                                          "adapter_support", "evaluate"])
    logs = project_copy / "build/tiny/logs"
    spans = {}
    for name in ("finetune_support", "finetune_hotels"):
        stamps = re.findall(r"^(\d\d:\d\d:\d\d) ", (logs / f"{name}.log").read_text(), re.MULTILINE)
        spans[name] = (stamps[0], stamps[-1])
    (a0, a1), (b0, b1) = spans.values()
    assert a0 <= b1 and b0 <= a1, spans  # the two trainings overlapped in time
    assert doit(project_copy, "verify", support, hotels).returncode == 0


@pytest.mark.parametrize("override, message", [
    ('adapters.travel.path="data/travel_qa.jsonl"', "repeats export.adapter_name"),
    ('adapters."bad name".path="data/travel_qa.jsonl"', "use letters, digits"),
    ('adapters.x.template="no placeholders"', "adapters.x"),
])
def test_bad_adapter_entries_are_refused_in_one_line(override, message):
    overrides = [override] if "template" not in override else [override, 'adapters.x.path="data/travel_qa.jsonl"']
    with pytest.raises(PipelineError, match=message):
        load_config(REPO / "pipeline.toml", overrides)


def test_a_broken_adapter_dataset_fails_the_check_with_file_and_line(project_copy):
    (project_copy / "data/bad_qa.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "no response"}\n')
    result = doit(project_copy, 'adapters.bad.path="data/bad_qa.jsonl"', check=False)
    assert result.returncode != 0 and "bad_qa.jsonl:2" in result.stderr
    assert manifest_digests(project_copy)["evaluate"]  # the earlier package is still there
