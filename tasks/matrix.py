"""Experiment matrix: a small grid of config values, one build folder per point, one comparison.

    [matrix.finetune]
    rank = [4, 16]
    learning_rate = [0.001, 0.002]

``doit matrix`` builds every point (the cross product) into ``<build.dir>/matrix/<point>/`` with that
point's overrides; stages a point shares with an earlier build (here base and quantize) are restored
from the run cache, not recomputed. The first point builds alone, the others after it, concurrently
with ``doit -n N matrix``. Then ``comparison.{json,md,png}`` in ``<build.dir>/matrix/`` compare held-out
loss, the adapter's effect, package size and decode speed.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import PipelineError
from tasks.manifest import MANIFEST
from tasks.paths import PACKAGE_FOLDER

MAX_POINTS = 64


@dataclass(frozen=True)
class Point:
    slug: str
    overrides: tuple[str, ...]
    values: dict


def flatten(grid: dict, prefix: str = "") -> dict[str, list]:
    """{"finetune": {"rank": [4, 8]}} -> {"finetune.rank": [4, 8]}."""
    flat: dict[str, list] = {}
    for key, value in grid.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _toml_value(value) -> str:
    return json.dumps(value)  # JSON scalars are TOML scalars (true/false, numbers, "strings")


def _slug_part(key: str, value) -> str:
    text = f"{key.split('.')[-1]}-{value}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def points(grid: dict) -> list[Point]:
    flat = flatten(grid)
    if not flat:
        return []
    combos = list(itertools.product(*flat.values()))
    result = []
    for combo in combos:
        values = dict(zip(flat, combo))
        result.append(Point("__".join(_slug_part(k, v) for k, v in values.items()),
                            tuple(f"{k}={_toml_value(v)}" for k, v in values.items()), values))
    return result


def check_grid(grid: dict) -> None:
    """Raise ValueError (shown as one config line) for a grid that is not a small set of overrides of
    stage settings (tasks/config.py then validates each point as a whole config)."""
    flat = flatten(grid)
    for key, values in flat.items():
        if key.split(".")[0] in ("build", "publish", "cache", "matrix"):
            raise ValueError(f"matrix.{key}: only stage settings can vary (model, data, quantize, finetune, export, evaluate)")
        if not isinstance(values, list) or not values:
            raise ValueError(f"matrix.{key} must be a non-empty list of values, e.g. [4, 8]")
        if len(set(map(_toml_value, values))) != len(values):
            raise ValueError(f"matrix.{key} lists a value twice")
    count = 1
    for values in flat.values():
        count *= len(values)
    if count > MAX_POINTS:
        raise ValueError(f"the matrix has {count} points; at most {MAX_POINTS}: make the grid smaller")


def point_build_dir(build_dir: str, point: Point) -> str:
    return f"{build_dir}/matrix/{point.slug}"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def point_row(root: Path, build_dir: str, point: Point, target: str) -> dict:
    package = root / point_build_dir(build_dir, point) / PACKAGE_FOLDER
    row = {"point": point.slug, **point.values}
    if not (package / MANIFEST).is_file():
        return {**row, "built": False}
    report = json.loads((package / "report.json").read_text(encoding="utf-8"))["targets"].get(target, {})
    speed = json.loads((package / "speed.json").read_text(encoding="utf-8"))["decode_tokens_per_s"].get(target, {})
    loss = report.get("loss", {})
    return {
        **row,
        "built": True,
        "heldout_loss_base": loss.get("without_adapter", {}).get("loss"),
        "heldout_loss_adapter": loss.get("with_adapter", {}).get("loss"),
        "adapter_max_logit_shift": report.get("max_logit_shift_from_adapter"),
        "package_mb": round(_size(package / target) / 1e6, 2),
        "adapter_mb": round(sum(p.stat().st_size for p in (package / target).glob("*.onnx_adapter")) / 1e6, 3),
        "tokens_per_s_adapter": speed.get("with_adapter"),
    }


COLUMNS = ("heldout_loss_base", "heldout_loss_adapter", "adapter_max_logit_shift", "package_mb", "adapter_mb",
           "tokens_per_s_adapter")


def write_comparison(root: Path, build_dir: str, grid: dict, target: str) -> Path:
    """comparison.json / .md / .png next to the point folders; returns the folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(grid)
    if not pts:
        raise PipelineError("no [matrix] in the config: add e.g. [matrix.finetune] rank = [4, 16]")
    rows = [point_row(root, build_dir, p, target) for p in pts]
    out = root / build_dir / "matrix"
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps({"target": target, "points": rows}, indent=2) + "\n", encoding="utf-8")
    keys = list(flatten(grid))
    header = ["point", *keys, *COLUMNS]
    lines = [f"# Experiment matrix ({target})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("not built" if (c in COLUMNS and not row["built"]) else str(row.get(c, ""))
                                       for c in header) + " |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    built = [r for r in rows if r["built"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3, 0.45 * len(built) + 1.5)))
    names = [r["point"] for r in built]
    for ax, (column, label) in zip(axes, (("heldout_loss_adapter", "held-out loss with adapter (lower is better)"),
                                         ("adapter_mb", "adapter size (MB)"),
                                         ("tokens_per_s_adapter", "decode tokens/s with adapter"))):
        values = [r[column] or 0 for r in built]
        bars = ax.barh(names, values)
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=8, padding=2)
        if column.startswith("heldout_loss") and values:
            # losses differ in the second decimal: an axis from zero would draw 6.78 and 6.56 as equal bars
            lo, hi = min(values), max(values)
            pad = max((hi - lo) * 0.6, 0.02 * hi, 1e-3)
            ax.set_xlim(lo - pad, hi + pad)
        else:
            ax.set_xlim(0, max(values or [1]) * 1.25 or 1)
        ax.set_title(label, fontsize=9)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
    return out
