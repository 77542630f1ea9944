"""doit's state database on a full disk: one clear line instead of doit's internal traceback.

doit writes its sqlite3 state after each task. When the build folder's disk is full, that write
fails inside doit's runner, which would print a traceback. sqlite rolls the write back, so the
database stays consistent and the published outputs are intact (they are written atomically); the
user only needs to free space and run doit again, which is what the one line says.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

DISK_WORDS = ("full", "disk i/o", "no space")


def guard_state_database(dep_file: Path) -> None:
    from doit.dependency import SqliteDB

    reported = []

    def guarded(method):
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not any(word in str(exc).lower() for word in DISK_WORDS):
                    raise
                if not reported:
                    reported.append(exc)
                    sys.stderr.write(
                        f"error: doit could not record this run in {dep_file} ({exc}); free disk space and run doit "
                        "again: published outputs are intact and the database is unchanged\n")
                raise SystemExit(2) from None
        return wrapper

    if not getattr(SqliteDB, "_disk_guarded", False):
        for name in ("dump", "remove", "remove_all"):
            setattr(SqliteDB, name, guarded(getattr(SqliteDB, name)))
        SqliteDB._disk_guarded = True
