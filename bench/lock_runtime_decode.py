"""Decode built packages with whatever onnxruntime / onnxruntime_genai `import` finds, and record which
runtime that was: the versions, the providers and the CUDA libraries mapped into the process
(/proc/self/maps), the tokens and the decode speed. Imports no torch (torch would map its own CUDA).

Run once per runtime, the second time with --reference on the first one's JSON to compare the tokens:

    python3 bench/lock_runtime_decode.py --variant switchable_inactive=/root/dm/project/build/switchable/package/cuda \
        --variant switchable_active=/root/dm/project/build/switchable/package/cuda:adapter \
        --out cuda13.json
    python3 bench/lock_runtime_decode.py --variant ... --reference cuda13.json --out lock.json

A variant is NAME=PACKAGE_DIR, or NAME=PACKAGE_DIR:adapter to activate the package's *.onnx_adapter.
Batch 1, --prompt prompt tokens (the ids bench/decode_modes.py uses) then --new tokens, greedy; the rate
is the best of --repeats runs after a warm-up; the tokens are those of the last run. The untimed warm-up
keeps the top logits of its first --logit-steps steps, so that two runtimes' numbers can be compared with a
tolerance up to the first token where they part (a near-tie that rounding tips either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path


def loaded_libraries() -> list[str]:
    pattern = re.compile(r"lib(cublas|cublasLt|cudart|cudnn|cufft|curand|nvrtc|nvJitLink|cuda|onnxruntime)[-_.a-z0-9]*\.so")
    paths = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and pattern.search(os.path.basename(parts[5])):
            paths.add(parts[5])
    return sorted(paths)


TOP_K = 8


def top_logits(logits, kept: list[dict]) -> None:
    """Append the TOP_K largest logits of the last position (ids and values) and the gap between the first
    two to ``kept``."""
    import numpy as np

    out = np.asarray(logits, dtype=np.float32)  # [batch, positions, vocab]
    last = out.reshape(-1, out.shape[-1])[-1]
    top = np.argsort(last)[::-1][:TOP_K]
    kept.append({"ids": [int(i) for i in top], "values": [round(float(last[i]), 5) for i in top],
                 "gap_1_2": round(float(last[top[0]] - last[top[1]]), 5)})


def compare_logits(ours: list[dict], ref: list[dict]) -> dict:
    """Up to the first step where the greedy tokens part (after it the two runs see different inputs): the
    largest difference of a logit both runs kept, and the top-1 gap where they part."""
    worst, parted = 0.0, None
    for step, (a, b) in enumerate(zip(ours, ref)):
        shared = set(a["ids"]) & set(b["ids"])
        va, vb = dict(zip(a["ids"], a["values"])), dict(zip(b["ids"], b["values"]))
        worst = max([worst, *(abs(va[i] - vb[i]) for i in shared)])
        if a["ids"][0] != b["ids"][0]:
            parted = {"step": step, "gap_1_2": a["gap_1_2"], "reference_gap_1_2": b["gap_1_2"]}
            break
    return {"steps_compared": step + 1 if ours and ref else 0, "max_abs_logit_diff": round(worst, 5),
            "parted_at": parted}


def decode(folder: Path, adapter_file: Path | None, prompt: int, new: int, repeats: int,
           logit_steps: int = 0) -> dict:
    """Batch 1, ``prompt`` fixed prompt ids then ``new`` greedy tokens, ``adapter_file`` active if given; the
    rate is the best of ``repeats`` runs after a warm-up, the tokens those of the last run. The untimed
    warm-up also keeps the top logits of its first ``logit_steps`` steps (``top_logits``; a runtime that
    cannot hand them out gets ``top_logits_error``). Also bench/decode_modes.py's decode: it imports nothing
    but numpy and onnxruntime_genai."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = None
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "a")
    ids = np.arange(100, 100 + prompt, dtype=np.int32)[None] % 1000 + 10
    rates, tokens, kept, logit_error = [], [], [], None
    for i in range(repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + new, min_length=prompt + new, do_sample=False)
        gen = og.Generator(model, params)
        if adapters is not None:
            gen.set_active_adapter(adapters, "a")
        gen.append_tokens(ids)
        start, n = time.perf_counter(), 0
        while not gen.is_done():
            if not i and n < logit_steps and logit_error is None:
                try:
                    top_logits(gen.get_output("logits"), kept)
                except Exception as error:  # noqa: BLE001 - keep the rates of a runtime that cannot hand out logits
                    logit_error = f"{type(error).__name__}: {error}"
            gen.generate_next_token()
            n += 1
        if i:  # the first run warms up
            rates.append(n / (time.perf_counter() - start))
        tokens = [int(t) for t in gen.get_sequence(0)[prompt:]]
        del gen, params
    result = {"decode_tokens_per_s": round(max(rates), 1), "runs": [round(r, 1) for r in rates], "tokens": tokens}
    if logit_error:
        result["top_logits_error"] = logit_error
    elif logit_steps:
        result["top_logits"] = kept
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=DIR[:adapter]")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logit-steps", type=int, default=16, help="steps whose top logits are kept (0: none)")
    parser.add_argument("--reference", type=Path, help="an earlier run's JSON: compare the tokens with it")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import onnxruntime as ort
    import onnxruntime_genai as og

    results = {}
    for spec in args.variant:
        name, _, where = spec.partition("=")
        folder, _, flag = where.partition(":")
        adapter = next(Path(folder).glob("*.onnx_adapter")) if flag == "adapter" else None
        results[name] = decode(Path(folder), adapter, args.prompt, args.new, args.repeats, args.logit_steps)
        print(name, results[name]["decode_tokens_per_s"], results[name]["runs"], flush=True)
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        "onnxruntime": {"version": ort.__version__, "file": ort.__file__, "providers": ort.get_available_providers()},
        "onnxruntime_genai": {"version": og.__version__, "file": og.__file__},
        "loaded_libraries": loaded_libraries(),
        "env": {k: os.environ.get(k) for k in ("LD_LIBRARY_PATH", "PYTHONPATH", "CUDA_MODULE_LOADING")},
        "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
        "results": results,
    }
    if args.reference:
        ref = json.loads(args.reference.read_text())
        out["reference"] = {k: ref[k] for k in ("date", "onnxruntime", "onnxruntime_genai", "loaded_libraries")}
        out["reference"]["results"] = {k: {"decode_tokens_per_s": v["decode_tokens_per_s"], "runs": v["runs"]}
                                       for k, v in ref["results"].items()}
        out["tokens_equal_reference"] = {k: v["tokens"] == ref["results"][k]["tokens"]
                                         for k, v in results.items() if k in ref["results"]}
        out["logits_vs_reference"] = {k: compare_logits(v["top_logits"], ref["results"][k]["top_logits"])
                                      for k, v in results.items()
                                      if "top_logits" in v and "top_logits" in ref["results"].get(k, {})}
    text = json.dumps(out, indent=2)
    print(json.dumps({k: out[k] for k in out if k != "results"}, indent=2))
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
