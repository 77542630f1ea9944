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

from tasks.errors import PipelineError
from tasks.failpoints import failpoint
from tasks.paths import MANIFEST, STAGING_FOLDER  # noqa: F401  (MANIFEST: importers read it here too)

# Versions recorded in every manifest: the libraries whose code decides a stage's bytes.
RECORDED_PACKAGES = (
    "torch", "transformers", "tokenizers", "peft", "autoawq", "safetensors", "onnx",
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "numpy",
)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# The log of the run that built a run-cache entry, kept in the entry beside its files (never a stage's output).
BUILD_LOG = "BUILD_LOG.txt"


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under folder (posix relative paths, sorted), manifest excluded."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (MANIFEST, BUILD_LOG):
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


_FICLONE = 0x40049409  # Linux ioctl: share the blocks copy-on-write (btrfs, XFS, bcachefs, ZFS 2.2+)


def clone_file(src: Path, dst: Path) -> None:
    """An independent copy of src at dst: a copy-on-write clone where the filesystem can (instant, no
    extra space), else a plain copy. Never a hard link: an edit of one file, in place, must not change
    another stage's output, the run cache or a user's Hugging Face cache behind its back."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            import fcntl

            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass
        shutil.copyfileobj(fin, fout, 1 << 22)


def clone_tree(src: Path, dst: Path, exclude: tuple[str, ...] = ()) -> None:
    """Every file under src at the same relative path under dst (``exclude``: relative posix paths)."""
    for item in sorted(src.rglob("*")):
        rel = item.relative_to(src).as_posix()
        if item.is_file() and rel not in exclude:
            clone_file(item, dst / rel)


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


class DamagedManifest(PipelineError, ValueError):
    """A MANIFEST.json that does not parse or does not have the shape write_manifest gives it."""


_HEX64 = frozenset("0123456789abcdef")


def _schema_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "not a JSON object"
    for key, kind in (("stage", str), ("files", dict), ("config", dict), ("inputs", dict), ("packages", dict)):
        if not isinstance(body.get(key), kind):
            return f"'{key}' missing or not a {kind.__name__}"
    for name, entry in body["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
                and set(entry["sha256"]) <= _HEX64 and isinstance(entry.get("size"), int) and entry["size"] >= 0):
            return f"the entry of {name!r} in 'files' is not {{sha256, size}}"
        if name.startswith("/") or ".." in name.split("/"):
            return f"'files' names {name!r}, outside the stage folder"
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The stage's manifest, checked for shape; raises DamagedManifest (a ValueError) when it is not one.

    A truncated or edited manifest must never count as a build: every caller treats it as damage."""
    try:
        body = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DamagedManifest(f"{folder / MANIFEST} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DamagedManifest(f"{folder / MANIFEST} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    problem = _schema_problem(body)
    if problem:
        raise DamagedManifest(f"{folder / MANIFEST} is not a stage manifest ({problem})")
    return body


def manifest_problem(folder: Path) -> str | None:
    """Why the manifest in ``folder`` cannot be trusted (missing, unreadable, wrong shape), or None."""
    if not (folder / MANIFEST).is_file():
        return f"{folder / MANIFEST} is missing"
    try:
        read_manifest(folder)
    except DamagedManifest as exc:
        return str(exc)
    except OSError as exc:
        return f"{folder / MANIFEST} cannot be read ({exc.strerror or exc})"
    return None


def manifest_digest(folder: Path) -> str:
    return sha256_file(folder / MANIFEST)


def _seal_tree(folder: Path) -> None:
    """Read-only files (a published output is edited only by rebuilding it: an editor or a script that
    tries refuses, for any user but root) and data on disk before the rename makes it visible, or a
    power cut could publish zeros. Folders stay writable so that a rebuild can replace them."""
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o444)
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


# What `doit verify` leaves in place of the manifest of a stage it marked stale.
STALE_MANIFEST = "MANIFEST.stale.json"


def is_stage_output(folder: Path) -> bool:
    """A folder this build published (it alone writes a manifest into a stage folder), maybe since marked stale."""
    return (folder / MANIFEST).exists() or (folder / STALE_MANIFEST).exists() or not any(folder.iterdir())


def remove_stage_output(final: Path) -> None:
    """`doit clean STAGE`: remove a stage's published output, and nothing that is not one."""
    if not final.exists():
        return
    if not (final.is_dir() and not final.is_symlink() and is_stage_output(final)):
        raise PipelineError(f"{final} is not an output of this build (no {MANIFEST}); it was not removed")
    shutil.rmtree(final)


@contextlib.contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit publish it as ``final`` (replacing any old one).

    The caller must have written MANIFEST.json into it; without it nothing is published.
    """
    if final.exists() and not (final.is_dir() and not final.is_symlink() and is_stage_output(final)):
        raise PipelineError(f"{final} exists but is not an output of this build (no {MANIFEST}); it was not "
                            "replaced: move it out of the build folder and run doit again")
    staging_root = final.parent / STAGING_FOLDER
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
        failpoint("manifest.written")
        _seal_tree(staging)
        if final.exists():
            retired = staging_root / f"{final.name}.{os.getpid()}.old"
            os.rename(final, retired)
            failpoint("publish.swap")
            os.rename(staging, final)
            shutil.rmtree(retired)
        else:
            os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
