"""Where a decode step's time goes: ONNX Runtime's own profile of the package's decode on the GPU.

    python bench/decode_profile.py PACKAGE_DIR --tokens 32 [--adapter FILE NAME] --out profile.json

Copies the package to a scratch folder with profiling switched on in genai_config.json, decodes
--tokens tokens after a 128-token prompt, and sums the profile: wall time per token, time inside
kernels per token, kernels launched per token, and the op types that take the most time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def profile(package: Path, tokens: int, adapter: tuple[Path, str] | None) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    from tasks.manifest import clone_file

    # Beside the package, as copies: ONNX Runtime refuses external data reached through a symlink.
    scratch = Path(tempfile.mkdtemp(prefix=".decode-profile-", dir=package.parent))
    for item in package.iterdir():
        clone_file(item, scratch / item.name)
    config = json.loads((package / "genai_config.json").read_text())
    (scratch / "genai_config.json").unlink()  # a link to the package's own file: write a new one
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["enable_profiling"] = str(scratch / "ort_profile")
    (scratch / "genai_config.json").write_text(json.dumps(config))
    model = og.Model(str(scratch))
    adapters = None
    if adapter:
        adapters = og.Adapters(model)
        adapters.load(str(adapter[0]), adapter[1])
    prompt = list(range(100, 228))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens, min_length=len(prompt) + tokens, do_sample=False)
    gen = og.Generator(model, params)
    if adapters:
        gen.set_active_adapter(adapters, adapter[1])
    gen.append_tokens(np.asarray([prompt], dtype=np.int32))
    start = time.perf_counter()
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    wall = time.perf_counter() - start
    del gen, params, adapters, model  # the profile file is written when the session closes
    files = sorted(scratch.glob("ort_profile*.json"))
    events = json.loads(files[-1].read_text()) if files else []
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the prompt
    first_decode = decode_runs[0]["ts"] if decode_runs else 0
    kernels = [e for e in events if e.get("cat") == "Kernel" and e.get("ts", 0) >= first_decode]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("ts", 0) >= first_decode
             and e.get("name", "").endswith("_kernel_time")]
    by_op = Counter()
    for e in nodes:
        by_op[e.get("args", {}).get("op_name", "?")] += e.get("dur", 0)
    steps = max(len(decode_runs), 1)
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "tokens": n, "wall_ms_per_token": round(wall / n * 1000, 3),
        "model_run_ms_per_token": round(sum(r["dur"] for r in decode_runs) / steps / 1000, 3),
        "node_time_ms_per_token": round(sum(by_op.values()) / steps / 1000, 3),
        "gpu_kernel_ms_per_token": round(sum(e["dur"] for e in kernels) / steps / 1000, 3) if kernels else None,
        "nodes_per_token": round(len(nodes) / steps, 1),
        "top_ops_ms_per_token": {op: round(us / steps / 1000, 3) for op, us in by_op.most_common(8)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--adapter", nargs=2, metavar=("FILE", "NAME"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"without_adapter": profile(args.package, args.tokens, None)}
    if args.adapter:
        result["with_adapter"] = profile(args.package, args.tokens, (Path(args.adapter[0]), args.adapter[1]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
