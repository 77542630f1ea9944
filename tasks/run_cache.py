"""Run cache: every stage output, stored by what produced it, restored instead of recomputed.

Key = sha256 of (stage, the config keys it reads, the digests of its upstream manifests and input
files, the digest of its code and of the dependency lock). A stage whose key is cached gets that
output back (copy-on-write clones where the filesystem can, else copies: never links, so an edit
of a build output cannot reach the cache nor the other way round), re-hashed against its manifest
before it is published; an entry that fails the check is dropped and the stage is computed.

Layout: ``<cache.dir>/<stage>/<key>/`` (the output with its MANIFEST.json), and a marker file that
says the folder is a run cache (tasks/ownership.py): the cache is used only in a folder it created or
found empty, and its collector removes only folders named like its own entries and leftovers. Entries appear by one
rename of a complete folder, so concurrent writers (several builds, machines sharing the folder over
NFS) are safe: the first rename wins, the others discard their copy, and a reader never sees half an
entry. ``cache.max_size_gb`` bounds the folder; least recently used entries go first (`doit cache-gc`,
and after every store).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.failpoints import failpoint
from tasks.manifest import BUILD_LOG, MANIFEST, file_table, clone_file, clone_tree, read_manifest
from tasks.ownership import CACHE_KEY, CACHE_LEFTOVER, claim
from tasks.paths import Paths
from tasks.provenance import lock_record
from tasks.stages import COMMON_CODE, Stage, config_values

log = logging.getLogger("tasks.cache")
FORMAT = 1
STAGE_DIR = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def code_digest(root: Path, stage: Stage) -> str:
    digest = hashlib.sha256()
    for rel in sorted(set(stage.code + COMMON_CODE)):
        path = root / rel
        digest.update(rel.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    return digest.hexdigest()


def cache_key(stage: Stage, cfg: PipelineConfig, paths: Paths, inputs: dict, input_files: dict) -> str:
    body = {
        "format": FORMAT,
        "stage": stage.name,
        "config": config_values(cfg, stage.keys_for(cfg)),
        "inputs": inputs,
        "input_files": input_files,
        "code": code_digest(paths.root, stage),
        "lock": lock_record(paths.root),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass(frozen=True)
class RunCache:
    root: Path
    max_bytes: int

    @classmethod
    def of(cls, paths: Paths, cfg: PipelineConfig) -> "RunCache | None":
        if not cfg.cache.enabled:
            return None
        root = claim((paths.root / cfg.cache.dir).resolve(), "cache", "cache.dir", paths.root)
        return cls(root, int(cfg.cache.max_size_gb * (1 << 30)))

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def restore(self, stage: str, key: str, staging: Path) -> bool:
        """Fill the empty staging folder from the cache; False (staging left empty) on a miss or a bad entry."""
        entry = self.entry(stage, key)
        if not (entry / MANIFEST).is_file():
            return False
        try:
            listed = read_manifest(entry)["files"]
            for index, rel in enumerate(listed):
                clone_file(entry / rel, staging / rel)
                if index == len(listed) // 2:
                    failpoint("cache.restore")
            shutil.copyfile(entry / MANIFEST, staging / MANIFEST)
            if file_table(staging) != listed:
                raise ValueError("files differ from the entry's manifest")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: run cache entry %s is damaged (%s); dropping it and building", stage, key[:12], exc)
            for child in list(staging.iterdir()):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            self._discard(entry)
            return False
        with contextlib.suppress(OSError):
            os.utime(entry)  # least recently used goes first
        return True

    def build_log(self, stage: str, key: str) -> str | None:
        """The log of the run that built this entry (kept with it), or None for an entry made before logs were kept."""
        try:
            return (self.entry(stage, key) / BUILD_LOG).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None

    def store(self, stage: str, key: str, output: Path, log_file: Path | None = None) -> None:
        """Add a published stage output under key (no-op if present), with the log of the run that built
        it; never fails the build."""
        entry = self.entry(stage, key)
        if entry.is_dir():
            with contextlib.suppress(OSError):
                os.utime(entry)
            return
        tmp = self.root / stage / f".tmp.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            clone_tree(output, tmp)
            if log_file is not None and log_file.is_file():
                shutil.copyfile(log_file, tmp / BUILD_LOG)
            for path in tmp.rglob("*"):
                if path.is_file():
                    path.chmod(0o444)  # an entry is never edited, only added or removed whole
            failpoint("cache.store")
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.is_dir():  # not "another writer was first": a real problem
                    raise
            log.info("%s: stored in the run cache (%s)", stage, key[:12])
        except OSError as exc:
            log.warning("%s: could not store the output in the run cache %s (%s); the build is unaffected",
                        stage, self.root, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.gc()

    def _discard(self, entry: Path) -> None:
        """Rename away first, so no reader sees a half-deleted entry."""
        doomed = entry.parent / f".gone.{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            os.rename(entry, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _stage_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [d for d in self.root.iterdir() if d.is_dir() and not d.is_symlink() and STAGE_DIR.match(d.name)]

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every complete entry, oldest first. An entry is a folder named
        by a cache key (64 hex digits) under a stage's folder; nothing else is ever counted or removed."""
        found = []
        for stage_dir in self._stage_dirs():
            for entry in stage_dir.iterdir():
                if not CACHE_KEY.match(entry.name) or entry.is_symlink() or not entry.is_dir():
                    continue
                with contextlib.suppress(OSError):
                    found.append((entry.stat().st_mtime, _tree_bytes(entry), entry))
        return sorted(found)

    def gc(self, max_bytes: int | None = None, stale_tmp_s: float = 24 * 3600) -> tuple[int, int]:
        """Remove least recently used entries until the cache fits; also writers' leftovers older than a
        day (killed builds). Returns (entries removed, bytes freed)."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = freed = 0
        for _, size, entry in entries:
            if total <= limit:
                break
            self._discard(entry)
            total -= size
            removed += 1
            freed += size
        now = time.time()
        for stage_dir in self._stage_dirs():
            # Only the names our writers and _discard use (".tmp.<host>.<pid>...", ".gone.<key>...").
            for leftover in stage_dir.iterdir():
                if not CACHE_LEFTOVER.match(leftover.name) or leftover.is_symlink():
                    continue
                with contextlib.suppress(OSError):
                    if now - leftover.stat().st_mtime > stale_tmp_s:
                        shutil.rmtree(leftover, ignore_errors=True)
        if removed:
            log.info("run cache: removed %d least recently used entries (%.1f MB) to stay under %.1f MB",
                     removed, freed / 1e6, limit / 1e6)
        return removed, freed


def main_cache(paths: Paths, cfg: PipelineConfig, action: str, max_size_gb: float | None) -> int:
    cache = RunCache.of(paths, cfg)
    if cache is None:
        print("the run cache is off (cache.enabled = false)")
        return 0
    if action == "gc":
        logging.basicConfig(level=logging.INFO, format="  %(message)s")
        limit = int(max_size_gb * (1 << 30)) if max_size_gb is not None else None
        removed, freed = cache.gc(limit, stale_tmp_s=0 if max_size_gb == 0 else 24 * 3600)
        print(f"cache gc: removed {removed} entries ({freed / 1e6:.1f} MB) from {cache.root}")
    entries = cache.entries()
    for used, size, entry in entries:
        print(f"{entry.parent.name:9} {entry.name[:16]}  {size / 1e6:9.1f} MB  last used "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(used))}")
    total = sum(size for _, size, _ in entries)
    print(f"{len(entries)} entries, {total / 1e6:.1f} MB of {cache.max_bytes / 1e9:.1f} GB in {cache.root}")
    return 0
