"""Config overrides given on doit's command line (``doit finetune.rank=16``).

doit hands every ``NAME=VALUE`` argument to dodo.py as a command-line variable; those whose name
contains a dot are config keys. doit 0.37 offers only get_var(name), so the full set is read from its
variable table (pinned doit version; tests/test_cli.py covers this).
"""

from __future__ import annotations


def config_overrides() -> list[str]:
    from doit import doit_cmd

    table = doit_cmd._CMDLINE_VARS or {}
    return [f"{name}={value}" for name, value in sorted(table.items()) if "." in name]
