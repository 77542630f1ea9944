"""doit up-to-date checks of our own."""

from __future__ import annotations

import json

from doit.tools import config_changed


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: node}


class ConfigKeys(config_changed):
    """doit's config_changed on the JSON of the config keys a stage reads (the same stored value, so
    existing doit state stays valid), which `doit info` shows as the keys that changed, old -> new,
    instead of the whole section."""

    changes = ""

    def __call__(self, task, values):
        same = super().__call__(task, values)
        old = values.get("_config_changed")
        if same or old is None:
            self.changes = "" if same else "never built with a recorded config"
            return same
        try:
            before, after = _flat(json.loads(old)), _flat(json.loads(self.config))
        except ValueError:
            self.changes = "the recorded config is not comparable"
            return same
        self.changes = "; ".join(f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
                                 for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key))
        return same

    def __repr__(self):
        return f"config changed: {self.changes}" if self.changes else "config_changed"
