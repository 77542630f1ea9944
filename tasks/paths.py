"""Every path the build uses, derived from the project root and the config in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.config import PipelineConfig


# Folder and file names the build writes, in one place.
PACKAGE_FOLDER = "package"     # the evaluate stage's output: the finished, shippable package
STAGING_FOLDER = ".staging"    # where a running stage writes before its output is published
LOGS_FOLDER = "logs"
DOIT_DB = ".doit.sqlite3"


@dataclass(frozen=True)
class Paths:
    root: Path
    build: Path

    @classmethod
    def of(cls, root: Path, cfg: PipelineConfig) -> "Paths":
        root = root.resolve()
        return cls(root=root, build=(root / cfg.build.dir).resolve())

    def stage(self, name: str) -> Path:
        # The evaluate stage's output is the finished, shippable package.
        return self.build / (PACKAGE_FOLDER if name == "evaluate" else name)

    def manifest(self, name: str) -> Path:
        return self.stage(name) / "MANIFEST.json"

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
