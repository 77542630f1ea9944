"""SIGKILL in the middle of a stage, then `doit`: the build completes and no half-written output is
ever adopted. (The long, randomised trials belong to the reliability issue; this is the CI part.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tasks.config import load_config
from tasks.manifest import sha256_file
from tasks.paths import Paths
from tasks.verify import find_damage

from conftest import doit, executed

pytestmark = pytest.mark.slow


def outputs_are_whole(project):
    """Every published stage folder holds exactly the files its manifest lists."""
    assert not find_damage(Paths.of(project, load_config(project / "pipeline.toml")))


@pytest.mark.parametrize("stage, marker", [
    ("quantize", "AWQ"),           # inside AutoAWQ's layer loop
    ("finetune", "finetune: 30/"),  # in the training loop
    ("export", "grafting LoRA"),   # between the builder and the adapter file
])
def test_sigkill_mid_stage_then_doit_completes_and_adopts_nothing_partial(project_copy, stage, marker):
    # Make the stage (and everything after it) stale with a real input change.
    edits = {"quantize": "data/calibration.txt", "finetune": "data/travel_qa.jsonl", "export": None}
    if edits[stage]:
        with open(project_copy / edits[stage], "a", encoding="utf-8") as fh:
            line = {"quantize": "Tallinn's old town walls are best seen from the Patkuli viewing platform at dawn.\n",
                    "finetune": json.dumps({"prompt": "Is Oslo walkable?", "response": "Yes, very."}) + "\n"}[stage]
            fh.write(line)
        args = []
    else:
        args = ["export.check_prompts=4"]
    old_manifest = sha256_file(project_copy / "build/tiny" / stage / "MANIFEST.json")
    log = project_copy / "build/tiny/logs" / f"{stage}.log"
    log.unlink()  # the copied project holds the previous build's log; wait for this run's marker
    proc = subprocess.Popen([sys.executable, "-m", "doit", *args], cwd=project_copy, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if (log.is_file() and marker in log.read_text(errors="replace")) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the build finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    staging = project_copy / "build/tiny/.staging"
    assert any(p.name.startswith(f"{stage}.") for p in staging.iterdir()), "killed before the stage was writing"
    # The killed stage left its previous complete output (or none), never a partial one.
    current = project_copy / "build/tiny" / stage / "MANIFEST.json"
    assert not current.exists() or sha256_file(current) == old_manifest
    outputs_are_whole(project_copy)
    result = doit(project_copy, *args)
    assert stage in executed(result)
    outputs_are_whole(project_copy)
    assert not list((project_copy / "build/tiny/.staging").iterdir())
    assert executed(doit(project_copy, *args)) == []
