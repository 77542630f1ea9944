"""Experiment matrix: each point built into its own folder with the real tiny pipeline, shared stages
restored from the run cache, points built in parallel (doit -n 2), one comparison."""

from __future__ import annotations

import json

import pytest

from tasks.config import load_config
from tasks.errors import PipelineError
from tests.conftest import REPO, doit

GRID = "matrix.finetune.rank=[4, 16]"


@pytest.mark.slow
def test_matrix_builds_every_point_in_parallel_reusing_shared_stages_and_compares_them(project_copy):
    result = doit(project_copy, "-n", "2", "matrix", GRID)
    assert result.returncode == 0
    matrix = project_copy / "build/tiny/matrix"
    for point, rank in (("rank-4", 4), ("rank-16", 16)):
        folder = matrix / point
        assert json.loads((folder / "finetune/MANIFEST.json").read_text())["config"]["finetune"]["rank"] == rank
        # base and quantize do not depend on the rank: computed once (by the main build), restored here
        for shared in ("base", "quantize"):
            assert "restored from the run cache" in (folder / "logs" / f"{shared}.log").read_text()
        assert "restored from the run cache" not in (folder / "logs/finetune.log").read_text()
    comparison = json.loads((matrix / "comparison.json").read_text())
    rows = {row["point"]: row for row in comparison["points"]}
    assert set(rows) == {"rank-4", "rank-16"} and all(row["built"] for row in rows.values())
    assert rows["rank-16"]["adapter_mb"] > 3 * rows["rank-4"]["adapter_mb"]  # 4x the LoRA parameters
    assert all(row["heldout_loss_adapter"] < row["heldout_loss_base"] for row in rows.values())
    assert (matrix / "comparison.png").stat().st_size > 10_000
    assert "| rank-16 | 16 |" in (matrix / "comparison.md").read_text()
    # The main build is untouched and the matrix is not part of the default build.
    assert doit(project_copy).stdout.count("-- ") >= 5


@pytest.mark.parametrize("override, message", [
    ("matrix.finetune.rank=[4, 0]", "matrix point rank-0: finetune.rank"),
    ("matrix.finetune.rnk=[4]", "did you mean 'finetune.rank'"),
    ("matrix.build.dir=[\"a\", \"b\"]", "only stage settings can vary"),
    ("matrix.finetune.rank=8", "must be a non-empty list"),
    ("matrix.finetune.rank=[1,2,3,4,5,6,7,8,9]", None),
])
def test_a_bad_matrix_fails_at_once_naming_the_point_and_key(override, message):
    if message is None:  # 9 points is fine; 9 x 8 = 72 is not
        assert len(load_config(REPO / "pipeline.toml", [override]).matrix["finetune"]["rank"]) == 9
        with pytest.raises(PipelineError, match="72 points; at most 64"):
            load_config(REPO / "pipeline.toml", [override, "matrix.finetune.max_steps=[1,2,3,4,5,6,7,8]"])
        return
    with pytest.raises(PipelineError, match=message.replace("[", r"\[")):
        load_config(REPO / "pipeline.toml", [override])
