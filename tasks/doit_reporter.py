"""doit console output: one line per failure instead of doit's multi-line dump, and a summary at the end.

A stage that fails prints its own one-line ``error: ...``; we add one line naming the task. Errors
that doit raises itself (a missing input file, a broken dependency) become one ``error:`` line too.
A run that touched stages ends with what ran (and which were restored from the run cache), what was
already up to date, how long it took, where the package is and what to run next.
"""

import time
from pathlib import Path

from doit.reporter import ConsoleReporter


class StageReporter(ConsoleReporter):
    logs = "<build.dir>/logs/"
    """Where the stage logs are (dodo.py sets it through reporter_for)."""
    package = "<build.dir>/package"
    stages: tuple[str, ...] = ()

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self._start = time.monotonic()
        self._ran: dict[str, float] = {}
        self._began: dict[str, float] = {}
        self._uptodate: list[str] = []
        self._failed: list[str] = []

    def execute_task(self, task):
        super().execute_task(task)
        self._began[task.name] = time.monotonic()

    def add_success(self, task):
        super().add_success(task)
        if task.name in self._began:
            self._ran[task.name] = time.monotonic() - self._began[task.name]

    def add_failure(self, task, fail_info):
        super().add_failure(task, fail_info)
        self._failed.append(task.name)

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        self._uptodate.append(task.name)

    def _restored(self, name: str) -> bool:
        log = Path(self.logs) / f"{name}.log"
        try:
            return "restored from the run cache" in log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False

    def complete_run(self):
        super().complete_run()
        ran = [n for n in self._ran if n in self.stages]
        fresh = [n for n in self._uptodate if n in self.stages]
        if self._failed or not (ran or fresh):
            return
        took = time.monotonic() - self._start
        if not ran:
            self.write(f"summary: nothing to do, all {len(fresh)} stages up to date; package: {self.package}\n")
            return
        restored = [n for n in ran if self._restored(n)]
        built = ", ".join(f"{n} {self._ran[n]:.1f}s" for n in ran)
        self.write(f"summary: built {built} ({took:.1f}s in all)"
                   + (f"; restored from the run cache: {', '.join(restored)}" if restored else "")
                   + (f"; up to date: {', '.join(fresh)}" if fresh else "") + "\n")
        if Path(self.package, "report.md").is_file():
            self.write(f"summary: package {self.package} (report.md, README.md); next: "
                       f"python -m tasks chat --package {self.package}\n")

    def _write_failure(self, result, write_exception=True):
        task, exc = result["task"].name, result["exception"]
        if exc.get_name() == "TaskFailed":  # the action ran and already explained itself
            self.write(f"FAILED: {task}: see the error above (stage logs: {self.logs})\n")
            return
        detail = " ".join(exc.get_msg().split()).removeprefix("ERROR: ")
        self.write(f"FAILED: {task}\n")
        self.outstream.flush()
        import sys

        sys.stderr.write(f"error: {detail}; run `doit info {task}` for its dependencies\n")


def reporter_for(logs: str, package: str = StageReporter.package, stages: tuple[str, ...] = ()) -> type[StageReporter]:
    """The reporter class doit instantiates itself, naming this build's log folder, package and stages."""
    return type("StageReporter", (StageReporter,), {"logs": logs, "package": package, "stages": tuple(stages)})
