"""Model registries a bundle can be published to: MLflow (also Azure ML through its MLflow URI),
Azure ML (azure-ai-ml SDK, as the lab's `az ml model create`) and the Hugging Face Hub.

Every registry stores the package digest with each version (tag ``package_sha256``), which makes
publishing idempotent and lets a download be checked against what was registered. Credentials are
read by each client library from the environment (or its own login cache); nothing here accepts,
logs or writes them (every error line and log line goes through tasks.secrets.redact as well):

    mlflow   MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/_PASSWORD
    azureml  AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME, and whatever
             DefaultAzureCredential finds (AZURE_CLIENT_ID/_SECRET/AZURE_TENANT_ID, `az login`, managed identity)
    hf       HF_TOKEN (or `hf auth login`), HF_ENDPOINT for a private Hub
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from tasks.config import PublishSection, tracking_uri_problem
from tasks.errors import PipelineError
from tasks.secrets import redact

log = logging.getLogger("tasks.publish")
DIGEST_TAG = "package_sha256"


@dataclass(frozen=True)
class Version:
    version: str
    package_sha256: str | None
    detail: str = ""


class Registry(Protocol):
    where: str

    def find(self, package_sha256: str) -> str | None:
        """The version already registered for this package digest, if any."""

    def register(self, bundle: Path, record: dict) -> str:
        """Upload the bundle as a new version; returns the version."""

    def versions(self) -> list[Version]: ...

    def download(self, version: str, dest: Path) -> tuple[str, str | None]:
        """Download a version ("latest" allowed) into the empty folder dest; (version, its registered digest)."""


def version_tags(record: dict) -> dict[str, str]:
    """Searchable facts of a version: strings only (every registry's tags are)."""
    model = record.get("model", {})
    tags = {
        DIGEST_TAG: record["package_sha256"],
        "adapter": record.get("adapter", ""),
        "targets": ",".join(record.get("targets", [])),
        "base_model": model.get("repo_id") or model.get("profile", ""),
        "lock_sha256": (record.get("lock") or {}).get("sha256") or "",
        "image_id": record.get("image_id") or "",
    }
    if model.get("commit"):
        tags["base_model_commit"] = model["commit"]
    return tags


def description(record: dict) -> str:
    return (f"ONNX Runtime GenAI package: int4 AWQ base + LoRA adapter '{record.get('adapter')}' "
            f"({', '.join(record.get('targets', []))}); package sha256 {record['package_sha256']}. "
            "Built by ondevice-llm-build; provenance/ holds every stage's manifest.")


def bundle_files(bundle: Path) -> Iterator[tuple[Path, str]]:
    """(file, posix path relative to the bundle), in a stable order, for uploads with progress."""
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        yield path, path.relative_to(bundle).as_posix()


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _one_line(exc: BaseException) -> str:
    text = redact(str(exc)).strip().splitlines()  # redacted before it is cut: a cut token would go unrecognised
    return text[0][:300] if text else type(exc).__name__


def reported(prefix: str, what: str, errors: tuple[type[BaseException], ...], fn, *args, **kwargs):
    """fn(*args, **kwargs), with a client library's own failures turned into one PipelineError line."""
    try:
        return fn(*args, **kwargs)
    except errors as exc:
        raise PipelineError(f"{prefix}: {what} failed: {_one_line(exc)}") from None


# --- MLflow ------------------------------------------------------------------------------------


def check_mlflow_names(name: str, experiment: str) -> None:
    """Refuse, before anything is uploaded, a model or experiment name the MLflow server would refuse
    only once the upload is done: MLflow's own validators, and its SQL schema's length of a model name."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModel
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    longest = SqlRegisteredModel.__table__.c.name.type.length
    if len(name) > longest:
        raise PipelineError(f"publish.name is {len(name)} characters; an MLflow registered model name holds at most "
                            f"{longest}: choose a shorter one")
    for key, check, value in (("publish.name", _validate_model_name, name),
                              ("publish.mlflow.experiment", _validate_experiment_name, experiment)):
        try:
            check(value)
        except MlflowException as exc:
            raise PipelineError(f"{key} {value!r} is refused by MLflow ({_one_line(exc)}); choose another "
                                "(letters, digits, '-', '_', '.')") from None


class MlflowModelRegistry:
    """MLflow Model Registry: one run per new version (the bundle is its artifact ``package/``), and a
    model version whose source is that artifact folder."""

    def __init__(self, section: PublishSection):
        uri = section.mlflow.tracking_uri or _env("MLFLOW_TRACKING_URI")
        if not uri:
            raise PipelineError("no MLflow tracking server named: set publish.mlflow.tracking_uri in the config or "
                                "MLFLOW_TRACKING_URI in the environment")
        problem = tracking_uri_problem(uri)
        if problem:
            source = "publish.mlflow.tracking_uri" if section.mlflow.tracking_uri else "MLFLOW_TRACKING_URI"
            raise PipelineError(f"{source}: the tracking URI {problem}")
        # MLflow's own default retries a dead server for minutes; a publish should fail in seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.name = section.name
        self.experiment = section.mlflow.experiment
        check_mlflow_names(self.name, self.experiment)
        self.uri = uri
        self.shown = redact(uri)  # what error and log lines name
        self.where = f"MLflow registry at {self.shown}, model {self.name!r}"
        try:  # no network yet: MLflow only picks the store for the URI's scheme (a plugin's may be missing)
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        except MlflowException as exc:
            raise PipelineError(f"MLflow cannot use the tracking URI {self.shown}: {_one_line(exc)}") from None

    def _call(self, what: str, fn, *args, **kwargs):
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        return reported(f"MLflow at {self.shown}", what, (MlflowException, RequestException, OSError), fn, *args, **kwargs)

    def _search(self, extra: str = "") -> list:
        query = f"name = '{self.name}'" + (f" and {extra}" if extra else "")
        return self._call("searching model versions", self.client.search_model_versions, query)

    def find(self, package_sha256: str) -> str | None:
        found = self._search(f"tags.{DIGEST_TAG} = '{package_sha256}'")
        ready = sorted((v for v in found if v.status == "READY"), key=lambda v: int(v.version))
        return ready[0].version if ready else None

    def register(self, bundle: Path, record: dict) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = self._call("reading the experiment", client.get_experiment_by_name, self.experiment)
        experiment_id = (experiment.experiment_id if experiment else
                         self._call("creating the experiment", client.create_experiment, self.experiment))
        tags = version_tags(record)
        run = self._call("starting a run", client.create_run, experiment_id,
                         tags={"mlflow.runName": f"publish {record['package_sha256'][:12]}", **tags})
        run_id = run.info.run_id
        # The run ends FINISHED only once its model version exists: a failed or interrupted upload or
        # registration leaves a FAILED run and no version (find() and fetch see READY versions only).
        try:
            files = list(bundle_files(bundle))
            total = sum(p.stat().st_size for p, _ in files)
            sent = 0
            for index, (path, rel) in enumerate(files, 1):
                parent = os.path.dirname(rel)
                self._call(f"uploading {rel}", client.log_artifact, run_id, str(path),
                           "package" + (f"/{parent}" if parent else ""))
                sent += path.stat().st_size
                log.info("  uploaded %d/%d %s (%.1f of %.1f MB)", index, len(files), rel, sent / 1e6, total / 1e6)
            try:
                client.create_registered_model(self.name, description="On-device LLM packages (ONNX Runtime GenAI)")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise PipelineError(f"MLflow at {self.shown}: creating model {self.name!r} failed: "
                                        f"{_one_line(exc)}") from None
            created = self._call("creating the model version", client.create_model_version, self.name,
                                 f"{run.info.artifact_uri}/package", run_id=run_id, tags=tags,
                                 description=description(record))
            self._call("marking the run finished", client.set_terminated, run_id, "FINISHED")
        except BaseException:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:  # noqa: BLE001 (the first error is the one to report)
                pass
            raise
        return created.version

    def versions(self) -> list[Version]:
        found = sorted(self._search(), key=lambda v: int(v.version))
        return [Version(v.version, v.tags.get(DIGEST_TAG), f"{v.status}, run {v.run_id}") for v in found]

    def _resolve(self, version: str):
        if version == "latest":
            found = [v for v in self._search() if v.status == "READY"]
            if not found:
                raise PipelineError(f"no versions of {self.name!r} are registered at {self.shown}; run `doit publish` first")
            return max(found, key=lambda v: int(v.version))
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, version)
        except MlflowException:
            raise PipelineError(f"{self.name!r} has no version {version} at {self.shown}; `doit versions` lists them") from None

    def download(self, version: str, dest: Path) -> tuple[str, str | None]:
        import mlflow.artifacts

        found = self._resolve(version)
        uri = self._call("resolving the download location", self.client.get_model_version_download_uri,
                         self.name, found.version)
        log.info("downloading %s version %s from %s", self.name, found.version, uri)
        self._call("downloading", mlflow.artifacts.download_artifacts, artifact_uri=uri, dst_path=str(dest),
                   tracking_uri=self.uri)
        return found.version, found.tags.get(DIGEST_TAG)


# --- Azure ML ----------------------------------------------------------------------------------

AZURE_INSTALL = ".venv/bin/pip install --require-hashes -r requirements/azure.lock.txt"


def azure_workspace(section: PublishSection) -> tuple[str, str, str]:
    values = (section.azureml.subscription_id or _env("AZURE_SUBSCRIPTION_ID"),
              section.azureml.resource_group or _env("AZURE_RESOURCE_GROUP"),
              section.azureml.workspace or _env("AZUREML_WORKSPACE_NAME"))
    names = ("subscription_id (AZURE_SUBSCRIPTION_ID)", "resource_group (AZURE_RESOURCE_GROUP)",
             "workspace (AZUREML_WORKSPACE_NAME)")
    missing = [n for n, v in zip(names, values) if not v]
    if missing:
        raise PipelineError(f"Azure ML needs a workspace: set publish.azureml.{', '.join(missing)}")
    return values


def azure_model(bundle: Path, name: str, record: dict):
    """The azure-ai-ml Model entity for a bundle: what `az ml model create --name N --path DIR --type
    custom_model` registers (the next version number, since none is given)."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    return Model(path=str(bundle), name=name, type=AssetTypes.CUSTOM_MODEL, description=description(record),
                 tags=version_tags(record), properties={"format": str(record.get("format", ""))})


class AzureMLModelRegistry:
    def __init__(self, section: PublishSection):
        subscription, group, workspace = azure_workspace(section)
        try:
            from azure.ai.ml import MLClient
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise PipelineError(f"publish.registry = 'azureml' needs the Azure ML SDK: {AZURE_INSTALL}") from None
        self.name = section.name
        self.where = f"Azure ML workspace {workspace} ({group}), model {self.name!r}"
        # Neither call below touches the network; credentials are looked up at the first request.
        self.client = MLClient(DefaultAzureCredential(), subscription, group, workspace)

    def _call(self, what: str, fn, *args, **kwargs):
        from azure.core.exceptions import AzureError
        from azure.identity import CredentialUnavailableError

        return reported(self.where, what, (AzureError, CredentialUnavailableError, OSError), fn, *args, **kwargs)

    def _all(self) -> list:
        from azure.core.exceptions import ResourceNotFoundError

        def listed() -> list:  # the SDK's list is lazy: its requests (and their errors) come while iterating
            try:
                return list(self.client.models.list(name=self.name))
            except ResourceNotFoundError:
                return []

        return self._call("listing versions", listed)

    def find(self, package_sha256: str) -> str | None:
        found = [m.version for m in self._all() if (m.tags or {}).get(DIGEST_TAG) == package_sha256]
        return min(found, key=int) if found else None

    def register(self, bundle: Path, record: dict) -> str:
        log.info("uploading %s to %s", bundle, self.where)
        return self._call("registering", self.client.models.create_or_update, azure_model(bundle, self.name, record)).version

    def versions(self) -> list[Version]:
        return sorted((Version(m.version, (m.tags or {}).get(DIGEST_TAG)) for m in self._all()), key=lambda v: int(v.version))

    def download(self, version: str, dest: Path) -> tuple[str, str | None]:
        if version == "latest":
            found = self.versions()
            if not found:
                raise PipelineError(f"no versions at {self.where}; run `doit publish` first")
            version = found[-1].version
        model = self._call("reading the version", self.client.models.get, self.name, version)
        self._call("downloading", self.client.models.download, self.name, version, download_path=str(dest))
        return version, (model.tags or {}).get(DIGEST_TAG)


# --- Hugging Face Hub -------------------------------------------------------------------------


def hub_tag(package_sha256: str) -> str:
    """The git tag that marks a published package in the model repository (its version name)."""
    return f"pkg-{package_sha256[:16]}"


def hub_upload_plan(section: PublishSection, bundle: Path, record: dict) -> dict:
    """Arguments of the Hub calls for one publish: a commit on the branch holding the whole bundle,
    tagged with the package digest."""
    return {
        "create_repo": {"repo_id": section.name, "repo_type": "model", "private": section.hf.private, "exist_ok": True},
        "upload_folder": {"repo_id": section.name, "repo_type": "model", "folder_path": str(bundle),
                          "revision": section.hf.branch,
                          "commit_message": f"Package {record['package_sha256'][:12]} (adapter {record.get('adapter')})",
                          "commit_description": description(record),
                          # A version replaces the previous one's files: nothing stale may linger.
                          "delete_patterns": ["*"]},
        "create_tag": {"repo_id": section.name, "repo_type": "model", "tag": hub_tag(record["package_sha256"]),
                       "tag_message": description(record)},
    }


class HfHubRegistry:
    def __init__(self, section: PublishSection):
        from huggingface_hub import HfApi
        from huggingface_hub.utils import get_token

        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise PipelineError("HF_HUB_OFFLINE is set: the Hub cannot be reached; unset it to publish or fetch")
        if not get_token():
            raise PipelineError("no Hugging Face token: set HF_TOKEN in the environment (or run `hf auth login`)")
        self.section = section
        self.name = section.name
        self.where = f"Hugging Face Hub repository {self.name}"
        self.api = HfApi()

    def _call(self, what: str, fn, *args, **kwargs):
        import importlib

        from huggingface_hub.errors import HfHubHTTPError

        errors: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError]
        # The HTTP client's own errors (a refused connection, a timeout): httpx2 in this lock, httpx or
        # requests in other huggingface_hub releases.
        for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests.exceptions", "RequestException")):
            try:
                errors.append(getattr(importlib.import_module(module), name))
            except ImportError:
                continue
        return reported(self.where, what, tuple(errors), fn, *args, **kwargs)

    def _tags(self) -> list[str]:
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            refs = self.api.list_repo_refs(self.name, repo_type="model")
        except RepositoryNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001 (network and HTTP errors alike)
            raise PipelineError(f"{self.where}: listing tags failed: {_one_line(exc)}") from None
        return [t.name for t in refs.tags if t.name.startswith("pkg-")]

    def find(self, package_sha256: str) -> str | None:
        tag = hub_tag(package_sha256)
        return tag if tag in self._tags() else None

    def register(self, bundle: Path, record: dict) -> str:
        plan = hub_upload_plan(self.section, bundle, record)
        self._call("creating the repository", self.api.create_repo, **plan["create_repo"])
        log.info("uploading %s to %s (branch %s)", bundle, self.where, self.section.hf.branch)
        commit = self._call("uploading", self.api.upload_folder, **plan["upload_folder"])
        self._call("tagging", self.api.create_tag, revision=commit.oid, **plan["create_tag"])
        return plan["create_tag"]["tag"]

    def versions(self) -> list[Version]:
        return [Version(tag, None, "tag") for tag in sorted(self._tags())]

    def download(self, version: str, dest: Path) -> tuple[str, str | None]:
        from huggingface_hub import snapshot_download

        if version == "latest":
            version = self.section.hf.branch
        self._call("downloading", snapshot_download, self.name, repo_type="model", revision=version,
                   local_dir=str(dest))
        # Not part of the bundle: the Hub's own attributes file and the local_dir download metadata.
        (dest / ".gitattributes").unlink(missing_ok=True)
        shutil.rmtree(dest / ".cache", ignore_errors=True)
        # The Hub has no per-version metadata; the tag itself carries the digest's first 16 hex digits.
        return version, version.removeprefix("pkg-") if version.startswith("pkg-") else None


def open_registry(section: PublishSection) -> Registry:
    kinds = {"mlflow": MlflowModelRegistry, "azureml": AzureMLModelRegistry, "hf": HfHubRegistry}
    return kinds[section.registry](section)
