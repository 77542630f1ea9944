"""doit task graph: wiring only. Stage code lives in tasks/; nothing heavy is imported here.

    doit                              build everything that is stale (default config pipeline.toml)
    doit config=other.toml            another config (its build.dir keeps the outputs apart)
    doit finetune.rank=16             override any config key from the command line
    doit list / info finetune / clean export
"""

import json
import os
import shlex
import sys
from pathlib import Path

from doit import get_var
from doit.action import CmdAction
from doit.tools import config_changed

from tasks.cli_vars import config_overrides
from tasks.config import load_config
from tasks.doit_cli import answer_before_doit
from tasks.doit_guard import guard_state_database
from tasks.doit_reporter import reporter_for
from tasks.doit_uptodate import ConfigKeys
from tasks.errors import PipelineError
from tasks.manifest import manifest_problem, remove_stage_output
from tasks.ownership import claim
from tasks.paths import ENV_BUILD_LOCK_HELD, ENV_GPUS, ENV_IMAGE_VARIANT, LOGS_FOLDER, Paths, image_id_file
from tasks.secrets import redact
from tasks.stages import COMMON_CODE, config_fingerprint, stages_for
from tasks.workspace_lock import READ_ONLY_COMMANDS, doit_command, hold_build_lock

ROOT = Path(__file__).resolve().parent
CONFIG = get_var("config", "pipeline.toml")
try:
    OVERRIDES = config_overrides()
    CFG = load_config(ROOT / CONFIG, OVERRIDES)
except PipelineError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
PATHS = Paths.of(ROOT, CFG)
STAGES = stages_for(CFG)  # the core stages, plus two per [adapters.<name>]
try:
    # Ours only if we created it (or found it empty): never a home, system or project folder.
    claim(PATHS.build, "build", "build.dir", ROOT)
except PipelineError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
if doit_command(sys.argv) not in READ_ONLY_COMMANDS:
    try:
        _BUILD_LOCK = hold_build_lock(PATHS.build)  # held until this process exits
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)

guard_state_database(PATHS.doit_db)
DOIT_CONFIG = {
    # Explicit backend: the default (dbm) differs between interpreters; sqlite3 commits atomically.
    "backend": "sqlite3",
    "dep_file": str(PATHS.doit_db),
    "default_tasks": [s.name for s in STAGES],
    "verbosity": 2,
    "action_string_formatting": "new",
    "reporter": reporter_for(f"{os.path.relpath(PATHS.build / LOGS_FOLDER, ROOT)}/", os.path.relpath(PATHS.stage("evaluate"), ROOT),
                             tuple(s.name for s in STAGES)),
}
if CFG.executor.kind == "ray":
    # Stale independent stages go to the cluster together; each action is a process that waits on
    # its Ray task, so threads are enough here. `doit -n N` on the command line still wins.
    DOIT_CONFIG.update({"num_process": CFG.executor.parallel, "par_type": "thread"})
STAGE_CMD = [sys.executable, "-m", "tasks"]


def rel(path) -> str:
    """doit runs from this folder; relative paths in its state let a project folder be moved or copied."""
    return os.path.relpath(path, ROOT)


CONFIG_ARGS = ["--config", CONFIG, "--root", "."] + [a for o in OVERRIDES for a in ("--set", o)]


def _input_stamp() -> str:
    """Size and mtime of the input files (or 'missing'): cheap, and a missing file makes `check`
    run and explain itself instead of doit failing on a missing file_dep."""
    stamps = {}
    for rel_path in sorted({f for stage in STAGES for f in stage.files(CFG)}):
        path = PATHS.data(rel_path)
        stamps[rel_path] = [path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else "missing"
    return json.dumps(stamps, sort_keys=True)


def task_check():
    """Validate the dataset and input files before any stage runs."""
    # doit keeps this string as it is in its state file: [publish] (read by no check or stage) stays out,
    # and anything credential-shaped left is masked (tasks/secrets.py).
    return {
        "actions": [STAGE_CMD + ["check"] + CONFIG_ARGS],
        "uptodate": [config_changed(redact(CFG.model_dump_json(exclude={"publish"}) + _input_stamp()))],
        "verbosity": 2,
    }


def task_verify():
    """Re-hash every stage output against its MANIFEST.json; damaged stages and later become stale."""
    return {"actions": [STAGE_CMD + ["verify"] + CONFIG_ARGS], "uptodate": [False], "verbosity": 2}


def _clean_stage(folder: Path) -> None:
    try:
        remove_stage_output(folder)
    except PipelineError as exc:  # doit swaps sys.stderr while it cleans
        print(f"error: {exc}", file=sys.__stderr__)


class _ManifestIntact:
    """doit uptodate check: false while the stage's MANIFEST.json is missing, unparsable or ill-shaped."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, task, values):
        return manifest_problem(PATHS.stage(self.name)) is None

    def __repr__(self):
        return f"manifest_intact({self.name!r})"


def _stage_task(stage):
    def make():
        file_dep = [rel(PATHS.manifest(up)) for up in stage.upstream]
        file_dep += [rel(PATHS.data(f)) for f in stage.files(CFG)]
        file_dep += list(stage.code + COMMON_CODE)
        return {
            "doc": stage.doc,
            "actions": [STAGE_CMD + ["stage", stage.name] + CONFIG_ARGS],
            "file_dep": file_dep,
            "task_dep": ["check"],
            "targets": [rel(PATHS.manifest(stage.name))],
            # A damaged MANIFEST.json (truncated, edited) is never up to date, so nothing builds on top of it.
            "uptodate": [ConfigKeys(config_fingerprint(CFG, stage)), _ManifestIntact(stage.name)],
            "clean": [(_clean_stage, [PATHS.stage(stage.name)])],
            "verbosity": 2,
        }
    make.__name__ = f"task_{stage.name}"
    make.__doc__ = stage.doc
    return make


for _stage in STAGES:
    globals()[f"task_{_stage.name}"] = _stage_task(_stage)


def task_matrix():
    """Build every [matrix] point into <build.dir>/matrix/<point>/ and compare them (doit -n N matrix: in parallel)."""
    from tasks.matrix import point_build_dir, points

    grid = points(CFG.matrix)
    base = [sys.executable, "-m", "doit"] + ([f"config={CONFIG}"] if CONFIG != "pipeline.toml" else []) + list(OVERRIDES)
    for index, point in enumerate(grid):
        yield {
            "name": point.slug,
            "doc": " ".join(point.overrides),
            # Its own build folder (own doit state and lock); stages shared with earlier builds come from
            # the run cache. The first point builds alone so that the others find base and quantize cached.
            "actions": [base + [f"build.dir={point_build_dir(CFG.build.dir, point)}", *point.overrides]],
            "task_dep": [f"matrix:{grid[0].slug}"] if index else [],
            "uptodate": [False],
            "verbosity": 2,
        }
    yield {
        "name": "comparison",
        "doc": "comparison.{json,md,png} of every point",
        "actions": [STAGE_CMD + ["matrix-report"] + CONFIG_ARGS],
        "task_dep": [f"matrix:{p.slug}" for p in grid],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_cache_gc():
    """Trim the run cache to cache.max_size_gb, least recently used first, and list what is left."""
    return {"basename": "cache-gc", "actions": [STAGE_CMD + ["cache", "gc"] + CONFIG_ARGS], "uptodate": [False],
            "verbosity": 2}


# --- publishing ([publish] in the config); never part of the default build -----------------------


def task_publish():
    """Register the finished package (checked against its manifests first) in publish.registry."""
    return {"actions": [STAGE_CMD + ["publish"] + CONFIG_ARGS], "uptodate": [False], "verbosity": 2}


def task_versions():
    """List the registered versions of publish.name with their package digests."""
    return {"actions": [STAGE_CMD + ["versions"] + CONFIG_ARGS], "uptodate": [False], "verbosity": 2}


def task_fetch_package():
    """Download a registered version and verify it bit for bit: doit fetch-package --version N --to DIR."""
    def command(version, to):
        return shlex.join(STAGE_CMD + ["fetch-package", "--version", version] + (["--to", to] if to else []) + CONFIG_ARGS)

    return {
        "basename": "fetch-package",
        "actions": [CmdAction(command)],
        "params": [{"name": "version", "long": "version", "default": "latest", "help": "registered version (latest)"},
                   {"name": "to", "long": "to", "default": "", "help": "new folder (default fetched/NAME-VERSION)"}],
        "uptodate": [False],
        "verbosity": 2,
    }


# --- the toolchain image (docker/Dockerfile); never part of the default build --------------------
# `image_variant` has no dot on purpose: dotted command-line names are config overrides.
IMAGE_VARIANT = get_var("image_variant", os.environ.get(ENV_IMAGE_VARIANT, "cuda"))
IMAGE_ID_FILE = str(image_id_file("runtime", IMAGE_VARIANT))
IMAGE_CMD = [sys.executable, "-m", "tasks.image"]


def task_image():
    """Build the toolchain image (runtime target) with BuildKit and record its id in build/image/."""
    return {
        "actions": [IMAGE_CMD + ["build", "--target", "runtime", "--variant", IMAGE_VARIANT, "--iidfile", IMAGE_ID_FILE]],
        "targets": [IMAGE_ID_FILE],
        # BuildKit's own context hashing decides what to rebuild (~1 s when nothing changed); the id
        # file is rewritten only when the id changes, so tasks depending on it see real changes only.
        "uptodate": [False],
        "verbosity": 2,
    }


def task_incontainer():
    """Run the pipeline inside the image: `doit incontainer [STAGE ...]` (config overrides pass through)."""
    def command(stages):
        inner = ["doit"] + ([f"config={CONFIG}"] if CONFIG != "pipeline.toml" else []) + list(OVERRIDES) + list(stages)
        gpus = os.environ.get(ENV_GPUS, "auto")
        # This doit holds the build folder's lock; the one in the container works under it.
        return f"{ENV_BUILD_LOCK_HELD}=1 " + shlex.join(
            IMAGE_CMD + ["run", "--iidfile", IMAGE_ID_FILE, "--gpus", gpus, "--"] + inner)

    return {
        "actions": [CmdAction(command)],
        "pos_arg": "stages",
        "file_dep": [IMAGE_ID_FILE],
        "task_dep": ["image"],
        "uptodate": [False],
        "verbosity": 2,
    }


# Sub-commands doit itself would answer with a traceback (an unknown task for info, dumpdb on sqlite).
_TASK_NAMES = {name.removeprefix("task_").replace("_", "-") if name in ("task_cache_gc", "task_fetch_package")
               else name.removeprefix("task_") for name in list(globals()) if name.startswith("task_")}
_ANSWER = answer_before_doit(sys.argv, doit_command(sys.argv), _TASK_NAMES, PATHS.doit_db)
if _ANSWER is not None:
    sys.exit(_ANSWER)
