"""doit console output without doit's multi-line failure dump: the stage already printed its own
one-line error; we add one line saying which task failed."""

from doit.reporter import ConsoleReporter


class StageReporter(ConsoleReporter):
    def _write_failure(self, result, write_exception=True):
        task = result["task"].name
        self.write(f"FAILED: {task}: see the error above; earlier outputs are unchanged (stage logs: <build.dir>/logs/)\n")
