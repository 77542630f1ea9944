"""The one exception type a user is meant to see.

A ``PipelineError`` is printed as a single line (problem + fix) and the process exits non-zero;
anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Bad input or environment: message names the problem and how to fix it."""

    exit_code = 2
