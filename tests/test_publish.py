"""Publishing: the MLflow round trip against a real local tracking server (SQLite backend, local
artifact root, loopback), idempotence, refusals, and what Azure ML and the Hub can be tested for
without a network (their entities and plans, their refusals)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.bundle import verify_bundle
from tasks.config import PublishSection, load_config
from tasks.errors import PipelineError
from tasks.manifest import sha256_file
from tests.conftest import REPO, doit, make_project

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with a SQLite backend and a local artifact root, as a team would run it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"uri": uri, "root": root}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def publish_args(server: dict, name: str) -> list[str]:
    return [f"publish.mlflow.tracking_uri={server['uri']}", f"publish.name={name}"]


def versions(project: Path, server: dict, name: str) -> list[list[str]]:
    out = doit(project, "versions", *publish_args(server, name)).stdout
    return [line.split("\t") for line in out.splitlines() if "\t" in line]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_publish_then_fetch_returns_the_exact_package_with_its_manifest_chain(built_project, mlflow_server, tmp_path):
    args = publish_args(mlflow_server, "roundtrip")
    result = doit(built_project, "publish", *args)
    assert "version 1 (registered)" in result.stdout

    package = built_project / "build/tiny/package"
    digest = sha256_file(package / "MANIFEST.json")
    assert [v[:2] for v in versions(built_project, mlflow_server, "roundtrip")] == [["1", digest]]

    dest = tmp_path / "fetched"
    doit(built_project, "fetch-package", "--version", "1", "--to", str(dest), *args)
    for path in package.rglob("*"):
        if path.is_file():
            assert sha256_file(dest / path.relative_to(package)) == sha256_file(path), path
    for stage in ("base", "quantize", "finetune", "export"):
        assert (dest / "provenance" / f"{stage}.MANIFEST.json").read_bytes() == \
            (built_project / "build/tiny" / stage / "MANIFEST.json").read_bytes()
    record = json.loads((dest / "provenance/PUBLISH.json").read_text())
    assert record["package_sha256"] == digest
    assert record["lock"] == {"file": "requirements/cpu.lock.txt", "sha256": sha256_file(REPO / "requirements/cpu.lock.txt")}

    # The downloaded folder is a working package, not just matching bytes.
    chat = subprocess.run([sys.executable, "-m", "tasks", "chat", "--package", str(dest), "--prompt", "Best time to visit Lisbon?",
                           "--max-new-tokens", "8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


def test_publishing_the_same_build_twice_registers_nothing_new(built_project, mlflow_server):
    args = publish_args(mlflow_server, "twice")
    assert "(registered)" in doit(built_project, "publish", *args).stdout
    again = doit(built_project, "publish", *args)
    assert "version 1 (already registered, nothing new)" in again.stdout
    assert [v[0] for v in versions(built_project, mlflow_server, "twice")] == ["1"]


def test_publish_is_never_part_of_the_default_build(built_project):
    result = doit(built_project)
    assert "publish" not in result.stdout


def test_a_package_modified_after_the_build_is_refused_and_nothing_is_registered(project_copy, mlflow_server):
    data = project_copy / "build/tiny/package/cpu/model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    result = doit(project_copy, "publish", *publish_args(mlflow_server, "tampered"), check=False)
    assert result.returncode != 0
    assert error_lines(result) == [error_lines(result)[0]] and "changed cpu/model.onnx.data" in error_lines(result)[0]
    assert versions(project_copy, mlflow_server, "tampered") == []


def test_an_incomplete_build_is_refused(tmp_path, mlflow_server):
    project = make_project(tmp_path / "fresh")
    result = doit(project, "publish", *publish_args(mlflow_server, "incomplete"), check=False)
    assert result.returncode != 0 and "not built; run `doit` first" in result.stderr


def test_a_config_changed_since_the_build_is_refused_naming_the_key(built_project, mlflow_server):
    result = doit(built_project, "publish", "finetune.rank=16", *publish_args(mlflow_server, "stale"), check=False)
    assert result.returncode != 0
    assert "finetune" in error_lines(result)[0] and '"rank": 16' in error_lines(result)[0]


def test_a_tampered_registry_copy_is_refused_on_fetch_and_nothing_is_left(built_project, mlflow_server, tmp_path):
    args = publish_args(mlflow_server, "tamper-store")
    doit(built_project, "publish", *args)
    run_id = versions(built_project, mlflow_server, "tamper-store")[0][2].split("run ")[-1]
    # The server's own copy of this version (its artifact root is a plain folder), damaged in place.
    [stored] = (mlflow_server["root"] / "artifacts").glob(f"*/{run_id}/artifacts/package/cpu/travel.onnx_adapter")
    blob = bytearray(stored.read_bytes())
    blob[-1] ^= 0xFF
    stored.write_bytes(bytes(blob))
    dest = tmp_path / "fetched"
    result = doit(built_project, "fetch-package", "--to", str(dest), *args, check=False)
    assert result.returncode != 0 and "failed verification, nothing kept" in result.stderr
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fetched")]


def test_fetch_never_writes_into_an_existing_folder(built_project, mlflow_server, tmp_path):
    args = publish_args(mlflow_server, "existing")
    doit(built_project, "publish", *args)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    result = doit(built_project, "fetch-package", "--to", str(dest), *args, check=False)
    assert result.returncode != 0 and "already exists and is not empty" in result.stderr
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


def test_credentials_come_from_the_environment_and_are_written_nowhere(built_project, mlflow_server, tmp_path):
    canary = "canary-token-5f1d7c2b"
    env_before = os.environ.get("MLFLOW_TRACKING_TOKEN")
    os.environ["MLFLOW_TRACKING_TOKEN"] = canary  # the loopback server ignores it; the client sends it
    try:
        args = publish_args(mlflow_server, "secret-check")
        doit(built_project, "publish", *args)
        doit(built_project, "fetch-package", "--to", str(tmp_path / "fetched"), *args)
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_TOKEN")
        else:
            os.environ["MLFLOW_TRACKING_TOKEN"] = env_before
    for folder in (built_project / "build", mlflow_server["root"], tmp_path):
        for path in folder.rglob("*"):
            if path.is_file():
                assert canary.encode() not in path.read_bytes(), path
    with pytest.raises(PipelineError, match="looks like a credential"):
        load_config(built_project / "pipeline.toml", ["publish.mlflow.token=abc"])
    with pytest.raises(PipelineError, match="credentials in the tracking URI"):
        load_config(built_project / "pipeline.toml", ["publish.mlflow.tracking_uri=https://me:pw@example.org"])


def test_an_unreachable_registry_fails_in_one_line(built_project):
    result = doit(built_project, "publish", f"publish.mlflow.tracking_uri=http://127.0.0.1:{_free_port()}",
                  "publish.name=nowhere", check=False)
    assert result.returncode != 0
    assert len(error_lines(result)) == 1 and "MLflow at http://127.0.0.1:" in error_lines(result)[0]
    assert "Traceback" not in result.stderr


def test_no_tracking_server_named_is_refused(built_project):
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        result = doit(built_project, "publish", check=False)
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    assert result.returncode != 0 and "set publish.mlflow.tracking_uri" in result.stderr


# --- Azure ML and the Hub: no network here, so their entities, plans and refusals -----------------


@pytest.fixture
def bundle(built_project, tmp_path) -> tuple[Path, dict]:
    from tasks.bundle import make_bundle
    from tasks.paths import Paths

    cfg = load_config(built_project / "pipeline.toml")
    dest = tmp_path / "bundle"
    dest.mkdir()
    return dest, make_bundle(Paths.of(built_project, cfg), cfg, dest)


def test_a_bundle_verifies_itself_and_names_a_broken_manifest_chain(bundle):
    folder, record = bundle
    assert verify_bundle(folder, record["package_sha256"]) == record
    (folder / "provenance/finetune.MANIFEST.json").write_text("{}\n")
    with pytest.raises(PipelineError, match="finetune.MANIFEST.json is not the manifest"):
        verify_bundle(folder)


def test_azure_ml_model_is_the_lab_s_az_ml_model_create_with_provenance_tags(bundle):
    pytest.importorskip("azure.ai.ml", reason="Azure ML extra not installed (requirements/azure.lock.txt)")
    from tasks.registries import azure_model

    folder, record = bundle
    model = azure_model(folder, "ft-for-travel", record)
    assert (model.name, model.type, model.path) == ("ft-for-travel", "custom_model", str(folder))
    assert model.version is None  # Azure ML assigns the next version, as `az ml model create` does
    assert model.tags["package_sha256"] == record["package_sha256"]
    assert model.tags["lock_sha256"] == record["lock"]["sha256"]


def test_azure_ml_without_a_workspace_is_refused_naming_the_variables(monkeypatch):
    from tasks.registries import open_registry

    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "00000000-0000-0000-0000-000000000000")
    with pytest.raises(PipelineError, match="AZURE_RESOURCE_GROUP.*AZUREML_WORKSPACE_NAME"):
        open_registry(PublishSection(registry="azureml"))


def test_hub_publish_is_one_tagged_commit_of_the_whole_bundle(bundle):
    from tasks.registries import hub_upload_plan

    folder, record = bundle
    plan = hub_upload_plan(PublishSection(registry="hf", name="me/ft-for-travel"), folder, record)
    assert plan["create_repo"]["private"] is True
    assert plan["upload_folder"]["folder_path"] == str(folder) and plan["upload_folder"]["revision"] == "main"
    assert plan["create_tag"]["tag"] == "pkg-" + record["package_sha256"][:16]


def test_hub_publish_without_a_token_is_refused(monkeypatch, tmp_path):
    from tasks.registries import open_registry

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no stored login
    with pytest.raises(PipelineError, match="set HF_TOKEN"):
        open_registry(PublishSection(registry="hf", name="me/ft-for-travel"))


@pytest.mark.parametrize("overrides, message", [
    (["publish.registry=hf", "publish.name=no-owner"], "not a Hub repository id; write owner/name"),
    (["publish.name=\"it's\""], "holds quotes"),
    (["publish.registry=azureml", "publish.name=a/b"], "not a valid Azure ML model name"),
])
def test_registry_names_are_checked_with_the_config(overrides, message):
    with pytest.raises(PipelineError, match=message):
        load_config(REPO / "pipeline.toml", overrides)
