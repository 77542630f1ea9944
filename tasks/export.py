"""Stage 4, export: ONNX Runtime GenAI package with the AWQ base as int4 MatMulNBits and the LoRA as
a separate, switchable ``.onnx_adapter``.

Why not ``olive auto-opt --adapter_path``: its builder route bakes the LoRA into the graph (and
quantizes it to int4), so the adapter can neither be switched off nor stays exact; on the AWQ folder
with an adapter it fails inside peft. Instead:

1. the GenAI model builder converts the AWQ folder itself: AWQ's own int4 grid is repacked into
   MatMulNBits (block size = AWQ group size, with zero points), so the base stays exact;
2. every LoRA-targeted MatMulNBits gets ``y = base(x) + (x @ A) @ B`` grafted on, with A and B as graph
   inputs (rank as a symbolic dim) whose default is a rank-1 zero initializer, so the model runs with
   no adapter active and an adapter file overrides them;
3. the trained LoRA is written with onnxruntime's AdapterFormat (A = lora_A.T, B = (alpha/r) lora_B.T;
   the builder splits gate_up_proj into gate_proj and up_proj, so B's output rows are split too);
4. logits of the last prompt token on held-out prompts are compared with the AWQ checkpoint's (its
   float twin, with and without the adapter); past ``max_abs_logit_diff``/``min_cosine`` the stage fails.

One build exports for every execution provider in ``export.targets``, each into its own folder
(``cpu/``: fp32 activations, ``cuda/``: fp16). A target this host cannot run (cuda without a GPU)
is built but not checked, and says so in the log and in ``export_check.json``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from tasks.config import ExportSection
from tasks.errors import PipelineError

log = logging.getLogger(__name__)

ADAPTER_SUFFIX = ".onnx_adapter"
# peft module path -> the builder's node path; the builder renames self_attn to attn.
PEFT_MODULE_RE = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def run_builder(awq_dir: Path, out: Path, target: str, cache: Path) -> None:
    from onnxruntime_genai.models.builder import create_model

    extra = {"int4_accuracy_level": "1"} if target == "cpu" else {}
    # Keep lm_head in float: AWQ leaves it unquantized, and re-quantizing it costs exactness.
    extra["int4_nodes_to_exclude"] = ["/lm_head/MatMul"]
    create_model("", str(awq_dir), str(out), "int4", target, str(cache), **extra)


def lora_tensors(adapter_dir: Path) -> tuple[dict[tuple[int, str], dict[str, "object"]], float]:
    """{(layer, module): {"A": [r, K], "B": [N, r]}} from a peft adapter, and its scale alpha/r."""
    from safetensors.numpy import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise PipelineError("adapter uses rsLoRA/DoRA/per-module ranks, which export does not support; use plain LoRA")
    scale = cfg["lora_alpha"] / cfg["r"]
    pairs: dict[tuple[int, str], dict] = {}
    for name, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        match = PEFT_MODULE_RE.search(name)
        if not match:
            raise PipelineError(f"unexpected tensor {name} in the adapter; export supports LoRA on Phi-3 linears only")
        layer, _, module, which = match.groups()
        pairs.setdefault((int(layer), module), {})[which] = tensor
    return pairs, scale


def node_targets(module: str, n_out: int) -> list[tuple[str, slice]]:
    """Builder node paths that a peft module maps to, with the rows of lora_B each one takes."""
    group = "mlp" if module in ("gate_up_proj", "down_proj") else "attn"
    if module == "gate_up_proj":
        half = n_out // 2  # Phi-3 computes gate, up = gate_up_proj(x).chunk(2)
        return [("mlp/gate_proj", slice(0, half)), ("mlp/up_proj", slice(half, n_out)),
                ("mlp/gate_up_proj", slice(0, n_out))]
    return [(f"{group}/{module}", slice(0, n_out))]


def _lora_sites(graph, adapter_dir: Path):
    """For every LoRA-targeted MatMulNBits of the graph: (node, param name prefix, A name, B name, dtype,
    A param, B param), with A = lora_A.T and B = (alpha/r) lora_B.T in the node's activation dtype."""
    import numpy as np
    from onnx import TensorProto

    nodes = {n.name: n for n in graph.node}
    scales_dtype = {i.name: i.data_type for i in graph.initializer if i.name.endswith(".scales")}
    pairs, scale = lora_tensors(adapter_dir)
    for (layer, module), ab in sorted(pairs.items()):
        a, b = ab["A"].astype(np.float32), ab["B"].astype(np.float32)
        grafted = 0
        for path, rows in node_targets(module, b.shape[0]):
            node = nodes.get(f"/model/layers.{layer}/{path}/MatMulNBits")
            if node is None:
                continue
            dtype = scales_dtype[node.input[2]]
            np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
            base = f"model.layers.{layer}.{path.replace('/', '.')}"
            yield (node, base, f"{base}.lora_A", f"{base}.lora_B", dtype,
                   np.ascontiguousarray(a.T).astype(np_dtype), np.ascontiguousarray((b[rows] * scale).T).astype(np_dtype))
            grafted += 1
        if not grafted:
            raise PipelineError(f"no MatMulNBits node for layers.{layer}.{module} in the exported graph; "
                                "the builder's node names changed: check onnxruntime-genai's version against the lock")


def graft_lora(model_path: Path, adapter_dir: Path, out_model: Path) -> dict[str, "object"]:
    """Rewrite the graph with LoRA branches; return the adapter parameters keyed by graph input name."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    params: dict[str, object] = {}
    branches: dict[str, list] = {}  # base node name -> LoRA nodes to place right after it
    for node, base, a_name, b_name, dtype, a_param, b_param in list(_lora_sites(graph, adapter_dir)):
        params[a_name], params[b_name] = a_param, b_param
        k, n = a_param.shape[0], b_param.shape[1]
        # Graph inputs with a rank-1 zero default: no adapter active == base model exactly.
        graph.input.extend([
            helper.make_tensor_value_info(a_name, dtype, [k, "lora_rank"]),
            helper.make_tensor_value_info(b_name, dtype, ["lora_rank", n]),
        ])
        graph.initializer.extend([
            numpy_helper.from_array(np.zeros((k, 1), a_param.dtype), a_name),
            numpy_helper.from_array(np.zeros((1, n), a_param.dtype), b_name),
        ])
        y = node.output[0]
        node.output[0] = f"{y}/base"
        branches[node.name] = [
            helper.make_node("MatMul", [node.input[0], a_name], [f"{base}/lora_A/output_0"], name=f"{base}/lora_A/MatMul"),
            helper.make_node("MatMul", [f"{base}/lora_A/output_0", b_name], [f"{base}/lora_B/output_0"], name=f"{base}/lora_B/MatMul"),
            helper.make_node("Add", [f"{y}/base", f"{base}/lora_B/output_0"], [y], name=f"{base}/lora/Add"),
        ]
    # ONNX wants nodes in topological order: each branch goes right after the node it extends,
    # before any consumer of that node's (renamed) output.
    ordered = []
    for node in graph.node:
        ordered.append(node)
        ordered.extend(branches.get(node.name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_model), save_as_external_data=True, all_tensors_to_one_file=True,
              location=out_model.name + ".data", size_threshold=1024)
    return params


def write_adapter(params: dict[str, "object"], path: Path) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(params[name]) for name in sorted(params)})
    fmt.export_adapter(str(path))


NO_GPU = "no CUDA GPU on the build host"


def target_runs_here(target: str) -> bool:
    """Whether this host can run ``target``'s model (the cuda one needs a CUDA GPU)."""
    if target == "cpu":
        return True
    import torch

    return torch.cuda.is_available()


def check_logits(package: Path, awq_dir: Path, adapter_dir: Path, adapter_file: Path, prompts: list[str],
                 section: ExportSection, target: str, name: str | None = None) -> dict:
    """Max |d| and min cosine of last-token logits, ONNX vs the AWQ checkpoint (float twin)."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.awq_twin import load_float_twin
    from tasks.genai import last_token_logits, open_model

    tokenizer = AutoTokenizer.from_pretrained(awq_dir)
    twin = load_float_twin(awq_dir)
    name = name or section.adapter_name
    model, adapters = open_model(package, target, {name: adapter_file})
    max_abs_bound, min_cos_bound = section.bounds(target)
    results = {}
    for label, adapter in (("base", None), ("adapter", name)):
        if adapter:
            twin = PeftModel.from_pretrained(twin, str(adapter_dir)).eval()
        worst_abs, worst_cos, same_argmax = 0.0, 1.0, 0
        for prompt in prompts:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            with torch.no_grad():
                ref = twin(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
            got = last_token_logits(model, adapters, adapter, ids).astype(np.float32)
            worst_abs = max(worst_abs, float(np.abs(ref - got).max()))
            worst_cos = min(worst_cos, float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got))))
            same_argmax += int(ref.argmax() == got.argmax())
        results[label] = {"max_abs_diff": worst_abs, "min_cosine": worst_cos,
                          "same_argmax": f"{same_argmax}/{len(prompts)}"}
        log.info("%s logits ONNX vs AWQ checkpoint (%s): max |d| %.2e, min cosine %.7f, same argmax %s",
                 target, label, worst_abs, worst_cos, results[label]["same_argmax"])
    for label, r in results.items():
        if r["max_abs_diff"] > max_abs_bound or r["min_cosine"] < min_cos_bound:
            raise PipelineError(
                f"exported {target} model ({label}) is too far from the AWQ checkpoint: max |d| {r['max_abs_diff']:.3g} "
                f"(bound {max_abs_bound}), cosine {r['min_cosine']:.6f} (bound {min_cos_bound}); "
                "check the export settings or raise the bounds in [export] knowingly"
            )
    return results


def export_target(awq_dir: Path, finetune_dir: Path, section: ExportSection, target: str, out: Path,
                  scratch: Path, prompts: list[str]) -> dict:
    """One execution provider's model, adapter file and logit check, in ``out`` (= <export>/<target>)."""
    raw = scratch / f"builder-{target}"
    log.info("model builder: %s -> int4 MatMulNBits for %s", awq_dir, target)
    run_builder(awq_dir, raw, target, scratch / "cache")
    log.info("grafting LoRA branches and writing %s/%s%s", target, section.adapter_name, ADAPTER_SUFFIX)
    params = graft_lora(raw / "model.onnx", finetune_dir / "adapter", out / "model.onnx")
    for item in sorted(raw.iterdir()):
        if item.name not in ("model.onnx", "model.onnx.data"):
            (out / item.name).write_bytes(item.read_bytes())
    adapter_file = out / f"{section.adapter_name}{ADAPTER_SUFFIX}"
    write_adapter(params, adapter_file)
    if not target_runs_here(target):
        log.warning("%s model NOT checked: this host has no CUDA GPU. Build on a GPU host (or run "
                    "`doit evaluate` there) before shipping it", target)
        return {"checked": False, "reason": NO_GPU}
    return {"checked": True, **check_logits(out, awq_dir, finetune_dir / "adapter", adapter_file, prompts, section, target)}


def check_prompts(finetune_dir: Path, count: int) -> list[str]:
    """The first held-out prompts of a finetune, as the model sees them at inference."""
    from tasks.data import prompt_part, read_heldout

    template, held = read_heldout(finetune_dir)
    return [prompt_part(template, r["prompt"]) for r in held[:count]]


def build_adapter(export_dir: Path, awq_dir: Path, finetune_dir: Path, section: ExportSection, name: str,
                  out: Path) -> dict:
    """An extra adapter's ``<target>/<name>.onnx_adapter`` for the exported base (whose LoRA inputs
    the primary adapter's modules defined), logits checked like the export's own adapter."""
    import onnx

    prompts = check_prompts(finetune_dir, section.check_prompts)
    checks = {}
    for target in section.targets:
        model_path = export_dir / target / "model.onnx"
        graph = onnx.load(str(model_path), load_external_data=False).graph
        params = {}
        for _, _, a_name, b_name, _, a_param, b_param in _lora_sites(graph, finetune_dir / "adapter"):
            params[a_name], params[b_name] = a_param, b_param
        missing = sorted(set(params) - {i.name for i in graph.input})
        if missing:
            raise PipelineError(f"adapter {name} trains modules the exported base has no LoRA inputs for ({missing[0]}, ...); "
                                "all adapters share [finetune] target_modules: rebuild export after changing them")
        adapter_file = out / target / f"{name}{ADAPTER_SUFFIX}"
        adapter_file.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing %s/%s%s for the exported %s base", target, name, ADAPTER_SUFFIX, target)
        write_adapter(params, adapter_file)
        if not target_runs_here(target):
            log.warning("%s adapter %s NOT checked: this host has no CUDA GPU", target, name)
            checks[target] = {"checked": False, "reason": NO_GPU}
            continue
        checks[target] = {"checked": True, **check_logits(export_dir / target, awq_dir, finetune_dir / "adapter",
                                                          adapter_file, prompts, section, target, name)}
    (out / "adapter_check.json").write_text(json.dumps(checks, indent=2) + "\n")
    return {"logit_check": checks}


def build(awq_dir: Path, finetune_dir: Path, section: ExportSection, out: Path, scratch: Path) -> dict:
    prompts = check_prompts(finetune_dir, section.check_prompts)
    checks = {}
    for target in section.targets:
        checks[target] = export_target(awq_dir, finetune_dir, section, target, out / target, scratch, prompts)
    (out / "export_check.json").write_text(json.dumps(checks, indent=2) + "\n")
    return {"logit_check": checks}
