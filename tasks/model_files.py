"""Which files of a model folder (a Hub snapshot or a local folder) the build takes."""

from __future__ import annotations

import fnmatch
from pathlib import Path

# Safetensors weights, configs, tokenizer files and the card; pickled weights (*.bin, *.pt) never.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.md"]


def patterns(trust_remote_code: bool) -> list[str]:
    return HUB_PATTERNS + (["*.py"] if trust_remote_code else [])  # the model's own code only when allowed


def model_files(folder: Path, trust_remote_code: bool) -> list[Path]:
    """The files of ``folder`` the build takes, sorted (a .cache folder inside it is skipped)."""
    wanted = patterns(trust_remote_code)
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and ".cache" not in p.parts
                  and any(fnmatch.fnmatch(p.relative_to(folder).as_posix(), pat) for pat in wanted))
