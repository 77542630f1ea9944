"""finetune.processes: the LoRA stage across processes with torch.distributed (gloo on CPU): the same
global batch, a finite loss close to the one-process run, and an adapter that exports and evaluates."""

from __future__ import annotations

import json

import pytest

from tasks.config import load_config
from tasks.errors import PipelineError
from tests.conftest import REPO, doit, executed, manifest


@pytest.mark.slow
def test_two_process_finetune_trains_the_same_objective_and_its_adapter_ships(project_copy):
    one = manifest(project_copy, "finetune")["facts"]
    result = doit(project_copy, "finetune.processes=2")
    assert executed(result) == ["finetune", "export", "evaluate"]  # export's logit check and evaluate passed
    two = manifest(project_copy, "finetune")["facts"]
    assert two["processes"] == 2
    assert "2 processes (torch.distributed, gloo)" in (project_copy / "build/tiny/logs/finetune.log").read_text()
    # Same data, same global batch, same seed; only dropout's random stream differs between the runs.
    assert two["heldout_loss_after"] < two["heldout_loss_before"]
    assert abs(two["heldout_loss_after"] - one["heldout_loss_after"]) < 0.03 * one["heldout_loss_after"]
    report = json.loads((project_copy / "build/tiny/package/report.json").read_text())
    loss = report["targets"]["cpu"]["loss"]
    assert loss["with_adapter"]["loss"] < loss["without_adapter"]["loss"]


def test_more_processes_than_records_per_step_is_refused():
    with pytest.raises(PipelineError, match="exceeds finetune.batch_size"):
        load_config(REPO / "pipeline.toml", ["finetune.processes=16", "finetune.batch_size=8"])
