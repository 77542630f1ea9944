"""Where each stage output was built: the dependency lock and the container image.

Kept out of MANIFEST.json on purpose: a manifest holds only what decides the bytes, so the same
build on the host and in the image yields the same manifests (and downstream stages stay up to
date). The environment is provenance for people and registries: one small JSON per stage in
``<build>/provenance/``, written after the stage published, naming the manifest it belongs to.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from tasks.manifest import sha256_file
from tasks.paths import ENV_IMAGE_ID, ENV_RAY_NODE, Paths

# Set by `python -m tasks.image run` (and so by `doit incontainer`) inside the container.
IMAGE_ID_ENV = ENV_IMAGE_ID
# Set by the Ray executor's task for the stage process it starts on a node (tasks/ray_executor.py).
NODE_ENV = ENV_RAY_NODE


def lock_variant() -> str:
    """Which lock the running environment was installed from: cuda when the GPU runtime is present."""
    for name in ("onnxruntime-gpu", "onnxruntime-genai-cuda"):
        try:
            metadata.version(name)
            return "cuda"
        except metadata.PackageNotFoundError:
            continue
    return "cpu"


def lock_path(root: Path) -> Path:
    """The lock file the running environment was installed from (requirements/<variant>.lock.txt)."""
    return root / "requirements" / f"{lock_variant()}.lock.txt"


def lock_record(root: Path) -> dict:
    path = lock_path(root)
    return {"file": path.relative_to(root).as_posix(),
            "sha256": sha256_file(path) if path.is_file() else None}


def environment_record(root: Path, manifest_sha256: str) -> dict:
    return {
        "manifest_sha256": manifest_sha256,
        "lock": lock_record(root),
        "image_id": os.environ.get(IMAGE_ID_ENV) or None,
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "node": _node(),
    }


def _node() -> dict:
    """The machine that built the stage: the Ray node (executor.kind = "ray") or this host."""
    raw = os.environ.get(NODE_ENV)
    return json.loads(raw) if raw else {"hostname": platform.node()}


def record_environment(paths: Paths, stage: str, manifest_sha256: str, restored_from: str | None = None) -> Path:
    """Write ``<build>/provenance/<stage>.json`` atomically (a reader never sees half of it). An output
    restored from the run cache was computed elsewhere or earlier: the record says so (the cache key
    covers the lock, not the image)."""
    folder = paths.build / "provenance"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{stage}.json"
    tmp = folder / f".{stage}.{os.getpid()}.tmp"
    record = environment_record(paths.root, manifest_sha256)
    if restored_from:
        record["restored_from_run_cache"] = restored_from
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, final)
    return final


def read_environment(paths: Paths, stage: str, manifest_sha256: str) -> dict | None:
    """The environment record of the stage output whose manifest has this digest; None when there is
    none or it belongs to an earlier build of the stage (e.g. written by an older version of us)."""
    path = paths.build / "provenance" / f"{stage}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("manifest_sha256") == manifest_sha256 else None
