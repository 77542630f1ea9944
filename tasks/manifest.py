"""Stage outputs: atomic publication and MANIFEST.json.

A stage never writes into its final folder. It writes into a fresh staging folder beside it; only
when the stage function returned and MANIFEST.json is written is that folder renamed into place. A
crash or SIGKILL at any point therefore leaves either the previous complete output or none, never a
half-written one, and doit (whose target is MANIFEST.json) reruns the stage.

The manifest holds only what determines the bytes (file digests, the stage's config, input digests,
package versions, device): no timestamps, so a rerun that reproduces the same bytes writes the same
manifest and downstream stages stay up to date (early cutoff via doit's content checker).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "MANIFEST.json"
# Versions recorded in every manifest: the libraries whose code decides a stage's bytes.
RECORDED_PACKAGES = (
    "torch", "transformers", "tokenizers", "peft", "autoawq", "safetensors", "onnx",
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "numpy",
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under folder (posix relative paths, sorted), manifest excluded."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (multi-GB model files cost nothing twice); a copy where the filesystem cannot link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def link_tree(src: Path, dst: Path, exclude: tuple[str, ...] = ()) -> None:
    """Every file under src at the same relative path under dst (``exclude``: relative posix paths)."""
    for item in sorted(src.rglob("*")):
        rel = item.relative_to(src).as_posix()
        if item.is_file() and rel not in exclude:
            link_or_copy(item, dst / rel)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in RECORDED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_manifest(folder: Path, record: dict[str, Any]) -> Path:
    body = {**record, "files": file_table(folder), "packages": package_versions()}
    path = folder / MANIFEST
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def manifest_digest(folder: Path) -> str:
    return sha256_file(folder / MANIFEST)


def _seal_tree(folder: Path) -> None:
    """Uniform permissions (some writers create 0600 files) and data on disk before the rename
    makes it visible, or a power cut could publish zeros."""
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit publish it as ``final`` (replacing any old one).

    The caller must have written MANIFEST.json into it; without it nothing is published.
    """
    staging_root = final.parent / ".staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    # Leftovers of killed runs of this stage are never adopted: remove them first.
    for stale in staging_root.glob(f"{final.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = staging_root / f"{final.name}.{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        if not (staging / MANIFEST).is_file():
            raise RuntimeError(f"stage wrote no {MANIFEST}; refusing to publish {final}")
        _seal_tree(staging)
        if final.exists():
            retired = staging_root / f"{final.name}.{os.getpid()}.old"
            os.rename(final, retired)
            os.rename(staging, final)
            shutil.rmtree(retired)
        else:
            os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
