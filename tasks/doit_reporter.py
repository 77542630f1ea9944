"""doit console output without doit's multi-line failure dump.

A stage that fails prints its own one-line ``error: ...``; we add one line naming the task. Errors
that doit raises itself (a missing input file, a broken dependency) become one ``error:`` line too.
"""

from doit.reporter import ConsoleReporter


class StageReporter(ConsoleReporter):
    logs = "<build.dir>/logs/"
    """Where the stage logs are (dodo.py sets it through reporter_for)."""

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


def reporter_for(logs: str) -> type[StageReporter]:
    """The reporter class doit instantiates itself, naming this build's log folder."""
    return type("StageReporter", (StageReporter,), {"logs": logs})
