"""Re-hash every published stage output against its MANIFEST.json.

doit trusts a stage while its MANIFEST.json is unchanged; a file damaged later inside the folder (disk
fault, a stray edit) would go unnoticed. ``doit verify`` names every missing, extra or changed file,
a manifest that does not parse or does not have a manifest's shape, and a stage folder that holds
files but no manifest (doit does not replace such a folder: it may not be ours; the message says to
move it out of the build folder); for a damaged stage it moves
its manifest aside (MANIFEST.stale.json), and those of every stage after it, so the next ``doit``
rebuilds exactly those stages.
"""

from __future__ import annotations

import logging
import os

from tasks.errors import PipelineError
from tasks.manifest import MANIFEST, STALE_MANIFEST, DamagedManifest, file_table, read_manifest
from tasks.paths import Paths
from tasks.stages import STAGES, Stage, upstream_closure

log = logging.getLogger("tasks.verify")


def differences(listed: dict, actual: dict) -> list[str]:
    problems = [f"missing {name}" for name in sorted(listed.keys() - actual.keys())]
    problems += [f"extra {name}" for name in sorted(actual.keys() - listed.keys())]
    problems += [f"changed {name}" for name in sorted(listed.keys() & actual.keys()) if listed[name] != actual[name]]
    return problems


def find_damage(paths: Paths, stages: tuple[Stage, ...] = STAGES) -> dict[str, list[str]]:
    """{stage: problems} for every published stage whose files differ from its manifest (read only)."""
    damaged: dict[str, list[str]] = {}
    for stage in stages:
        folder = paths.stage(stage.name)
        if not (folder / MANIFEST).is_file():
            if folder.is_dir() and not (folder / STALE_MANIFEST).exists() and any(folder.iterdir()):
                # Files without a manifest: nothing to check them against, and doit will not replace a
                # folder that does not prove it is a stage output (it may be someone's own).
                damaged[stage.name] = [f"{MANIFEST} is missing: its files cannot be checked and doit will not "
                                       "replace the folder; move it out of the build folder and run doit"]
            continue
        try:
            listed = read_manifest(folder)["files"]
        except (DamagedManifest, OSError) as exc:
            damaged[stage.name] = [f"damaged {MANIFEST}: {exc}"]
            continue
        problems = differences(listed, file_table(folder))
        if problems:
            damaged[stage.name] = problems
    return damaged


def verify(paths: Paths, stages: tuple[Stage, ...] = STAGES) -> dict[str, list[str]]:
    """{stage: problems} for every damaged stage; damaged stages and their dependents are made stale."""
    damaged = find_damage(paths, stages)
    stale = [s.name for s in stages if s.name in damaged or set(upstream_closure(s.name, stages)) & damaged.keys()]
    for name in stale:
        if paths.manifest(name).is_file():  # kept for inspection; the stage is rebuilt over it
            os.replace(paths.manifest(name), paths.stage(name) / STALE_MANIFEST)
    for name, problems in damaged.items():
        print(f"{name}: {'; '.join(problems)}")
    if damaged:
        raise PipelineError(f"damaged outputs in {', '.join(damaged)}; marked stale: {', '.join(stale)}; run `doit` to rebuild them")
    print(f"verify: every stage output in {paths.build} matches its manifest")
    return damaged
