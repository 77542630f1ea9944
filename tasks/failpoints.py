"""Failpoints: named places where the fault-injection trials stop a build process on purpose.

A test and reliability hook in the manner of fail-rs or FoundationDB's failpoints, never set in a normal
build. Some windows in which a SIGKILL matters last microseconds (between the two renames of a publish
swap, say); a kill at a random moment will practically never land there. So the code calls
``failpoint(NAME)`` at those places. When the environment variable ``PIPELINE_FAILPOINT`` equals NAME,
the process writes a small JSON marker file (its path in ``PIPELINE_FAILPOINT_FILE``: the name, the
pid, the time) and sleeps, so that the trial (tools/fault_trials.py) sees the marker and SIGKILLs the
whole process group exactly there. Otherwise a failpoint costs one dictionary lookup and does nothing.

The failpoints:

``manifest.written``  tasks/manifest.py, staged_output: the staging folder holds the whole output and
                      its MANIFEST.json (computed, or restored from the run cache); nothing sealed or
                      renamed yet.
``publish.swap``      tasks/manifest.py, staged_output: between the two renames that replace an existing
                      output: the old one is renamed away, the new one not yet into place (the stage is
                      absent).
``cache.restore``     tasks/run_cache.py, RunCache.restore: some of the entry's files are cloned into the
                      staging folder, the others and the manifest not yet.
``cache.store``       tasks/run_cache.py, RunCache.store: the entry is copied whole into its temporary
                      folder, before the rename that makes it an entry.
"""

from __future__ import annotations

import json
import os
import time

from tasks.paths import ENV_FAILPOINT, ENV_FAILPOINT_FILE

ENV = ENV_FAILPOINT
FILE_ENV = ENV_FAILPOINT_FILE
NAMES = ("manifest.written", "publish.swap", "cache.restore", "cache.store")
SLEEP_S = 300.0  # long enough for any trial to kill the process; a forgotten one ends by itself


def failpoint(name: str) -> None:
    """Stop here (marker file, then sleep) if PIPELINE_FAILPOINT names this point; else nothing."""
    if os.environ.get(ENV) != name:
        return
    marker = os.environ.get(FILE_ENV)
    if marker:
        tmp = f"{marker}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"failpoint": name, "pid": os.getpid(), "time": time.time()}, fh)
        os.replace(tmp, marker)  # the trial never reads half a marker
    time.sleep(SLEEP_S)
