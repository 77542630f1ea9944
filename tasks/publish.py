"""Publish a finished build to a model registry, list its versions, fetch one back verified.

    python -m tasks publish        [--config F] [--set publish.registry=mlflow ...]   (doit publish)
    python -m tasks versions       list the registered versions of publish.name          (doit versions)
    python -m tasks fetch-package  --version N|latest --to DIR                          (doit fetch-package)

Publishing checks the build first (tasks/bundle.py: complete, up to date with the config and inputs,
every file as its manifest says) and registers nothing when the same package digest is already
registered. A fetch downloads into a staging folder beside DIR, verifies the bundle bit for bit, and
only then renames it to DIR: a failed or tampered download leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tasks.bundle import PUBLISH_RECORD, make_bundle, verify_bundle
from tasks.config import PipelineConfig, PublishSection
from tasks.errors import PipelineError
from tasks.paths import Paths
from tasks.registries import Registry, Version, open_registry
from tasks.secrets import RedactingFormatter, redact
from tasks.paths import STAGING_FOLDER

log = logging.getLogger("tasks.publish")


@dataclass(frozen=True)
class Published:
    version: str
    package_sha256: str
    created: bool
    where: str


def publish(paths: Paths, cfg: PipelineConfig, registry: Registry | None = None) -> Published:
    """Register the build in ``paths`` as a new version of ``cfg.publish.name`` (or name the existing one)."""
    # Opening a registry checks its URI and names against the registry's own rules without any network
    # call: a name it would refuse is refused before the package is even hashed, let alone uploaded.
    registry = registry or open_registry(cfg.publish)
    staging = paths.build / STAGING_FOLDER / f"publish.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        bundle = staging / "bundle"
        bundle.mkdir()
        record = make_bundle(paths, cfg, bundle)
        digest = record["package_sha256"]
        existing = registry.find(digest)
        if existing is not None:
            log.info("package %s is already registered as version %s (%s); nothing uploaded",
                     digest[:12], existing, registry.where)
            return Published(existing, digest, False, registry.where)
        log.info("publishing package %s to %s", digest[:12], registry.where)
        version = registry.register(bundle, record)
        log.info("registered version %s of %s (package %s)", version, cfg.publish.name, digest[:12])
        return Published(version, digest, True, registry.where)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def list_versions(section: PublishSection, registry: Registry | None = None) -> list[Version]:
    return (registry or open_registry(section)).versions()


def _bundle_root(folder: Path) -> Path:
    """Registries nest downloads differently (MLflow: package/, Azure ML: <name>/<folder>/)."""
    found = [p.parents[1] for p in folder.rglob(PUBLISH_RECORD.split("/")[-1]) if p.parent.name == "provenance"]
    if len(found) != 1:
        raise PipelineError(f"the download holds {len(found)} package bundles, expected 1 ({PUBLISH_RECORD} not found "
                            "once); was this version published by `doit publish`?")
    return found[0]


def fetch(section: PublishSection, version: str, dest: Path, registry: Registry | None = None) -> dict:
    """Download ``version`` into the new folder ``dest``, verified bit for bit; returns its PUBLISH.json."""
    dest = dest.resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PipelineError(f"{dest} already exists and is not empty; choose another --to or remove it")
    registry = registry or open_registry(section)
    staging = dest.parent / f".{dest.name}.fetch.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        resolved, registered_digest = registry.download(version, staging)
        root = _bundle_root(staging)
        try:
            record = verify_bundle(root, registered_digest)
        except PipelineError as exc:
            raise PipelineError(f"version {resolved} of {section.name} failed verification, nothing kept: {exc}") from None
        if dest.exists():
            dest.rmdir()
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(root, dest)
        log.info("fetched version %s of %s (package %s) into %s; every file matches its manifest",
                 resolved, section.name, record["package_sha256"][:12], dest)
        return record
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("  %(message)s"))
    logger = logging.getLogger("tasks")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)


def main_publish(paths: Paths, cfg: PipelineConfig) -> int:
    _logging()
    result = publish(paths, cfg)
    state = "registered" if result.created else "already registered, nothing new"
    print(redact(f"publish: {cfg.publish.name} version {result.version} ({state}); package sha256 "
                 f"{result.package_sha256}; {result.where}"))
    return 0


def main_versions(cfg: PipelineConfig) -> int:
    _logging()
    found = list_versions(cfg.publish)
    if not found:
        print(f"no versions of {cfg.publish.name} registered")
    for v in found:
        print(redact(f"{v.version}\t{v.package_sha256 or '-'}\t{v.detail}"))
    return 0


def main_fetch(cfg: PipelineConfig, version: str, dest: Path) -> int:
    _logging()
    record = fetch(cfg.publish, version, dest)
    print(f"fetch-package: {dest} holds package {record['package_sha256']} (verified)")
    return 0
