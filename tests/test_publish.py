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


@pytest.fixture(scope="session", autouse=True)
def mlflow_started(tmp_path_factory):
    """`mlflow server` on loopback with a SQLite backend and a local artifact root, as a team would run it.
    Started first (autouse) and waited for only in mlflow_server, so that its ~20 s start overlaps the
    session's tiny build instead of following it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield {"uri": f"http://127.0.0.1:{port}", "root": root, "proc": proc}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_started):
    uri, root, proc = mlflow_started["uri"], mlflow_started["root"], mlflow_started["proc"]
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
    return {"uri": uri, "root": root}


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


# Fake credentials, as each registry's client reads them from the environment.
FAKE_TOKENS = {"HF_TOKEN": "hf_FAKE0123456789abcdef", "MLFLOW_TRACKING_TOKEN": "mlflow-FAKE-5f1d7c2b9e",
               "AZURE_CLIENT_SECRET": "azure~FAKE.5f1d7c2b9e", "MLFLOW_TRACKING_PASSWORD": "pw-FAKE-5f1d7c2b9e"}


def files_holding(folder: Path, secrets) -> list[str]:
    """Files under folder (doit's state, logs, manifests, bundles, provenance...) that hold any of secrets."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_fake_tokens_never_appear_in_logs_bundles_or_state(built_project, mlflow_server, tmp_path):
    """Every registry, with fake credentials in the environment: the loopback MLflow server ignores the token
    the client sends; the Hub and Azure AD endpoints are dead loopback ports, so those publishes fail, in one
    line each (Azure ML: or refuse for want of its SDK)."""
    secrets = list(FAKE_TOKENS.values())
    dead = f"http://127.0.0.1:{_free_port()}"
    env = {**FAKE_TOKENS, "MLFLOW_TRACKING_USERNAME": "me", "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
           "AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000002",
           "AZURE_AUTHORITY_HOST": dead.replace("http:", "https:"), "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-0",
           "AZURE_RESOURCE_GROUP": "rg", "AZUREML_WORKSPACE_NAME": "ws", "HF_ENDPOINT": dead}
    args = publish_args(mlflow_server, "secret-check")
    runs = [doit(built_project, env=env),
            doit(built_project, "publish", *args, env=env),
            doit(built_project, "versions", *args, env=env),
            doit(built_project, "fetch-package", "--to", str(tmp_path / "fetched"), *args, env=env)]
    failing = [doit(built_project, "publish", "publish.registry=hf", "publish.name=me/secret-check", check=False,
                    env={**env, "HF_HUB_OFFLINE": "0"}),
               doit(built_project, "publish", "publish.registry=azureml", check=False, env=env)]
    assert "version 1 (registered)" in runs[1].stdout
    for result in failing:
        assert result.returncode != 0 and len(error_lines(result)) == 1, result.stderr
    for result in runs + failing:
        assert not [s for s in secrets if s in result.stdout + result.stderr], result.stderr
    assert files_holding(built_project / "build", secrets) == []  # doit's state, logs, provenance, outputs
    assert files_holding(tmp_path / "fetched", secrets) == []     # the bundle as published
    assert files_holding(mlflow_server["root"], secrets) == []    # the registry's database and artifacts


def test_a_token_in_the_tracking_uri_is_refused_before_it_reaches_doit_state(project_copy):
    token = "FAKEaccess0123456789abcdef"
    for uri in (f"http://127.0.0.1:5000/?access_token={token}",
                f"https://acct.blob.core.windows.net/mlflow?sv=2022-11-02&sr=c&sig={token}"):
        for command in (["publish"], []):  # `doit publish`, and a plain build with the override
            result = doit(project_copy, *command, f"publish.mlflow.tracking_uri={uri}", check=False)
            assert result.returncode != 0
            assert len(error_lines(result)) == 1 and "holds a credential" in error_lines(result)[0]
            assert "MLFLOW_TRACKING_TOKEN" in error_lines(result)[0]
            assert token not in result.stdout + result.stderr
    # From the environment, the same: refused in one line, never echoed.
    result = doit(project_copy, "publish", check=False,
                  env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:5000/?token={token}"})
    assert result.returncode != 0 and len(error_lines(result)) == 1, result.stderr
    assert "MLFLOW_TRACKING_URI: the tracking URI holds a credential" in error_lines(result)[0]
    assert token not in result.stdout + result.stderr
    assert (project_copy / "build/tiny/.doit.sqlite3").is_file()
    assert files_holding(project_copy / "build", [token]) == []


def test_doit_state_keeps_no_publish_settings(project_copy):
    """doit stores the check task's config string as it is: [publish] is left out of it."""
    canary = "canary-experiment-7c2b"
    doit(project_copy, f"publish.mlflow.experiment={canary}", "publish.name=canary-model-7c2b")
    assert files_holding(project_copy / "build", [canary, "canary-model-7c2b"]) == []


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "foo://bar", "sqlite:///mlflow.db"])
@pytest.mark.parametrize("source", ["config", "environment"])
def test_an_unsupported_tracking_uri_is_one_line_naming_the_supported_schemes(built_project, uri, source):
    if source == "config":
        result = doit(built_project, "publish", f"publish.mlflow.tracking_uri={uri}", check=False)
    else:
        result = doit(built_project, "publish", check=False, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(error_lines(result)) == 1, result.stderr
    assert "http, https, databricks, azureml" in error_lines(result)[0]


@pytest.mark.parametrize("name, rule", [
    ("team/model", "Names cannot contain '/' or ':'"),
    ("..", "must not resolve to other names"),
    ("m" * 257, "holds at most 256"),
])
def test_a_name_the_registry_refuses_is_refused_before_any_upload(built_project, mlflow_server, name, rule):
    from mlflow import MlflowClient

    experiment = f"refused-{len(name)}"
    result = doit(built_project, "publish", *publish_args(mlflow_server, name), f"publish.mlflow.experiment={experiment}",
                  check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1 and rule in error_lines(result)[0], result.stderr
    assert "uploaded" not in result.stderr
    # Nothing reached the server: not even the experiment that would hold the publishing run.
    assert MlflowClient(mlflow_server["uri"]).get_experiment_by_name(experiment) is None


def test_a_failed_publish_leaves_no_finished_run(built_project, mlflow_server):
    """The server fails mid-publish, after the run started: its store for this experiment is a file, not a folder."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server["uri"])
    store = mlflow_server["root"] / "artifacts" / "broken-store"
    store.parent.mkdir(exist_ok=True)
    store.write_text("not a folder")
    experiment_id = client.create_experiment("broken-store", artifact_location="mlflow-artifacts:/broken-store")
    result = doit(built_project, "publish", *publish_args(mlflow_server, "half-uploaded"),
                  "publish.mlflow.experiment=broken-store", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1 and "uploading" in error_lines(result)[0], result.stderr
    assert [run.info.status for run in client.search_runs([experiment_id])] == ["FAILED"]
    assert client.search_model_versions("name = 'half-uploaded'") == []


def test_credentials_in_config_keys_are_refused(built_project):
    with pytest.raises(PipelineError, match="looks like a credential"):
        load_config(built_project / "pipeline.toml", ["publish.mlflow.token=abc"])
    with pytest.raises(PipelineError, match="the tracking URI holds a credential"):
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
    (["publish.registry=hf", "publish.name=me/ft--travel"], "Cannot have -- or .."),
    (["publish.registry=hf", f"publish.name=me/{'m' * 97}"], "maximum length is 96"),
    (["publish.registry=azureml", "publish.name=a/b"], "not a valid Azure ML model name"),
    (["publish.registry=azureml", "publish.name=ft.travel"], "not a valid Azure ML model name"),
    (["publish.registry=azureml", f"publish.name={'m' * 256}"], "at most 255 characters"),
])
def test_registry_names_are_checked_with_the_config(overrides, message):
    with pytest.raises(PipelineError, match=message):
        load_config(REPO / "pipeline.toml", overrides)
