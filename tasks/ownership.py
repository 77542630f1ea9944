"""What the build owns: its build folder and its run cache, each marked when the project creates it.

The build replaces stage folders and the run cache collects old entries; both would destroy a user's
files if ``build.dir`` or ``cache.dir`` pointed at a folder that holds other things (a home folder, a
shared drive, the project itself). So a folder becomes ours only when we create it, or find it empty,
and then carries a marker file. A non-empty folder without the marker is never adopted, except one
whose every entry has the layout this project itself writes (a build or cache made before markers
existed). System folders, the home folder and the project root or any folder above it are refused
outright. Inside an owned folder, the collector and the publisher still touch only names they make.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tasks.errors import PipelineError

BUILD_MARKER = ".ondevice-llm-build"
CACHE_MARKER = ".ondevice-llm-run-cache"
_MARKER_BODY = {"build": "a build folder of ondevice-llm-build: its stages replace folders here; do not keep other files here\n",
                "cache": "a run cache of ondevice-llm-build: its collector deletes entries here; do not keep other files here\n"}

# Folders of the operating system, refused as build or cache folders themselves and anywhere inside.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                "/sys", "/usr")
# Refused themselves (sub-folders are fine: /tmp/x, /var/cache/x, /home/me/builds).
SYSTEM_FOLDERS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var", "/var/tmp", "/var/cache")

# Names a build folder of this project holds (stage outputs, doit's state, our own bookkeeping).
_BUILD_NAMES = re.compile(r"^(base|quantize|finetune|export|package|logs|provenance|matrix|image|\.staging|\.lock|"
                          r"\.stage-lock|\.doit\.sqlite3(-journal|-wal|-shm)?|(finetune|adapter)_[A-Za-z0-9_-]+)$")
_CACHE_STAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
CACHE_KEY = re.compile(r"^[0-9a-f]{64}$")
CACHE_LEFTOVER = re.compile(r"^\.(tmp|gone)\.")


def forbidden_reason(folder: Path, project_root: Path) -> str | None:
    """Why ``folder`` may never be a build or cache folder, or None."""
    folder, root = Path(os.path.abspath(folder)), Path(os.path.abspath(project_root))
    text = folder.as_posix()
    for tree in SYSTEM_TREES:
        if text == tree or text.startswith(tree + "/"):
            return f"it is a system folder ({tree})"
    if folder == Path(os.path.abspath(Path.home())):
        return "it is your home folder"
    if text in SYSTEM_FOLDERS:
        return "it is a system folder"
    if folder == root:
        return "it is the project folder itself"
    if folder in root.parents:
        return "it holds the project folder"
    return None


def _has_own_layout(folder: Path, kind: str) -> bool:
    """A folder written by this project before markers existed: every entry is a name we make."""
    for entry in folder.iterdir():
        if kind == "build":
            if not _BUILD_NAMES.match(entry.name):
                return False
        elif not (entry.is_dir() and _CACHE_STAGE.match(entry.name)
                  and all(CACHE_KEY.match(e.name) or CACHE_LEFTOVER.match(e.name) for e in entry.iterdir())):
            return False
    return True


def claim(folder: Path, kind: str, key: str, project_root: Path) -> Path:
    """Make sure ``folder`` is ours (creating and marking it if needed) or raise one line that says why not.

    kind: "build" or "cache"; key: the config key that named it (for the message)."""
    marker_name = BUILD_MARKER if kind == "build" else CACHE_MARKER
    reason = forbidden_reason(folder, project_root)
    if reason:
        raise PipelineError(f"{key} = {folder}: refused, {reason}; the build replaces and deletes folders inside "
                            f"{key}, so point it at a folder of its own (e.g. {'build/tiny' if kind == 'build' else '.cache/runs'})")
    marker = folder / marker_name
    if marker.is_file():
        return folder
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"{key} = {folder}: is a file, not a folder; move the file away or choose another {key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.iterdir()) and not _has_own_layout(folder, kind):
            raise PipelineError(
                f"{key} = {folder}: the folder holds files this project did not create (no {marker_name} marker); "
                f"the build would replace or delete them, so choose an empty or new folder for {key}")
        marker.write_text(json.dumps({"owner": "ondevice-llm-build", "kind": kind}) + "\n" + _MARKER_BODY[kind],
                          encoding="utf-8")
    except PermissionError:
        raise PipelineError(f"{key} = {folder}: not writable by this user; fix its permissions or choose another "
                            f"{key}") from None
    except OSError as exc:
        raise PipelineError(f"{key} = {folder}: cannot be used ({exc.strerror or exc}); choose another {key}") from None
    return folder
