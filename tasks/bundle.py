"""What ``doit publish`` uploads and ``doit fetch-package`` accepts back: a package bundle.

    <bundle>/                      the finished package exactly as built (its MANIFEST.json included),
        cpu/ ... README.md ...     so a downloaded version runs as it is
        provenance/
            base.MANIFEST.json ... export.MANIFEST.json   every upstream stage's manifest
            PUBLISH.json           package digest, each manifest's digest, lock, image, build environment

The package digest (sha256 of the package's MANIFEST.json) identifies a build: the manifest lists every
file's sha256 plus the config and the digests of the upstream manifests, which list theirs. A bundle
verifies itself: every package file against the package manifest, every provenance manifest against
PUBLISH.json, and every manifest's recorded inputs against the manifests it names (the chain).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.errors import PipelineError
from tasks.manifest import MANIFEST, file_table, clone_tree, manifest_digest, read_manifest, sha256_file
from tasks.paths import Paths
from tasks.provenance import lock_record, read_environment
from tasks.stages import STAGES, config_values, stages_for
from tasks.verify import differences, find_damage

PROVENANCE = "provenance"
PUBLISH_RECORD = f"{PROVENANCE}/PUBLISH.json"
PACKAGE_STAGE = STAGES[-1].name
FORMAT = 1


def _first_difference(built: dict, now: dict) -> str:
    for key in sorted(built.keys() | now.keys()):
        if built.get(key) != now.get(key):
            return f"{key}: built with {json.dumps(built.get(key))}, config now says {json.dumps(now.get(key))}"
    return ""


def check_publishable(paths: Paths, cfg: PipelineConfig) -> dict[str, str]:
    """Refuse (one line) a package that is incomplete, stale against the config, its inputs or its own
    upstream stages, or damaged on disk. Returns {stage: manifest sha256}."""
    stages = stages_for(cfg)
    missing = [s.name for s in stages if not paths.manifest(s.name).is_file()]
    if missing:
        raise PipelineError(f"nothing complete to publish in {paths.build}: {', '.join(missing)} not built; "
                            "run `doit` first")
    digests = {s.name: manifest_digest(paths.stage(s.name)) for s in stages}
    for stage in stages:
        built = read_manifest(paths.stage(stage.name))
        for up, digest in built.get("inputs", {}).items():
            if digests.get(up) != digest:
                raise PipelineError(f"the {stage.name} output was built from an earlier {up} output; run `doit` to "
                                    "bring the package up to date, then publish")
        change = _first_difference(built.get("config", {}), config_values(cfg, stage.keys_for(cfg)))
        if change:
            raise PipelineError(f"the package does not match the config ({change}); run `doit` to rebuild it, "
                                "or publish with the config it was built with")
        for rel, digest in built.get("input_files", {}).items():
            path = paths.data(rel)
            if not path.is_file() or sha256_file(path) != digest:
                raise PipelineError(f"input file {rel} changed since the {stage.name} stage was built; run `doit` "
                                    "to rebuild, then publish")
    damaged = find_damage(paths, stages)
    if damaged:
        stage, problems = next(iter(damaged.items()))
        raise PipelineError(f"the {stage} output differs from its manifest ({'; '.join(problems[:3])}); refusing to "
                            "publish it: run `doit verify` and `doit` to rebuild it")
    return digests


def publish_record(paths: Paths, cfg: PipelineConfig, digests: dict[str, str]) -> dict:
    """PUBLISH.json: no timestamps or hosts, so the same build always yields the same record."""
    package = read_manifest(paths.stage(PACKAGE_STAGE))
    environments = {name: read_environment(paths, name, digest) for name, digest in digests.items()}
    package_env = environments[PACKAGE_STAGE] or {}
    base = read_manifest(paths.stage("base")).get("facts", {})
    return {
        "format": FORMAT,
        "name": cfg.publish.name,
        "package_sha256": digests[PACKAGE_STAGE],
        "stages": digests,
        "adapter": cfg.export.adapter_name,
        "targets": list(package.get("config", {}).get("export.targets", cfg.export.targets)),
        "model": {key: base[key] for key in ("source", "profile", "repo_id", "commit", "parameters") if key in base},
        # The package stage's environment when it was recorded; else what this checkout pins now.
        "lock": package_env.get("lock") or lock_record(paths.root),
        "image_id": package_env.get("image_id"),
        "environment": environments,
    }


def make_bundle(paths: Paths, cfg: PipelineConfig, dest: Path) -> dict:
    """Check the build, then assemble its bundle in the empty folder ``dest``; returns PUBLISH.json's record."""
    digests = check_publishable(paths, cfg)
    clone_tree(paths.stage(PACKAGE_STAGE), dest)
    (dest / PROVENANCE).mkdir()
    for stage in stages_for(cfg)[:-1]:
        shutil.copyfile(paths.manifest(stage.name), dest / PROVENANCE / f"{stage.name}.{MANIFEST}")
    record = publish_record(paths, cfg, digests)
    (dest / PUBLISH_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    verify_bundle(dest, record["package_sha256"])  # what leaves is what was checked
    return record


def verify_bundle(folder: Path, expected_sha256: str | None = None) -> dict:
    """Check a bundle bit for bit (see the module doc); returns its PUBLISH.json record or raises
    PipelineError naming the first problem."""
    try:
        record = json.loads((folder / PUBLISH_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PipelineError(f"{folder} is not a package bundle: {PUBLISH_RECORD} missing or unreadable") from None
    stages = record.get("stages", {})
    if not (folder / MANIFEST).is_file():
        raise PipelineError(f"{folder}: the package's {MANIFEST} is missing")
    actual = manifest_digest(folder)
    if actual != record.get("package_sha256") or actual != stages.get(PACKAGE_STAGE):
        raise PipelineError(f"{folder}: the package manifest's sha256 {actual[:12]} is not the one {PUBLISH_RECORD} names")
    if expected_sha256 and not actual.startswith(expected_sha256):  # a Hub tag carries a 16-digit prefix
        raise PipelineError(f"{folder}: package sha256 {actual[:12]} is not the registered {expected_sha256[:12]}")
    files = {rel: entry for rel, entry in file_table(folder).items() if not rel.startswith(f"{PROVENANCE}/")}
    problems = differences(read_manifest(folder)["files"], files)
    expected_provenance = {f"{PROVENANCE}/{name}.{MANIFEST}" for name in stages if name != PACKAGE_STAGE}
    expected_provenance.add(PUBLISH_RECORD)
    present = {p.relative_to(folder).as_posix() for p in (folder / PROVENANCE).rglob("*") if p.is_file()}
    problems += [f"missing {rel}" for rel in sorted(expected_provenance - present)]
    problems += [f"extra {rel}" for rel in sorted(present - expected_provenance)]
    if problems:
        raise PipelineError(f"{folder}: {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}")
    manifests = {PACKAGE_STAGE: read_manifest(folder)}
    for name, digest in stages.items():
        if name == PACKAGE_STAGE:
            continue
        path = folder / PROVENANCE / f"{name}.{MANIFEST}"
        if sha256_file(path) != digest:
            raise PipelineError(f"{folder}: {path.name} is not the manifest {PUBLISH_RECORD} names")
        manifests[name] = json.loads(path.read_text(encoding="utf-8"))
    for name, body in manifests.items():
        for up, digest in body.get("inputs", {}).items():
            if stages.get(up) != digest:
                raise PipelineError(f"{folder}: the manifest chain is broken ({name} names a different {up})")
    return record
