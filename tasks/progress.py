"""Progress of long stage loops: step count, rate and ETA as log lines (they land in the stage log too).

Why not tqdm or rich: a stage's terminal is often not a terminal (doit's captured output, a Ray
worker's forwarded log, a CI log), where a redrawn bar turns into hundreds of lines; and the same
progress must be in the stage log. About ten plain log lines per loop serve all of these.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

log = logging.getLogger("progress")


@contextlib.contextmanager
def step_progress(name: str, total: int, reports: int = 10) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(note)``; about ``reports`` lines are logged over the whole loop."""
    start = time.monotonic()
    every = max(1, total // reports)
    done = 0

    def advance(note: str = "") -> None:
        nonlocal done
        done += 1
        if done % every and done != total:
            return
        elapsed = time.monotonic() - start
        eta = elapsed / done * (total - done)
        log.info("%s: %d/%d (%d%%) %.1fs elapsed, ETA %.1fs %s", name, done, total, 100 * done // total, elapsed, eta, note)

    yield advance
