"""Benchmark: decode speed of each export.adapter_mode against the model builder's plain package and
transformers, on one device (CPU by default: on-device usually means CPU).

    .venv/bin/python bench/decode_modes.py --profile tiny --out bench/results/decode_modes_tiny_cpu.json
    .venv/bin/python bench/decode_modes.py --profile qwen2.5-0.5b-shape --max-steps 2 --batch-size 1 \
        --set quantize.calibration_samples=16 --out bench/results/decode_modes_qwen25_05b_shape_cpu.json
    python3 bench/decode_modes.py --device cuda --profile phi-3.5-mini-shape --context 4096 --max-steps 20 ...

One fresh project folder: the package built with export.adapter_mode = "switchable" and, into a second
build folder (base, quantize and finetune restored from the run cache), with "merged", both with
export.max_context = --context. Then, from the same AWQ checkpoint:
  plain            the model builder's package, lm_head kept in float as ours is (like with like)
  plain_int4_head  the builder's default, lm_head in int4 too
  constant_lora    our package with the adapter's values as initializers, no LoRA inputs: the LoRA
                   kernels' cost without onnxruntime's per-run handling of the adapter inputs
Every plain package is timed as built and fitted to --context as ours are (tasks/context_limit.py:
longrope's context switch folded; on cuda, the CUDA graph on). Decode: batch 1, --prompt prompt tokens
then --new tokens, greedy, best of --repeats after a warm-up. transformers: the float base and base +
LoRA (peft), greedy generate, the same token counts; fp32 with the dynamic cache on CPU, bf16 with the
static cache on cuda. --phases builds and times in separate calls (a GPU lease's 10-minute calls).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.harness import make_project  # noqa: E402


def run_doit(project: Path, *settings: str) -> None:
    result = subprocess.run([sys.executable, "-m", "doit", *settings], cwd=project, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise SystemExit(f"doit {' '.join(settings)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def og_decode(folder: Path, adapter_file: Path | None, prompt: int, new: int, repeats: int) -> dict:
    """The rates of bench/lock_runtime_decode.py's decode (its tokens are not part of this benchmark's JSON)."""
    from bench.lock_runtime_decode import decode

    result = decode(folder, adapter_file, prompt, new, repeats)
    del result["tokens"]
    return result


def hf_decode(model, prompt: int, new: int, repeats: int, device: str = "cpu") -> dict:
    """transformers' greedy generate, end to end and decode only. The decode-only rate takes the time of a
    one-token generate (the prefill and the first token) from that of a ``new``-token one: ``new - 1`` forward
    passes of one token each, as the ONNX packages' rate counts the steps after the prompt."""
    import torch

    ids = (torch.arange(100, 100 + prompt) % 1000 + 10)[None].to(device)

    def timed(tokens: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    end_to_end, decode_only = [], []
    for i in range(repeats + 1):
        first, total = timed(1), timed(new)
        if i:  # the first round warms up (and, with the static cache, compiles)
            end_to_end.append(new / total)
            decode_only.append((new - 1) / max(total - first, 1e-9))
    return {"decode_tokens_per_s": round(max(decode_only), 1), "runs": [round(r, 1) for r in decode_only],
            "end_to_end_tokens_per_s": round(max(end_to_end), 1), "end_to_end_runs": [round(r, 1) for r in end_to_end]}


def weight_bytes_per_token(folder: Path) -> int:
    """The bytes of initializers a decode step reads: every weight but a table that only Gather nodes use (the
    embedding: one row a token). The bandwidth limit of a package is the card's bandwidth over this."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if users.get(init.name) and users[init.name] <= {"Gather", "GatherBlockQuantized"}:
            continue
        external = {e.key: e.value for e in init.external_data}
        total += int(external["length"]) if "length" in external else len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def constant_lora(src: Path, dst: Path, adapter_dir: Path, quantize_dir: Path) -> Path:
    """A copy of the switchable package with the adapter's own values as initializers and no LoRA inputs:
    the LoRA kernels without onnxruntime's per-run handling of the adapter inputs. (The zero-width defaults
    this benchmark also rewrote once are what export writes since commit f697276.)"""
    import onnx
    from onnx import numpy_helper

    from tasks.export import _lora_sites, read_config

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data", "*.onnx_adapter"))
    model = onnx.load(str(src / "model.onnx"))
    graph = model.graph
    lora = {i.name for i in graph.input if ".lora_" in i.name}
    values = {}
    for _, _, a_name, b_name, _, a, b in _lora_sites(graph, adapter_dir, read_config(quantize_dir)):
        values[a_name], values[b_name] = a, b
    for init in graph.initializer:
        if init.name in lora:
            old = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(old.dtype), init.name))
    kept = [i for i in graph.input if i.name not in lora]
    del graph.input[:]
    graph.input.extend(kept)
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--phases", default="switchable,merged,decode", help="any of switchable, merged, decode")
    parser.add_argument("--context", type=int, default=1024, help="export.max_context of our packages")
    parser.add_argument("--max-steps", type=int, default=None, help="finetune.max_steps (a shape: a few suffice)")
    parser.add_argument("--batch-size", type=int, default=None, help="finetune.batch_size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides for both builds, e.g. quantize.calibration_samples=16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="the device's memory bandwidth in GB/s (H200: 4800), for each package's share of its limit")
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temporary folder)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="decode-modes-"))
    project = work / "project" if (work / "project").is_dir() else make_project(work / "project")
    settings = [f"model.profile={args.profile}", f"export.max_context={args.context}", "build.dir=build/switchable"]
    if args.device == "cuda":
        settings += ["build.device=cuda", 'export.targets=["cuda"]']
    settings += args.set
    if args.max_steps:
        settings.append(f"finetune.max_steps={args.max_steps}")
    if args.batch_size:
        settings.append(f"finetune.batch_size={args.batch_size}")
    phases = set(args.phases.split(","))
    times = json.loads((work / "build_times.json").read_text()) if (work / "build_times.json").is_file() else {}
    for phase, extra in (("switchable", []), ("merged", ["build.dir=build/merged", "export.adapter_mode=merged"])):
        if phase in phases:
            start = time.perf_counter()
            run_doit(project, *[s for s in settings if not (extra and s.startswith("build.dir"))], *extra)
            times[phase] = round(time.perf_counter() - start, 1)
            (work / "build_times.json").write_text(json.dumps(times))
    if "decode" not in phases:
        return
    switchable, merged = project / "build/switchable", project / "build/merged"
    target = args.device

    from onnxruntime_genai.models.builder import create_model

    from tasks.export import run_builder

    from tasks import context_limit

    scratch = work / "plain"
    shutil.rmtree(scratch, ignore_errors=True)
    run_builder(switchable / "quantize", scratch / "plain", target, scratch / "cache")
    extra = {"int4_accuracy_level": "1"} if target == "cpu" else {}
    create_model("", str(switchable / "quantize"), str(scratch / "plain_int4_head"), "int4", target,
                 str(scratch / "cache"), shared_embeddings=False, **extra)
    adapter = next((switchable / "package" / target).glob("*.onnx_adapter"))
    variants = {
        "plain": (scratch / "plain", None),
        "plain_int4_head": (scratch / "plain_int4_head", None),
        "switchable_inactive": (switchable / "package" / target, None),
        "switchable_active": (switchable / "package" / target, adapter),
        "merged": (merged / "package" / target, None),
    }
    if not (merged / "package" / target).is_dir():  # --phases without merged
        del variants["merged"]
    variants["constant_lora"] = (constant_lora(switchable / "package" / target, scratch / "constant",
                                               switchable / "finetune/adapter", switchable / "quantize"), None)
    config = json.loads((switchable / "quantize/config.json").read_text())
    for name in ("plain", "plain_int4_head"):
        fitted = scratch / f"{name}_fitted"
        shutil.copytree(variants[name][0], fitted)
        context_limit.apply(fitted, config, args.context, target)  # as export does for ours
        variants[f"{name}_fitted"] = (fitted, None)
    results: dict = {}
    for name, (folder, adapter_file) in variants.items():
        results[name] = og_decode(folder, adapter_file, args.prompt, args.new, args.repeats)
        read = weight_bytes_per_token(folder) + (adapter_file.stat().st_size if adapter_file else 0)
        results[name]["weight_bytes_per_token"] = read
        if args.bandwidth_gbs:
            limit = args.bandwidth_gbs * 1e9 / read
            results[name]["bandwidth_limit_tokens_per_s"] = round(limit, 1)
            results[name]["share_of_bandwidth_limit"] = round(results[name]["decode_tokens_per_s"] / limit, 4)
        print(name, results[name], flush=True)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype, label = (torch.float32, "fp32") if target == "cpu" else (torch.bfloat16, "bf16_static_cache")
    base = AutoModelForCausalLM.from_pretrained(switchable / "base", dtype=dtype).to(target).eval()
    if target == "cuda":
        base.generation_config.cache_implementation = "static"
    results[f"transformers_{label}_base"] = hf_decode(base, args.prompt, args.new, args.repeats, target)
    print(f"transformers_{label}_base", results[f"transformers_{label}_base"], flush=True)
    tuned = PeftModel.from_pretrained(base, str(switchable / "finetune/adapter")).eval()
    results[f"transformers_{label}_lora"] = hf_decode(tuned, args.prompt, args.new, args.repeats, target)
    print(f"transformers_{label}_lora", results[f"transformers_{label}_lora"], flush=True)

    plain = results["plain_fitted"]["decode_tokens_per_s"]  # like with like: lm_head float, same context
    ratios = {k: round(v["decode_tokens_per_s"] / plain, 3) for k, v in results.items() if "decode_tokens_per_s" in v}
    facts = json.loads((switchable / "base/MANIFEST.json").read_text())["facts"]
    merge = json.loads((merged / "package/report.json").read_text()).get("merge") if "merged" in variants else None
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                              capture_output=True, text=True).stdout.strip()
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        "device": target if target == "cpu" else torch.cuda.get_device_name(0),
        "profile": args.profile, "parameters": facts.get("parameters"), "context": args.context,
        "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
        "bandwidth_gbs": args.bandwidth_gbs,
        "build_s": times,
        "results": results,
        "vs_plain": ratios,
        "merge": merge,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
