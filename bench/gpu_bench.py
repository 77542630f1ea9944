"""GPU benchmark: our pipeline on a shape profile (Phi-3.5-mini's by default) beside the lab's steps, on one GPU.

Phases (run all, or a few at a time so that each call stays short; results accumulate in
<work>/results.json and are rewritten as JSON + PNG by the `report` phase):

  pipeline   cold build, one `doit <stage>` at a time: wall time and peak GPU memory per stage
             (NVML, whole device), then the no-op rebuild time
  awq        the lab's AWQ (AutoAWQ's own search, which `olive quantize --algorithm awq` runs) vs
             our fast search, same model sizes and calibration, on --awq-layers decoder layers
  lab        the lab's `olive finetune` (same data, template and step count) and the GenAI model
             builder CLI that `olive auto-opt --use_ort_genai` runs, on the same GPU (--lab-steps: a subset)
  decode     batch 1, 128 prompt tokens, 256 new tokens: the package (adapter on and off) vs
             transformers generate in bf16, and the bandwidth limit
  report     results.json -> <out>/gpu_bench.json and <out>/gpu_bench.png

    python bench/gpu_bench.py --phases pipeline,awq,lab,decode,report --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.stages import STAGES  # noqa: E402

STAGE_ORDER = tuple(s.name for s in STAGES)
PROMPT_TOKENS, NEW_TOKENS = 128, 256


# --- helpers ------------------------------------------------------------------------------------

class GpuMemoryPeak:
    """Peak used memory of GPU 0 (all processes) while the block runs, sampled every 50 ms by NVML."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = self._used()
        self.peak = self.baseline

    def _used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    @contextmanager
    def watch(self):
        self.baseline = self.peak = self._used()
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                self.peak = max(self.peak, self._used())
                stop.wait(0.05)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    @property
    def peak_gib(self) -> float:
        return round((self.peak - self.baseline) / 2**30, 2)


def load_results(work: Path) -> dict:
    path = work / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(work: Path, results: dict) -> None:
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def bench_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def write_config(work: Path, targets: list[str], profile: str) -> Path:
    """The benchmark build: the shape profile on cuda, the lab's calibration size, our defaults otherwise."""
    config = work / "bench.toml"
    config.write_text(
        "\n".join([
            "[build]", f'dir = "{(work / "build").as_posix()}"', 'device = "cuda"', "",
            "[model]", f'profile = "{profile}"', "",
            "[quantize]", f'calibration = "{(work / "calibration.txt").as_posix()}"',
            "calibration_samples = 128", "calibration_seq_len = 512", "",
            "[export]", f"targets = {json.dumps(targets)}", "",
        ]) + "\n")
    return config


def doit(config: Path, *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "doit", f"config={config}", *args], cwd=REPO,
                            capture_output=True, text=True, env=bench_env())
    elapsed = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"doit {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return elapsed, result.stdout


def stage_seconds(log: Path) -> float | None:
    match = re.search(r"done in ([0-9.]+)s", log.read_text(errors="replace")) if log.is_file() else None
    return float(match.group(1)) if match else None


# --- phases -------------------------------------------------------------------------------------

def phase_pipeline(work: Path, results: dict, stages: list[str], targets: list[str], profile: str) -> None:
    from bench.calibration import write_benchmark_calibration
    from tasks.base_model import train_tokenizer
    from tasks.config import load_config
    from tasks.families import FAMILIES

    config = write_config(work, targets, profile)
    results["profile"] = profile
    if not (work / "calibration.txt").is_file():
        # Sized with the tokenizer the base stage will train (deterministic: same corpus, same vocab).
        spec = load_config(config).model.random_spec
        tokenizer = train_tokenizer(REPO / spec.tokenizer_corpus, spec.vocab_size, FAMILIES[spec.family])
        write_benchmark_calibration(REPO, tokenizer, work / "calibration.txt")
    gpu = GpuMemoryPeak()
    out = results.setdefault("pipeline", {"stages": {}})
    for stage in stages:
        with gpu.watch():
            wall, stdout = doit(config, stage)
        ran = bool(re.search(rf"^\.  {stage}$", stdout, re.MULTILINE))  # up-to-date stages print "-- name"
        out["stages"][stage] = {"wall_s": round(wall, 1), "executed": ran, "peak_gpu_gib": gpu.peak_gib,
                                "stage_s": stage_seconds(work / "build/logs" / f"{stage}.log") if ran else None}
        print(f"{stage}: {out['stages'][stage]}", flush=True)
        save_results(work, results)
    if all(s in out["stages"] for s in STAGE_ORDER):
        noop = []
        for _ in range(3):
            wall, stdout = doit(config)
            noop.append(wall)
        out["noop_s"] = round(min(noop), 2)
        out["noop_executed_nothing"] = not re.search(r"^\.  ", stdout, re.MULTILINE)
        build = work / "build"
        out["sizes_gb"] = {
            "base_bf16": round(sum(p.stat().st_size for p in (build / "base").glob("*.safetensors")) / 1e9, 3),
            **{f"package_{t}": round(sum(p.stat().st_size for p in (build / "package" / t).rglob("*") if p.is_file()) / 1e9, 3)
               for t in targets},
        }
        out["export_check"] = json.loads((build / "export/export_check.json").read_text())
        out["report"] = json.loads((build / "package/report.json").read_text())["targets"]
        for t in out["report"].values():
            t.pop("generations", None)
        print(f"no-op {out['noop_s']} s; sizes {out['sizes_gb']}", flush=True)
    save_results(work, results)


def phase_awq(work: Path, results: dict, layers: int) -> None:
    """Our search vs AutoAWQ's on the first `layers` layers of the same model, same calibration."""
    from bench.awq_profile import profile_quantizer

    base = work / "build/base"
    calibration = work / "calibration.txt"
    out = results.setdefault("awq", {"layers": layers})
    for search in ("fast", "autoawq"):
        out[search] = profile_quantizer(base, calibration, search, layers, work / "awq")
        print(f"awq {search}: {out[search]['per_layer_s']} s/layer", flush=True)
        save_results(work, results)
    import torch

    from tasks.awq_search import identical_codes

    fast, ref = (torch.load(work / "awq" / f"{s}-layer0.pt") for s in ("fast", "autoawq"))
    same, total = identical_codes(fast, ref)
    out["layer0_int4_codes_identical"] = round(same / total, 5)
    out["layer0_scales_identical"] = all(torch.equal(fast[k], ref[k]) for k in fast if "layernorm" in k)
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    out["autoawq_extrapolated_full_s"] = round(out["autoawq"]["per_layer_s"] * n_layers, 1)
    out["fast_extrapolated_full_s"] = round(out["fast"]["per_layer_s"] * n_layers, 1)
    save_results(work, results)


LAB_STEPS = ("olive_finetune", "builder_cuda")


def phase_lab(work: Path, results: dict, steps: list[str]) -> None:
    """The lab's own commands where they run offline with our pinned stack."""
    build = work / "build"
    out = results.setdefault("lab", {})
    gpu = GpuMemoryPeak()
    env = bench_env()
    lab = work / "lab"
    # Finetune, exactly the lab's command but on the bf16 base: our finetune trains against the bf16
    # float twin of the AWQ weights (same shapes and compute), and olive's LoRA cannot train through
    # AutoAWQ's packed modules without AutoAWQ's CUDA kernels (absent from the PyPI sdist build).
    data = REPO / "data/travel_qa.jsonl"
    olive = [sys.executable, "-m", "olive", "finetune", "--method", "lora", "--model_name_or_path", str(build / "base"),
             "--data_files", str(data), "--data_name", "json", "--text_template",
             "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>", "--max_steps", "100",
             "--output_path", str(lab / "ft"), "--log_level", "1"]
    # Export: the model builder as `olive auto-opt --use_ort_genai` runs it, on the same AWQ folder.
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(build / "quantize"),
               "-o", str(lab / "builder-cuda"), "-p", "int4", "-e", "cuda", "-c", str(lab / "cache")]
    for name, cmd in (("olive_finetune", olive), ("builder_cuda", builder)):
        if name not in steps:
            continue
        with gpu.watch():
            start = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
        out[name] = {"cmd": " ".join(cmd), "wall_s": round(wall, 1), "rc": run.returncode,
                     "peak_gpu_gib": gpu.peak_gib, "tail": (run.stdout + run.stderr)[-1500:]}
        print(f"{name}: rc {run.returncode}, {wall:.1f} s", flush=True)
        save_results(work, results)


def measure_bandwidth() -> dict:
    """Device memory bandwidth from a large device-to-device copy (bytes read + written per second)."""
    import torch

    n = 2 * 2**30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    del a, b
    torch.cuda.empty_cache()
    return {"copy_tb_s": round(2 * n / seconds / 1e12, 3)}


def fixed_prompt(tokenizer_encode, n: int) -> list[int]:
    text = (REPO / "data/calibration.txt").read_text(encoding="utf-8")
    ids = list(tokenizer_encode(text))
    return ids[:n]


def decode_ours(folder: Path, adapter_file: Path, adapter_name: str, repeats: int = 3) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    from tasks.genai import open_model

    model, adapters = open_model(folder, "cuda", {adapter_name: adapter_file})
    tokenizer = og.Tokenizer(model)
    prompt = fixed_prompt(tokenizer.encode, PROMPT_TOKENS)
    out = {}
    for label, adapter in (("without_adapter", None), ("with_adapter", adapter_name)):
        runs = []
        for i in range(repeats + 1):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=PROMPT_TOKENS + NEW_TOKENS, min_length=PROMPT_TOKENS + NEW_TOKENS,
                                      do_sample=False)
            gen = og.Generator(model, params)
            if adapter:
                gen.set_active_adapter(adapters, adapter)
            start = time.perf_counter()
            gen.append_tokens(np.asarray([prompt], dtype=np.int32))
            first = time.perf_counter()
            produced = 0
            while not gen.is_done():
                gen.generate_next_token()
                produced += 1
            end = time.perf_counter()
            if i:  # the first run warms up (allocations, kernel selection)
                runs.append({"prefill_s": first - start, "decode_s": end - first, "tokens": produced})
            del gen
        best = min(runs, key=lambda r: r["decode_s"])
        out[label] = {"tokens": best["tokens"], "decode_tokens_per_s": round(best["tokens"] / best["decode_s"], 1),
                      "end_to_end_tokens_per_s": round(best["tokens"] / (best["decode_s"] + best["prefill_s"]), 1),
                      "prefill_ms": round(best["prefill_s"] * 1000, 1)}
        print(f"ours {label}: {out[label]}", flush=True)
    return out


def decode_transformers(base: Path, tokenizer_dir: Path, compile_too: bool) -> dict:
    """transformers generate, bf16, batch 1, greedy: default cache, static cache, static + compile."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([fixed_prompt(lambda t: tokenizer.encode(t, add_special_tokens=False), PROMPT_TOKENS)], device="cuda")
    configs = {"dynamic_cache": {}, "static_cache": {"cache_implementation": "static"}}
    if compile_too:
        configs["static_cache_compiled"] = {"cache_implementation": "static", "compile_config": None}
    out = {"torch": torch.__version__, "attn_implementation": model.config._attn_implementation}
    for name, extra in configs.items():
        kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **extra)
        if name == "static_cache_compiled":
            kwargs.pop("compile_config")
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        try:
            times = []
            for i in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.no_grad():
                    result = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
                torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
            produced = result.shape[1] - ids.shape[1]
            out[name] = {"tokens": produced, "end_to_end_tokens_per_s": round(produced / min(times), 1)}
        except Exception as exc:  # report, do not hide: a config that fails is a finding
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        print(f"transformers {name}: {out[name]}", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def bytes_per_token(folder: Path) -> dict:
    """Bytes of weights one decode step reads: all initialisers except the embedding table (one row)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    total = embed = 0
    for init in model.graph.initializer:
        size = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        if size is None:
            size = len(init.raw_data)
        total += size
        if "embed_tokens" in init.name:
            embed += size
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    dec = config["decoder"]
    kv_per_token = 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * dec["head_size"] * 2  # fp16 K and V
    mean_context = PROMPT_TOKENS + NEW_TOKENS / 2
    return {"weights_read": total - embed, "embedding_table": embed,
            "kv_cache_read_mean": int(kv_per_token * mean_context)}


def phase_decode(work: Path, results: dict, compile_too: bool) -> None:
    build = work / "build"
    folder = build / "package/cuda"
    out = results.setdefault("decode", {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS})
    out["bandwidth"] = measure_bandwidth()
    out["bytes_per_token"] = bytes_per_token(folder)
    out["ours"] = decode_ours(folder, folder / "travel.onnx_adapter", "travel")
    save_results(work, results)
    out["transformers_bf16"] = decode_transformers(build / "base", build / "base", compile_too)
    bw = out["bandwidth"]["copy_tb_s"] * 1e12
    weights = out["bytes_per_token"]["weights_read"]
    kv = out["bytes_per_token"]["kv_cache_read_mean"]
    out["limit_tokens_per_s"] = {"weights_only": round(bw / weights, 1), "weights_and_kv": round(bw / (weights + kv), 1)}
    best_hf = max((v.get("end_to_end_tokens_per_s", 0) for v in out["transformers_bf16"].values() if isinstance(v, dict)), default=0)
    ours = out["ours"]["with_adapter"]["decode_tokens_per_s"]
    out["ratios"] = {"ours_with_adapter_vs_best_transformers": round(ours / best_hf, 2) if best_hf else None,
                     "ours_with_adapter_vs_limit": round(ours / out["limit_tokens_per_s"]["weights_and_kv"], 3)}
    print(f"limit {out['limit_tokens_per_s']}; ratios {out['ratios']}", flush=True)
    save_results(work, results)


def environment() -> dict:
    from importlib import metadata

    import torch

    from tasks.manifest import package_versions

    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "packages": package_versions()}
    # What `import` finds (carried wheels shadow the image's packages; metadata may name the image's).
    imported = {}
    for module in ("onnxruntime", "onnxruntime_genai", "transformers"):
        try:
            imported[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - record, do not fail the benchmark
            imported[module] = f"not importable: {type(exc).__name__}"
    try:
        import onnxruntime

        imported["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001
        pass
    info["imported"] = imported
    try:
        info["packages"]["olive-ai"] = metadata.version("olive-ai")
    except metadata.PackageNotFoundError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def phase_report(work: Path, results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    stages = results.get("pipeline", {}).get("stages", {})
    names = [s for s in STAGE_ORDER if s in stages]
    ax1.bar(names, [stages[s]["wall_s"] for s in names], color="tab:blue", label="ours (doit <stage>)")
    lab = results.get("lab", {})
    awq = results.get("awq", {})
    refs = {"quantize": awq.get("autoawq_extrapolated_full_s"),
            "finetune": lab.get("olive_finetune", {}).get("wall_s"),
            "export": lab.get("builder_cuda", {}).get("wall_s")}
    xs = [i for i, s in enumerate(names) if refs.get(s)]
    ax1.scatter(xs, [refs[names[i]] for i in xs], color="tab:red", zorder=3, label="lab step (same GPU)")
    ax1.set_ylabel("seconds")
    ax1.set_title(f"{results.get('profile', 'phi-3.5-mini-shape')}: stage wall time")
    ax1.legend()
    dec = results.get("decode", {})
    bars = {}
    for label, v in dec.get("ours", {}).items():
        bars[f"ours\n{label.replace('_', ' ')}"] = v["decode_tokens_per_s"]
    for label, v in dec.get("transformers_bf16", {}).items():
        if isinstance(v, dict) and "end_to_end_tokens_per_s" in v:
            bars[f"HF bf16\n{label.replace('_', ' ')}"] = v["end_to_end_tokens_per_s"]
    ax2.bar(list(bars), list(bars.values()), color="tab:green")
    if dec.get("limit_tokens_per_s"):
        ax2.axhline(dec["limit_tokens_per_s"]["weights_and_kv"], color="black", linestyle="--", label="bandwidth limit")
        ax2.legend()
    ax2.set_ylabel("tokens/s (batch 1, 128 -> 256)")
    ax2.set_title("decode speed")
    ax2.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "gpu_bench.png", dpi=110)
    print(f"wrote {out_dir / 'gpu_bench.json'} and {out_dir / 'gpu_bench.png'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="pipeline,awq,lab,decode,report")
    parser.add_argument("--stages", default=",".join(STAGE_ORDER), help="pipeline phase: stages to build now")
    parser.add_argument("--targets", default="cuda", help="export targets of the benchmark build")
    parser.add_argument("--profile", default="phi-3.5-mini-shape", help="model profile (tiny: a quick smoke run)")
    parser.add_argument("--lab-steps", default=",".join(LAB_STEPS), help="lab phase: which of its steps to run")
    parser.add_argument("--awq-layers", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time transformers with torch.compile")
    parser.add_argument("--work", type=Path, default=REPO / "build/gpu-bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results(args.work)
    # Refreshed on every call (phases can run in separate calls, with more carried by the later ones);
    # the date stays the first call's.
    env = environment()
    env["date"] = results.get("environment", {}).get("date", env["date"])
    results["environment"] = env
    save_results(args.work, results)
    phases = args.phases.split(",")
    if "pipeline" in phases:
        phase_pipeline(args.work, results, args.stages.split(","), args.targets.split(","), args.profile)
    if "awq" in phases:
        phase_awq(args.work, results, args.awq_layers)
    if "lab" in phases:
        phase_lab(args.work, results, args.lab_steps.split(","))
    if "decode" in phases:
        phase_decode(args.work, results, args.compile)
    if "report" in phases:
        phase_report(args.work, results, args.out)


if __name__ == "__main__":
    main()
