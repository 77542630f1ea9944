"""Supply chain: what the build agrees to download and run (offline, against a local cache in the
Hub's layout), and hash-pinned installs."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_hub import REVISION, make_hub_cache, run_base

pytestmark = pytest.mark.slow


def hub_model(project: Path, tmp_path: Path, edit=None) -> Path:
    """The tiny base, optionally edited, served from a local HF cache; returns HF_HOME."""
    model = tmp_path / "model"
    shutil.copytree(project / "build/tiny/base", model)
    (model / "MANIFEST.json").unlink()
    if edit:
        edit(model)
    make_hub_cache(model, tmp_path / "hf")
    return tmp_path / "hf"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_floating_revision_is_refused_unless_allowed_and_then_pinned_in_the_manifest(project_copy, tmp_path):
    hf = hub_model(project_copy, tmp_path)
    line = one_error_line(run_base(project_copy, hf, "main"))
    assert "'main' is not a 40-hex commit" in line and "model.allow_floating_revision" in line
    result = run_base(project_copy, hf, "main", "model.allow_floating_revision=true")
    assert result.returncode == 0, result.stderr
    facts = json.loads((project_copy / "build/hub/base/MANIFEST.json").read_text())["facts"]
    assert facts["revision"] == "main" and facts["commit"] == REVISION
    assert "resolved to commit" in result.stderr


def needs_own_code(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mystery-lm", auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_mystery.py").write_text("raise SystemExit('remote code ran')\n")


def test_a_model_that_needs_its_own_code_is_refused_unless_trusted(project_copy, tmp_path):
    hf = hub_model(project_copy, tmp_path, needs_own_code)
    line = one_error_line(run_base(project_copy, hf))
    assert "needs its own Python code" in line and "model.trust_remote_code = true" in line
    assert not (project_copy / "build/hub/base").exists()
    result = run_base(project_copy, hf, REVISION, "model.trust_remote_code=true")
    assert result.returncode == 0, result.stderr
    assert (project_copy / "build/hub/base/modeling_mystery.py").is_file()  # fetched only once allowed
    assert json.loads((project_copy / "build/hub/base/MANIFEST.json").read_text())["facts"]["remote_code"] == "allowed"


def test_remote_code_of_a_model_transformers_implements_is_neither_fetched_nor_run(project_copy, tmp_path):
    def phi3_with_auto_map(model):  # what Phi-3.5-mini-instruct's own repo looks like
        config = json.loads((model / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}
        (model / "config.json").write_text(json.dumps(config))
        (model / "modeling_phi3.py").write_text("raise SystemExit('remote code ran')\n")

    result = run_base(project_copy, hub_model(project_copy, tmp_path, phi3_with_auto_map))
    assert result.returncode == 0, result.stderr
    base = project_copy / "build/hub/base"
    assert not list(base.glob("*.py"))
    assert json.loads((base / "MANIFEST.json").read_text())["facts"]["remote_code"].startswith("ignored")


def test_pickled_weights_are_never_fetched_and_a_model_with_only_those_is_refused(project_copy, tmp_path):
    def pickled_only(model):
        (model / "model.safetensors").rename(model / "pytorch_model.bin")

    line = one_error_line(run_base(project_copy, hub_model(project_copy, tmp_path, pickled_only)))
    assert "no safetensors weights; pickled weights are refused" in line


def test_every_locked_requirement_is_hash_pinned_and_install_commands_require_hashes():
    for lock in ("cpu", "cuda"):
        text = (REPO / f"requirements/{lock}.lock.txt").read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1] if text.startswith("#") else text)
        pinned = [e for e in entries if re.match(r"^[A-Za-z0-9][\w.\-\[\]]*==", e)]
        assert len(pinned) > 50, lock
        for entry in pinned:
            assert "--hash=sha256:" in entry, f"{lock}: {entry.splitlines()[0]} has no hash"
    for path in ("README.md", ".ci/run", "docker/Dockerfile"):
        for line in (REPO / path).read_text().splitlines():
            if re.search(r"pip install .*-r requirements/\w+\.lock\.txt", line) or re.search(r"pip install .*lock\.txt", line):
                assert "--require-hashes" in line, f"{path}: {line.strip()}"


def test_pip_refuses_a_package_whose_hash_differs_from_the_lock(tmp_path):
    """What --require-hashes buys: a tampered (or different) file is refused before anything installs."""
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK not really a wheel")
    req = tmp_path / "req.txt"
    req.write_text(f"demo @ {wheel.as_uri()} --hash=sha256:{'0' * 64}\n")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "--dry-run",
                             "--no-index", "-r", str(req)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "DO NOT MATCH THE HASHES" in result.stderr, result.stderr[-1500:]
