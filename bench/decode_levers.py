"""Decode levers on a built cuda package: what removing the longrope If node and capturing CUDA graphs gives.

    python bench/decode_levers.py build/gpu-bench/build/package/cuda --adapter travel --out levers.json

Variants, each a scratch copy of the package (the package itself is not touched):
  as_built        the package as the export stage wrote it
  fixed_context   the If node that switches longrope's short/long cos-sin caches replaced by the short
                  caches (valid up to original_max_position_embeddings tokens of context); only for
                  graphs that have that node (Phi-3 longrope), skipped for the others (plain RoPE)
  cuda_graph      fixed_context (or as_built, where there is no If node) plus onnxruntime-genai's CUDA
                  graph capture (enable_cuda_graph)
Each is timed without and with the adapter: batch 1, 128 prompt tokens, 256 new, greedy, best of 3.
A variant that fails to load or run is reported with its error, not hidden.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import context_limit  # noqa: E402
from tasks.manifest import clone_file  # noqa: E402

PROMPT, NEW = 128, 256


def copy_package(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name in ("model.onnx", "genai_config.json"):
            shutil.copy2(item, dst / item.name)
        else:  # copies (clones): ONNX Runtime refuses external data reached through a symlink
            clone_file(item, dst / item.name)
    return dst


def has_context_switch(folder: Path) -> bool:
    return context_limit.has_context_switch(folder / "model.onnx")


def fix_context(folder: Path) -> int:
    """Replace the longrope If node by its short-context branch's constants, as export.max_context does
    (tasks/context_limit.py); return the context bound the If compared against."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    _, switch = context_limit._context_switch(graph)
    if switch is None:
        raise SystemExit("no longrope If node producing cos_cache/sin_cache in this graph")
    # The bound of Greater(total length, bound): original_max_position_embeddings.
    greater = next((n for n in graph.node if n.output and n.output[0] == switch.input[0]), None)
    bound = greater.input[1].rsplit("/", 1)[-1] if greater is not None else ""
    context_limit.fold_context_switch(folder / "model.onnx")
    return int(bound) if bound.isdigit() else 0


def enable_cuda_graph(folder: Path) -> None:
    config = json.loads((folder / "genai_config.json").read_text())
    context_limit.enable_cuda_graph(config)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))


def time_decode(folder: Path, adapter_file: Path | None, adapter_name: str | None) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = None
    if adapter_file:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), adapter_name)
    prompt = list(range(100, 100 + PROMPT))
    best = None
    for i in range(4):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=PROMPT + NEW, min_length=PROMPT + NEW, do_sample=False)
        gen = og.Generator(model, params)
        if adapters:
            gen.set_active_adapter(adapters, adapter_name)
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        start, n = time.perf_counter(), 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        rate = n / (time.perf_counter() - start)
        if i:
            best = max(best or 0, rate)
        tokens = list(gen.get_sequence(0))[PROMPT:]
        del gen, params
    return {"decode_tokens_per_s": round(best, 1), "first_tokens": [int(t) for t in tokens[:8]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--adapter", default="travel", help="adapter name; <package>/<name>.onnx_adapter")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # Beside the package (same filesystem: clones where it supports them).
    scratch = Path(tempfile.mkdtemp(prefix=".decode-levers-", dir=args.package.parent))
    results: dict = {}
    try:
        variants = {}
        variants["as_built"] = copy_package(args.package, scratch / "as_built")
        switch = has_context_switch(args.package)
        results["has_longrope_if"] = switch
        if switch:
            fixed = copy_package(args.package, scratch / "fixed_context")
            results["context_bound"] = fix_context(fixed)
            variants["fixed_context"] = fixed
        graph = copy_package(args.package, scratch / "cuda_graph")
        if switch:
            fix_context(graph)
        enable_cuda_graph(graph)
        variants["cuda_graph"] = graph
        adapter_file = args.package / f"{args.adapter}.onnx_adapter"
        for name, folder in variants.items():
            results[name] = {}
            # A package without the adapter file (the model builder's plain one): without it only.
            runs = (("without_adapter", None), ("with_adapter", adapter_file)) if adapter_file.is_file() else (("without_adapter", None),)
            for label, adapter in runs:
                try:
                    results[name][label] = time_decode(folder, adapter, args.adapter if adapter else None)
                except Exception as exc:  # a lever that does not work is a finding
                    results[name][label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                print(f"{name} {label}: {results[name][label]}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
