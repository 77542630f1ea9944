"""Where AutoAWQ spends its time on the Phi-3.5-mini shape: per-method wall times of one AWQ run.

Loads a base model, keeps its first --layers decoder layers (so it is quick), and runs the
quantize stage's quantizer (fast or AutoAWQ's search) with every AwqQuantizer method wrapped in a
CUDA-synchronised timer. bench/gpu_bench.py's `awq` phase calls it for both searches.

    python bench/awq_profile.py --base build/gpu-bench/build/base --calibration build/gpu-bench/calibration.txt \\
        --layers 2 --search autoawq
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("_get_input_feat", "_search_best_scale", "_compute_best_scale", "_search_best_clip",
           "_compute_best_clip", "_apply_quant", "init_quant", "_module_forward", "_compute_loss")


def timed_class(cls, totals: dict, counts: dict):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def wrap(name, fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync()
                totals[name] += time.perf_counter() - t
                counts[name] += 1
        return inner

    attrs = {m: wrap(m, getattr(cls, m)) for m in METHODS if hasattr(cls, m)}
    return type("Timed" + cls.__name__, (cls,), attrs)


def profile_quantizer(base: Path, calibration: Path, search: str, layers: int, work: Path) -> dict:
    """Time AWQ (our quantizer class for ``search``) on the first ``layers`` layers of ``base``."""
    import torch
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    from tasks import quantize
    from tasks.config import QuantizeSection

    tokenizer = AutoTokenizer.from_pretrained(base)
    section = QuantizeSection(calibration_samples=128, calibration_seq_len=512, search=search)
    texts = quantize.read_calibration(calibration)
    totals, counts = defaultdict(float), defaultdict(int)
    timed = timed_class(quantize.quantizer_class(search), totals, counts)
    model = AutoAWQForCausalLM.from_pretrained(str(base), torch_dtype=torch.float16, device_map="cpu", use_cache=False)
    model.model.model.layers = torch.nn.ModuleList(list(model.model.model.layers)[:layers])
    model.model.config.num_hidden_layers = layers
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.quantize(tokenizer, quant_config=quantize.quant_config(section), calib_data=texts,
                   max_calib_samples=section.calibration_samples, max_calib_seq_len=section.calibration_seq_len,
                   quantizer_cls=timed)
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    work.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.model.model.layers[0].state_dict().items()}, work / f"{search}-layer0.pt")
    search_s = total - totals.get("init_quant", 0.0)
    result = {"layers": layers, "search": search, "total_s": round(total, 2),
              "init_s": round(totals.get("init_quant", 0.0), 2), "per_layer_s": round(search_s / layers, 2),
              "methods": {k: {"s": round(v, 2), "calls": counts[k]} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
              "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}
    del model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True, help="a base model folder (e.g. the shape profile's)")
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--search", choices=("fast", "autoawq"), default="autoawq")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cprofile", type=int, default=0, help="also print the N costliest functions (cProfile)")
    parser.add_argument("--make-shape", action="store_true",
                        help="build --base first if missing: the phi-3.5-mini shape with only --layers layers")
    args = parser.parse_args()
    if args.make_shape and not (args.base / "config.json").is_file():
        from transformers import AutoTokenizer

        from bench.calibration import write_benchmark_calibration
        from tasks.base_model import build_tiny_model
        from tasks.config import SHAPE_PROFILES, TinyModel

        build_tiny_model(TinyModel(**{**SHAPE_PROFILES["phi-3.5-mini-shape"], "num_hidden_layers": args.layers}),
                         REPO, args.base)
        write_benchmark_calibration(REPO, AutoTokenizer.from_pretrained(args.base), args.calibration)
    if args.cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(profile_quantizer, args.base, args.calibration, args.search, args.layers, Path("/tmp"))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    else:
        result = profile_quantizer(args.base, args.calibration, args.search, args.layers, Path("/tmp"))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
