"""Run cache: outputs stored by what produced them and restored instead of recomputed, with the real
tiny pipeline; damaged entries, concurrent writers, size limit, sharing between projects."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.manifest import file_table, read_manifest
from tasks.paths import Paths
from tasks.run_cache import RunCache
from tests.conftest import STAGES, doit, executed, make_project, manifest_digests

pytestmark = pytest.mark.slow
RESTORED = "restored from the run cache"
KEY = "0123456789abcdef" * 4  # the shape of a real cache key (sha256 hex)


def restored(result) -> list[str]:
    """Stages whose output came from the run cache (the runner logs it)."""
    return [stage for stage in STAGES if f"{stage}: {RESTORED}" in result.stderr + result.stdout]


def cache_of(project: Path, *overrides: str) -> RunCache:
    cfg = load_config(project / "pipeline.toml", list(overrides))
    return RunCache.of(Paths.of(project, cfg), cfg)


def test_switching_a_parameter_and_back_rebuilds_nothing_the_second_time(project_copy):
    first = manifest_digests(project_copy)
    changed = doit(project_copy, "finetune.rank=16")
    assert executed(changed) == ["finetune", "export", "evaluate"] and restored(changed) == []
    back = doit(project_copy)
    assert executed(back) == ["finetune", "export", "evaluate"]
    assert restored(back) == ["finetune", "export", "evaluate"]
    this_run, _, original = (project_copy / "build/tiny/logs/finetune.log").read_text().partition(
        "log of the run that built this output:")
    assert "step" not in this_run.lower()  # no training ran
    assert "step 100: train loss" in original  # and the log of the training that made the adapter is kept
    assert manifest_digests(project_copy) == first


def test_a_damaged_cache_entry_is_dropped_and_the_stage_computed_again(project_copy):
    first = manifest_digests(project_copy)
    doit(project_copy, "finetune.rank=16")
    cache = cache_of(project_copy)
    entry = next(e for _, _, e in cache.entries()
                 if e.parent.name == "finetune" and read_manifest(e)["config"]["finetune"]["rank"] == 8)
    weights = next(p for p in entry.rglob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    back = doit(project_copy)
    assert "run cache entry" in back.stderr and "damaged" in back.stderr
    assert "finetune" not in restored(back)
    assert manifest_digests(project_copy) == first  # recomputed, and the same bytes as before


def test_a_second_project_sharing_the_cache_folder_builds_nothing(built_project, tmp_path):
    shared = f"cache.dir={built_project / '.cache/runs'}"
    other = make_project(tmp_path / "teammate")
    result = doit(other, shared)
    assert restored(result) == list(STAGES)
    assert manifest_digests(other) == manifest_digests(built_project)
    assert doit(other, "verify", shared).returncode == 0


def test_the_cache_can_be_turned_off(tmp_path):
    project = make_project(tmp_path / "nocache")
    doit(project, "cache.enabled=false", "base")
    assert not (project / ".cache").exists()


def _store(args) -> None:
    root, output, barrier = args
    barrier.wait()
    RunCache(Path(root), 1 << 40).store("finetune", KEY, Path(output))


def test_concurrent_writers_leave_one_complete_entry(built_project, tmp_path):
    output = built_project / "build/tiny/finetune"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            pool.map(_store, [(str(tmp_path / "cache"), str(output), barrier)] * 4)
    entries = [p.name for p in (tmp_path / "cache/finetune").iterdir()]
    assert entries == [KEY]  # no second copy, no writer's leftovers
    entry = tmp_path / "cache/finetune" / entries[0]
    assert file_table(entry) == read_manifest(output)["files"]


def test_gc_removes_least_recently_used_entries_first(built_project, tmp_path):
    cache = RunCache(tmp_path / "cache", 1 << 40)
    for age, stage in enumerate(("export", "finetune", "quantize")):
        cache.store(stage, KEY, built_project / "build/tiny" / stage)
        os.utime(cache.entry(stage, KEY), (1_000_000 + age, 1_000_000 + age))  # export oldest
    sizes = {e.parent.name: size for _, size, e in cache.entries()}
    removed, freed = cache.gc(max_bytes=sizes["finetune"] + sizes["quantize"])
    assert (removed, freed) == (1, sizes["export"])
    assert sorted(e.parent.name for _, _, e in cache.entries()) == ["finetune", "quantize"]
