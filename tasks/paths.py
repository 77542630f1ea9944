"""Every path the build uses, derived from the project root and the config in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tasks/image.py imports this module with a bare system Python (no pydantic)
    from tasks.config import PipelineConfig


# Folder and file names the build writes, in one place.
PACKAGE_FOLDER = "package"     # the evaluate stage's output: the finished, shippable package
STAGING_FOLDER = ".staging"    # where a running stage writes before its output is published
LOGS_FOLDER = "logs"
DOIT_DB = ".doit.sqlite3"
MANIFEST = "MANIFEST.json"     # in every stage output: the file table; doit's target
FETCHED_FOLDER = "fetched"     # `python -m tasks fetch` without --to, under the project folder
# Toolchain image ids, under the project folder and not build.dir: one image serves every config.
IMAGE_FOLDER = Path("build") / "image"

# Environment variables the project reads or sets (a library's own, HF_HUB_OFFLINE say, are named
# where that library is called).
ENV_DOCKER = "PIPELINE_DOCKER"                      # the docker client to use
ENV_DOCKER_NETWORK = "PIPELINE_DOCKER_NETWORK"      # e.g. host, for image builds and runs
ENV_EXTRA_CA = "PIPELINE_EXTRA_CA"                  # a PEM CA for a TLS-intercepting proxy
ENV_IMAGE_BASE = "PIPELINE_IMAGE_BASE"              # the image's base (a local one, say)
ENV_IMAGE_VARIANT = "PIPELINE_IMAGE_VARIANT"        # cuda | cpu
ENV_IMAGE_ID = "PIPELINE_IMAGE_ID"                  # set inside the container: provenance records it
ENV_GPUS = "PIPELINE_GPUS"                          # `doit incontainer`: the GPUs handed in
ENV_BUILD_LOCK_HELD = "PIPELINE_BUILD_LOCK_HELD"    # the caller holds the workspace lock (incontainer)
ENV_GPU_LOCK_DIR = "PIPELINE_GPU_LOCK_DIR"          # the GPU slots' lock files, shared by all builds
ENV_RAY_NODE = "PIPELINE_RAY_NODE"                  # set on a Ray worker: provenance records the node
ENV_FAILPOINT = "PIPELINE_FAILPOINT"                # fault trials: stop at this failpoint
ENV_FAILPOINT_FILE = "PIPELINE_FAILPOINT_FILE"      # fault trials: the marker file to write there


def stage_folder(name: str) -> str:
    """A stage's output folder under build.dir: its name; the evaluate stage's is the package."""
    return PACKAGE_FOLDER if name == "evaluate" else name


def image_id_file(target: str = "runtime", variant: str = "cuda") -> Path:
    """Where ``python -m tasks.image build`` records an image's id (relative to the project folder)."""
    return IMAGE_FOLDER / f"{target}-{variant}.id"


@dataclass(frozen=True)
class Paths:
    root: Path
    build: Path

    @classmethod
    def of(cls, root: Path, cfg: PipelineConfig) -> "Paths":
        root = root.resolve()
        return cls(root=root, build=(root / cfg.build.dir).resolve())

    def stage(self, name: str) -> Path:
        return self.build / stage_folder(name)

    def manifest(self, name: str) -> Path:
        return self.stage(name) / MANIFEST

    def log(self, name: str) -> Path:
        return self.build / LOGS_FOLDER / f"{name}.log"

    def scratch(self, name: str) -> Path:
        """Working space of a running stage; beside the staging folders, removed afterwards."""
        return self.build / STAGING_FOLDER / f"{name}.scratch"

    @property
    def doit_db(self) -> Path:
        return self.build / DOIT_DB

    def data(self, relative: str) -> Path:
        """A config-named input file (relative to the project root unless absolute)."""
        return (self.root / relative).resolve()

    def check_input(self, key: str, relative: str) -> Path:
        """``data`` that refuses a path inside the project which links outside it (a symlink planted in
        the workspace must not pull in, and hash into manifests, files from elsewhere)."""
        import os

        from tasks.errors import PipelineError

        named = Path(os.path.normpath(self.root / relative))
        resolved = named.resolve()
        if named.is_relative_to(self.root) and not resolved.is_relative_to(self.root):
            raise PipelineError(f"{key}: {relative} links to {resolved}, outside the project; copy the file into "
                                "the project, or name that path in the config if you mean to use it")
        return resolved
