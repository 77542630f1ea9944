"""The build touches only what it created: build and cache folders are claimed with a marker, and
nothing else is ever replaced, collected or adopted. Fast: no model is built here."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tasks.errors import PipelineError
from tasks.manifest import MANIFEST, staged_output
from tasks.ownership import BUILD_MARKER, CACHE_MARKER, claim
from tasks.run_cache import RunCache

from conftest import doit, make_project

KEY = "0123456789abcdef" * 4


def user_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def a_home_like_folder(folder: Path) -> Path:
    """What a mistyped cache.dir may point at: someone's files, dot-folders old enough to look like leftovers."""
    (folder / ".ssh").mkdir(parents=True)
    (folder / ".ssh/id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "Documents/trip").mkdir(parents=True)
    (folder / "Documents/trip/plan.txt").write_text("Lisbon, May\n")
    old = time.time() - 30 * 24 * 3600
    for path in folder.rglob("*"):
        os.utime(path, (old, old))
    return folder


def test_cache_gc_never_deletes_a_folder_it_did_not_create(tmp_path):
    home = a_home_like_folder(tmp_path / "home")
    before = user_files(home)
    with pytest.raises(PipelineError, match=r"cache.dir = .*home: the folder holds files this project did not create"):
        claim(home, "cache", "cache.dir", tmp_path / "project")
    assert user_files(home) == before and not (home / CACHE_MARKER).exists()


def test_cache_gc_removes_only_its_own_entries_and_leftovers_inside_its_own_folder(tmp_path):
    root = claim(tmp_path / "cache", "cache", "cache.dir", tmp_path / "project")
    entry = root / "quantize" / KEY
    entry.mkdir(parents=True)
    (entry / MANIFEST).write_text("{}")
    leftover = root / "quantize" / ".tmp.host.123.abcd"
    leftover.mkdir()
    # Things a user (or another tool) put into the cache folder later: never ours to delete.
    (root / "quantize" / "notes").mkdir()
    (root / "quantize" / "notes" / "keep.txt").write_text("mine")
    (root / "quantize" / ".hidden").mkdir()
    (root / "Backups").mkdir()
    (root / "Backups" / "photo.jpg").write_bytes(b"\xff\xd8")
    old = time.time() - 30 * 24 * 3600
    for path in root.rglob("*"):
        os.utime(path, (old, old))

    removed, _ = RunCache(root, 0).gc(max_bytes=0, stale_tmp_s=0)

    assert removed == 1 and not entry.exists() and not leftover.exists()
    assert (root / "quantize/notes/keep.txt").read_text() == "mine"
    assert (root / "quantize/.hidden").is_dir() and (root / "Backups/photo.jpg").is_file()


@pytest.mark.parametrize("folder, reason", [
    ("/", "system folder"),
    ("/etc", "system folder"),
    ("/usr/lib/x", "system folder"),
    ("HOME", "your home folder"),
    ("PROJECT", "the project folder itself"),
    ("PARENT", "holds the project folder"),
])
def test_a_system_home_or_project_folder_is_refused_as_build_or_cache_folder(tmp_path, folder, reason):
    project = tmp_path / "work" / "project"
    project.mkdir(parents=True)
    path = {"HOME": Path.home(), "PROJECT": project, "PARENT": project.parent}.get(folder, Path(folder))
    for kind, key in (("build", "build.dir"), ("cache", "cache.dir")):
        with pytest.raises(PipelineError, match=rf"{key} = .*refused, (it is a|it is|it) .*{reason}"):
            claim(path, kind, key, project)
    assert not (project.parent / BUILD_MARKER).exists() and not (project / BUILD_MARKER).exists()


def test_a_folder_from_before_markers_is_adopted_only_if_it_has_the_builds_own_layout(tmp_path):
    legacy = tmp_path / "build"
    for name in ("base", "quantize", "logs", ".staging"):
        (legacy / name).mkdir(parents=True)
    (legacy / ".doit.sqlite3").write_bytes(b"")
    assert claim(legacy, "build", "build.dir", tmp_path / "p") == legacy and (legacy / BUILD_MARKER).is_file()
    cache = tmp_path / "cache"
    (cache / "export" / KEY).mkdir(parents=True)
    assert claim(cache, "cache", "cache.dir", tmp_path / "p") == cache and (cache / CACHE_MARKER).is_file()
    (tmp_path / "mixed/base").mkdir(parents=True)
    (tmp_path / "mixed/thesis.tex").write_text("\\begin{document}")
    with pytest.raises(PipelineError, match="holds files this project did not create"):
        claim(tmp_path / "mixed", "build", "build.dir", tmp_path / "p")


def test_a_build_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(PipelineError, match=r"build.dir = .*out: is a file, not a folder; move the file away"):
        claim(tmp_path / "out", "build", "build.dir", tmp_path / "p")


def test_publishing_a_stage_never_replaces_a_folder_that_is_not_a_stage_output(tmp_path):
    final = tmp_path / "build" / "package"
    final.mkdir(parents=True)
    (final / "slides.pptx").write_bytes(b"PK")
    with pytest.raises(PipelineError, match=r"package exists but is not an output of this build"):
        with staged_output(final) as staging:
            (staging / MANIFEST).write_text("{}")
    assert user_files(final) == {"slides.pptx": b"PK"}


def test_doit_refuses_a_build_dir_holding_other_files_in_one_line_before_anything_runs(tmp_path):
    project = make_project(tmp_path / "project")
    shared = a_home_like_folder(tmp_path / "shared")
    before = user_files(shared)
    result = doit(project, "list", f"build.dir={shared}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "holds files this project did not create" in result.stderr
    assert user_files(shared) == before
    home = doit(project, "check", f"cache.dir={Path.home()}", check=False)
    assert home.returncode != 0 and "cache.dir" in home.stderr and "your home folder" in home.stderr
    assert "Traceback" not in home.stderr


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only mount (root ignores permission bits, not a read-only filesystem)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def test_a_read_only_build_folder_is_one_line_for_doit_and_verify(tmp_path, read_only_folder):
    project = make_project(tmp_path / "project")
    remount_read_only(read_only_folder)
    for args in (["list"], ["verify"], []):
        result = doit(project, *args, f"build.dir={read_only_folder}", check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout, args
        assert "Read-only file system" in result.stderr and "build.dir" in result.stderr


def test_a_read_only_build_folder_of_this_project_is_one_line_at_the_lock(tmp_path, read_only_folder):
    project = make_project(tmp_path / "project")
    claim(read_only_folder, "build", "build.dir", project)
    remount_read_only(read_only_folder)
    result = doit(project, "verify", f"build.dir={read_only_folder}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert "cannot take the build lock (Read-only file system)" in result.stderr


def test_doit_clean_removes_a_stage_output_but_never_a_folder_it_did_not_publish(tmp_path):
    project = make_project(tmp_path / "project")
    doit(project, "list")  # claims build/tiny
    foreign = project / "build/tiny/package"
    foreign.mkdir()
    (foreign / "slides.pptx").write_bytes(b"PK")
    result = doit(project, "clean", "evaluate", check=False)
    assert "is not an output of this build" in result.stderr and "Traceback" not in result.stderr
    assert (foreign / "slides.pptx").read_bytes() == b"PK"
    published = project / "build/tiny/export"
    published.mkdir()
    (published / "MANIFEST.json").write_text("{}")
    doit(project, "clean", "export")
    assert not published.exists()
