"""The Hub path of the base stage, offline, against a local cache in the Hub's own layout holding
the project's tiny model (nothing can be downloaded here)."""

import os
import subprocess
import sys

import pytest

import conftest
from tasks.manifest import file_table

pytestmark = pytest.mark.slow
REPO_ID = "local-org/tiny-phi3"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(model_dir, hf_home):
    return conftest.make_hub_cache(model_dir, hf_home, REPO_ID, REVISION)


def run_base(project, hf_home, revision=REVISION, *settings, env=None):
    """The base stage of a Hub-profile build from the local cache, offline; extra settings as KEY=VALUE,
    ``env`` added to the environment (which otherwise holds no HF_TOKEN)."""
    env = {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", **(env or {})}
    overrides = ["model.profile=hub", f"model.repo_id={REPO_ID}", f"model.revision={revision}", "build.dir=build/hub",
                 *settings]
    return subprocess.run(
        [sys.executable, "-m", "tasks", "stage", "base", *(a for o in overrides for a in ("--set", o))],
        cwd=project, capture_output=True, text=True, env=env, timeout=300)


def test_hub_profile_fetches_the_pinned_commit_from_the_local_cache_offline(project_copy, tmp_path):
    tiny_base = project_copy / "build/tiny/base"
    make_hub_cache(tiny_base, tmp_path / "hf")
    result = run_base(project_copy, tmp_path / "hf", REVISION)
    assert result.returncode == 0, result.stderr
    fetched = project_copy / "build/hub/base"
    assert file_table(fetched) == file_table(tiny_base)
    manifest = (fetched / "MANIFEST.json").read_text()
    assert REVISION in manifest and REPO_ID in manifest


def test_hub_commit_missing_from_the_cache_offline_is_one_clear_line(project_copy, tmp_path):
    make_hub_cache(project_copy / "build/tiny/base", tmp_path / "hf")
    result = run_base(project_copy, tmp_path / "hf", "f" * 40)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not in the local HF cache" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (project_copy / "build/hub/base").exists()


def test_a_hub_token_never_reaches_the_build_its_logs_or_its_output(project_copy, tmp_path):
    token = "hf_FAKE0123456789abcdef"
    make_hub_cache(project_copy / "build/tiny/base", tmp_path / "hf")
    result = run_base(project_copy, tmp_path / "hf", REVISION, env={"HF_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr
    built = project_copy / "build/hub"
    assert (built / "logs/base.log").is_file() and (built / "base/MANIFEST.json").is_file()
    assert [p for p in built.rglob("*") if p.is_file() and token.encode() in p.read_bytes()] == []
