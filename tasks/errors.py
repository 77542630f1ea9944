"""The one exception type a user is meant to see.

A ``PipelineError`` is printed as a single line (problem + fix) and the process exits non-zero;
anything else is a bug and keeps its traceback. Its text goes through ``tasks.secrets.redact``, so a
message built from a library's error or a URI never shows a credential.
"""

from tasks.secrets import redact


class PipelineError(Exception):
    """Bad input or environment: message names the problem and how to fix it."""

    exit_code = 2

    def __str__(self) -> str:
        return redact(super().__str__())
