"""Run one stage: check its inputs, call its pure entry point into a staging folder, write the
manifest, publish atomically, and keep the full log in ``<build>/logs/<stage>.log``."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from tasks.config import PipelineConfig
from tasks.disk import check_free_space, is_disk_full
from tasks.errors import PipelineError
from tasks.manifest import manifest_digest, manifest_problem, sha256_file, staged_output, write_manifest
from tasks.gpu_slots import gpu_slot
from tasks.ownership import claim
from tasks.paths import Paths
from tasks.provenance import record_environment
from tasks.run_cache import RunCache, cache_key
from tasks.secrets import RedactingFormatter, redact
from tasks.workspace_lock import stage_lock
from tasks.stages import config_values, stages_for

log = logging.getLogger("tasks")
FILE_ONLY = {"file_only": True}  # logging ``extra``: a record for the stage log, not the terminal


def quiet_environment() -> None:
    """Offline-friendly, telemetry-free, reproducible process settings for every stage."""
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


class LogFileHandler(logging.FileHandler):
    """A stage log that never turns a full disk into a traceback: the terminal keeps the messages,
    and the disk-full error itself is reported once, as one line, by run_stage."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


class _LinesToLog(io.TextIOBase):
    """A stand-in for sys.stdout/sys.stderr while a stage runs: what libraries print (the model builder's
    progress, tqdm bars, banners) goes to the stage log, one record per line, never to the terminal."""

    def __init__(self, logger: logging.Logger):
        self._logger, self._pending = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._pending + text.replace("\r", "\n")).split("\n")
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                self._logger.info(line.rstrip(), extra=FILE_ONLY)
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._logger.info(self._pending.rstrip(), extra=FILE_ONLY)
        self._pending = ""


def _ours(record: logging.LogRecord) -> bool:
    return record.name.startswith(("tasks", "progress")) or record.name == "__main__"


@contextlib.contextmanager
def stage_logging(path: Path) -> Iterator[None]:
    """Log to the terminal and to the stage's log file (debug, overwritten per run); every line goes
    through tasks.secrets.redact (a library may log a URL with a token in it).

    The terminal gets our own lines (info and up) and other libraries' errors; their info chatter,
    their warnings (Python warnings included, through logging.captureWarnings) and whatever they print
    go to the log file only, so a cold build shows our lines and progress, and the log has everything.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    to_file = LogFileHandler(path, mode="w", encoding="utf-8")
    to_file.setFormatter(fmt)
    to_file.setLevel(logging.DEBUG)
    to_term = logging.StreamHandler(sys.stderr)  # bound now: the real terminal, not the stand-in below
    to_term.setFormatter(RedactingFormatter("  %(message)s"))
    to_term.setLevel(logging.INFO)
    to_term.addFilter(lambda r: not getattr(r, "file_only", False)
                      and (_ours(r) or r.levelno >= logging.ERROR))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(to_file)
    root.addHandler(to_term)
    logging.captureWarnings(True)
    printed = logging.getLogger("printed")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LinesToLog(printed), _LinesToLog(printed)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved
        logging.captureWarnings(False)
        root.removeHandler(to_file)
        root.removeHandler(to_term)
        to_file.close()


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters: a library's error in one line. Redacted
    before the cut, as in tasks.registries: a token cut in half would no longer be recognised."""
    text = " ".join(redact(str(exc)).split()) or "(no message)"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _call_stage(stage, cfg: PipelineConfig, paths: Paths, out: Path) -> dict:
    """The stage's declared entry point (its module's STAGE), imported only now: heavy libraries load in
    the stage's own process, never in doit's."""
    module, _, function = stage.entry.partition(":")
    return getattr(importlib.import_module(module), function)(cfg, paths, out, *stage.entry_args)


def run_stage(name: str, cfg: PipelineConfig, paths: Paths) -> Path:
    claim(paths.build, "build", "build.dir", paths.root)
    with stage_lock(paths.build):
        return _run_stage(name, cfg, paths)


def _run_stage(name: str, cfg: PipelineConfig, paths: Paths) -> Path:
    by_name = {s.name: s for s in stages_for(cfg)}
    stage = by_name.get(name)
    if stage is None:
        raise PipelineError(f"unknown stage {name!r}; choose one of: {', '.join(by_name)}")
    quiet_environment()
    for up in stage.upstream:
        if not paths.manifest(up).is_file():
            raise PipelineError(f"stage {name} needs {up} first ({paths.manifest(up)} missing); run `doit {up}`")
    for up in stage.upstream:
        problem = manifest_problem(paths.stage(up))
        if problem:
            raise PipelineError(f"stage {name} needs {up}, whose manifest cannot be trusted ({problem}); run `doit verify` "
                                "and then `doit` to rebuild it")
    inputs = {up: manifest_digest(paths.stage(up)) for up in stage.upstream}
    files = {}
    for rel in stage.files(cfg):
        path = paths.check_input(rel, rel)
        if not path.is_file():
            raise PipelineError(f"input file {path} not found; fix the path in the config")
        files[rel] = sha256_file(path)
    final = paths.stage(name)
    need = check_free_space(stage, cfg, paths)
    cache = RunCache.of(paths, cfg)
    key = cache_key(stage, cfg, paths, inputs, files) if cache else ""
    with stage_logging(paths.log(name)):
        start = time.monotonic()
        log.info("%s: building into %s%s", name, final, f" (needs up to {need >> 20} MB of disk)" if need else "")
        restored = False
        try:
            with staged_output(final) as staging:
                restored = cache is not None and cache.restore(name, key, staging)
                if restored:
                    log.info("%s: restored from the run cache (%s, key %s); nothing recomputed", name,
                             cache.root, key[:12])
                    original = cache.build_log(name, key)
                    if original:  # the training log of the adapter you have is not lost with a restore
                        log.info("log of the run that built this output:\n%s", original.rstrip(), extra=FILE_ONLY)
                else:
                    with (gpu_slot(cfg.build.gpu_slots, f"{name} in {paths.build}") if stage.gpu(cfg)
                          else contextlib.nullcontext()):
                        facts = _call_stage(stage, cfg, paths, staging) or {}
                    write_manifest(staging, {
                        "stage": name,
                        "config": config_values(cfg, stage.keys_for(cfg)),
                        "inputs": inputs,
                        "input_files": files,
                        "facts": facts,
                    })
        except Exception as exc:
            # The terminal gets one line (from __main__); the log file gets the whole traceback.
            log.error("%s failed", name, exc_info=True, extra=FILE_ONLY)
            if isinstance(exc, PipelineError):
                raise
            if is_disk_full(exc):
                raise PipelineError(
                    f"no space left on device while building {name} in {paths.build}; its partial output was removed "
                    f"and the previous {name} output is untouched; free some space (or set build.dir to a bigger disk) "
                    "and run doit again"
                ) from None
            raise PipelineError(f"stage {name} failed: {one_line(exc)}; the previous {name} output is untouched; "
                                f"full traceback in {paths.log(name)}") from None
        if cache is not None and not restored:
            cache.store(name, key, final, paths.log(name))
        try:
            record_environment(paths, name, manifest_digest(final), key if restored else None)
        except OSError as exc:  # provenance only: the stage itself is complete
            log.warning("%s: could not record the build environment (%s); publishing will report it unknown", name, exc)
        log.info("%s: done in %.1fs (log: %s)", name, time.monotonic() - start, paths.log(name))
    return final
