"""Config overrides given on doit's command line (``doit finetune.rank=16``).

doit hands every ``NAME=VALUE`` argument to dodo.py as a command-line variable; those whose name
contains a dot are config keys. doit 0.37 offers only get_var(name), so the full set is read from its
variable table (pinned doit version; tests/test_cli.py covers this).
"""

from __future__ import annotations


PLAIN_VARS = ("config",)  # doit variables of ours that are not config keys


def config_overrides() -> list[str]:
    """``section.key=value`` arguments of doit's command line. Any other ``NAME=VALUE`` is a mistake
    (``doit rank=16`` would otherwise be ignored in silence): one line naming the key it probably meant."""
    from doit import doit_cmd

    from tasks.errors import PipelineError

    # doit 0.37 has get_var(name) only, no way to list the variables; its table is read directly
    # (pinned doit; tests/test_config.py fails if a doit upgrade moves it)
    table = doit_cmd._CMDLINE_VARS or {}
    for name in sorted(table):
        if "." not in name and name not in PLAIN_VARS:
            raise PipelineError(f"command line: {name}={table[name]} is not a config key; config keys have a "
                                f"section{_did_you_mean(name)}")
    return [f"{name}={value}" for name, value in sorted(table.items()) if "." in name]


def _did_you_mean(name: str) -> str:
    import difflib

    from tasks.config_doc import fields

    keys = [key for key, _, _ in fields()]
    same = [key for key in keys if key.rsplit(".", 1)[-1] == name]
    close = same or difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.7)
    if not close:
        return ""
    full = same or [k for k in keys if k.rsplit(".", 1)[-1] == close[0]]
    return f": did you mean {' or '.join(full[:3])}?"
