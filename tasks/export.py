"""Stage 4, export: ONNX Runtime GenAI package with the AWQ base as int4 MatMulNBits and the LoRA as
a separate, switchable ``.onnx_adapter``.

Why not ``olive auto-opt --adapter_path``: its builder route bakes the LoRA into the graph (and
quantizes it to int4), so the adapter can neither be switched off nor stays exact; on the AWQ folder
with an adapter it fails inside peft. Instead:

1. the GenAI model builder converts the AWQ folder itself: AWQ's own int4 grid is repacked into
   MatMulNBits (block size = AWQ group size, with zero points), so the base stays exact;
2. every LoRA-targeted MatMulNBits gets ``y = base(x) + (x @ A) @ B`` grafted on, with A and B as graph
   inputs (rank as a symbolic dim) whose default is zero-width (A [K, 0], B [0, N]), so the model runs
   with no adapter active, at the least cost the branch can have, and an adapter file overrides them;
3. the trained LoRA is written with onnxruntime's AdapterFormat (A = lora_A.T, B = (alpha/r) lora_B.T).
   The builder packs some projections and splits others (Llama's q/k/v into one qkv_proj, Phi-3's
   gate_up_proj into gate_proj and up_proj), so each LoRA module is matched to the builder's MatMuls
   by the output rows (parts) both compute, checked against the node's N and K (tasks/families.py):
   B's rows are split or placed at their offset, and modules sharing a MatMul share one branch whose
   rank is the sum of theirs (A side by side, B stacked), which is exact;
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
import shutil
from pathlib import Path

from tasks.config import ExportSection, QuantizeSection
from tasks.devices import NO_GPU, target_runs_here
from tasks.errors import PipelineError
from tasks.genai import ADAPTER_SUFFIX
from tasks import context_limit, disk
from tasks.stage_spec import Stage, on_build_device, runs_cuda_target

log = logging.getLogger(__name__)

# peft module path -> the builder's node path; the builder renames self_attn to attn.
PEFT_MODULE_RE = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
BUILDER_NODE_RE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMulNBits$")
BLOCK_OF = {"attn": "self_attn", "mlp": "mlp"}


def run_builder(awq_dir: Path, out: Path, target: str, cache: Path) -> None:
    from onnxruntime_genai.models.builder import create_model

    extra = {"int4_accuracy_level": "1"} if target == "cpu" else {}
    # Keep lm_head in float: AWQ leaves it unquantized, and re-quantizing it costs exactness.
    extra["int4_nodes_to_exclude"] = ["/lm_head/MatMul"]
    # Tied embeddings (Llama 3.2 1B/3B, Qwen, Gemma): the builder's shared path reads an int4 lm_head
    # that the exclusion above never makes (onnxruntime-genai 0.14.1 writes a graph with a dangling
    # input), so the embedding gets its own float copy.
    extra["shared_embeddings"] = False
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
            raise PipelineError(f"unexpected tensor {name} in the adapter; export supports LoRA on the decoder "
                                "blocks' linears only (finetune.target_modules)")
        layer, _, module, which = match.groups()
        pairs.setdefault((int(layer), module), {})[which] = tensor
    return pairs, scale


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))


def builder_nodes(graph) -> dict[tuple[int, str], tuple[object, tuple[str, ...]]]:
    """{(layer, block): [(node, parts)]} of the graph's int4 MatMuls inside the decoder blocks."""
    from tasks.families import BUILDER_PARTS

    nodes: dict = {}
    for node in graph.node:
        match = BUILDER_NODE_RE.match(node.name)
        if match and node.op_type == "MatMulNBits" and match.group(3) in BUILDER_PARTS:
            layer, block, name = int(match.group(1)), BLOCK_OF[match.group(2)], match.group(3)
            nodes.setdefault((layer, block), []).append((node, BUILDER_PARTS[name]))
    return nodes


def _attribute(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def _lora_sites(graph, adapter_dir: Path, config: dict):
    """For every int4 MatMul of the graph that a LoRA module reaches: (node, param name prefix, A name,
    B name, dtype, A param [K, r_total], B param [r_total, N]) in the node's activation dtype, with
    B = (alpha/r) lora_B.T placed at the output rows of the parts the module computes there."""
    import numpy as np
    from onnx import TensorProto

    from tasks.families import family_of, part_sizes

    family = family_of(config, "the quantized model's config.json")
    sizes = part_sizes(config)
    scales_dtype = {i.name: i.data_type for i in graph.initializer if i.name.endswith(".scales")}
    nodes = builder_nodes(graph)
    pairs, scale = lora_tensors(adapter_dir)
    per_node: dict[str, list] = {}  # node name -> [(module, A [K, r], B [r, N])]
    node_of = {}
    for (layer, module), ab in sorted(pairs.items()):
        if module not in family.linears:
            raise PipelineError(f"the adapter trains {module}, which {family.label} does not have; retrain it with "
                                "finetune.target_modules of this model's family")
        block, parts = family.linears[module]
        a, b = ab["A"].astype(np.float32), ab["B"].astype(np.float32)
        rows = dict(zip(parts, np.split(np.arange(b.shape[0]), np.cumsum([sizes[p] for p in parts])[:-1])))
        if b.shape[0] != sum(sizes[p] for p in parts):
            raise PipelineError(f"layers.{layer}.{module}: the adapter has {b.shape[0]} output rows, config.json says "
                                f"{sum(sizes[p] for p in parts)}; the adapter was trained on another model")
        reached = set()
        for node, node_parts in nodes.get((layer, block), []):
            shared = [p for p in node_parts if p in parts]
            if not shared:
                continue
            n, k = _attribute(node, "N"), _attribute(node, "K")
            if n != sum(sizes[p] for p in node_parts) or k != a.shape[1]:
                raise PipelineError(f"{node.name} is [{k} -> {n}], not what layers.{layer}.{module} computes; the "
                                    "builder's layout changed: check onnxruntime-genai's version against the lock")
            placed = np.zeros((b.shape[1], n), np.float32)
            offset = 0
            for p in node_parts:
                if p in shared:
                    placed[:, offset:offset + sizes[p]] = (b[rows[p]] * scale).T
                offset += sizes[p]
            per_node.setdefault(node.name, []).append((module, a.T, placed))
            node_of[node.name] = node
            reached.update(shared)
        if reached != set(parts):
            raise PipelineError(f"no MatMulNBits computes {sorted(set(parts) - reached)} of layers.{layer}.{module} in "
                                "the exported graph; the builder's node names changed: check onnxruntime-genai's "
                                "version against the lock")
    # Nodes that read the same activation share one A: [A_1 | A_2 ...] once, and each node's B has zero
    # rows for the other nodes' modules (exact). Phi-3's gate_up, split by the builder into gate and up,
    # so computes x A once instead of twice; Llama's separate gate and up share one wider A.
    groups: dict[str, list[str]] = {}
    for name in sorted(per_node, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]):
        groups.setdefault(node_of[name].input[0], []).append(name)
    for names in groups.values():
        modules = list(dict.fromkeys(m for name in names for m, _, _ in per_node[name]))
        a_of = {m: a for name in names for m, a, _ in per_node[name]}
        a_all = np.concatenate([a_of[m] for m in modules], axis=1)
        first = BUILDER_NODE_RE.match(names[0])
        a_name = f"model.layers.{first.group(1)}.{first.group(2)}.{first.group(3)}.lora_A"
        for name in names:
            node = node_of[name]
            dtype = scales_dtype[node.input[2]]
            np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
            match = BUILDER_NODE_RE.match(name)
            base = f"model.layers.{match.group(1)}.{match.group(2)}.{match.group(3)}"
            placed = {m: b for m, _, b in per_node[name]}
            b_all = np.concatenate([placed[m] if m in placed else np.zeros((a_of[m].shape[1], placed_width(per_node[name])),
                                                                             np.float32) for m in modules], axis=0)
            yield (node, base, a_name, f"{base}.lora_B", dtype,
                   np.ascontiguousarray(a_all).astype(np_dtype), np.ascontiguousarray(b_all).astype(np_dtype))


def placed_width(branches) -> int:
    """N of a node's LoRA branches (every B placed at the node's output width)."""
    return branches[0][2].shape[1]


def graft_lora(model_path: Path, adapter_dir: Path, out_model: Path, config: dict) -> dict[str, "object"]:
    """Rewrite the graph with LoRA branches; return the adapter parameters keyed by graph input name."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    params: dict[str, object] = {}
    branches: dict[str, list] = {}  # base node name -> LoRA nodes to place right after it
    for node, base, a_name, b_name, dtype, a_param, b_param in list(_lora_sites(graph, adapter_dir, config)):
        k, n = a_param.shape[0], b_param.shape[1]
        a_base = a_name.removesuffix(".lora_A")
        nodes = []
        # Graph inputs with a zero-width default: no adapter active == base model exactly, and (x A) B is
        # then an empty product, which on an H200 decoded 0.88 of the plain package's rate against 0.58
        # with the rank-1 zero default this replaced (BENCHMARKS.md, Qwen2.5-0.5B shape).
        if a_name not in params:  # the first node of the ones sharing this A computes x A
            graph.input.append(helper.make_tensor_value_info(a_name, dtype, [k, "lora_rank"]))
            graph.initializer.append(numpy_helper.from_array(np.zeros((k, 0), a_param.dtype), a_name))
            nodes.append(helper.make_node("MatMul", [node.input[0], a_name], [f"{a_base}/lora_A/output_0"],
                                          name=f"{a_base}/lora_A/MatMul"))
        params[a_name], params[b_name] = a_param, b_param
        graph.input.append(helper.make_tensor_value_info(b_name, dtype, ["lora_rank", n]))
        graph.initializer.append(numpy_helper.from_array(np.zeros((0, n), a_param.dtype), b_name))
        y = node.output[0]
        node.output[0] = f"{y}/base"
        branches[node.name] = nodes + [
            helper.make_node("MatMul", [f"{a_base}/lora_A/output_0", b_name], [f"{base}/lora_B/output_0"], name=f"{base}/lora_B/MatMul"),
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


def check_logits(package: Path, awq_dir: Path, adapter_dir: Path, adapter_file: Path | None, prompts: list[str],
                 section: ExportSection, target: str, name: str | None = None) -> dict:
    """Max |d| and min cosine of last-token logits, ONNX vs the AWQ checkpoint (float twin), without and
    with the adapter (without only, for a package with no adapter file: a merged one)."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.awq_twin import load_float_twin
    from tasks.genai import last_token_logits, open_model

    tokenizer = AutoTokenizer.from_pretrained(awq_dir)
    twin = load_float_twin(awq_dir)
    name = name or section.adapter_name
    model, adapters = open_model(package, target, {name: adapter_file} if adapter_file else {})
    max_abs_bound, min_cos_bound = section.bounds(target)
    results = {}
    for label, adapter in (("base", None), ("adapter", name)) if adapter_file else (("merged", None),):
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


def export_merged(merged_awq: Path, section: ExportSection, target: str, out: Path, scratch: Path,
                  prompts: list[str]) -> dict:
    """One execution provider's plain model of the merged checkpoint, logits checked against it."""
    raw = scratch / f"builder-{target}"
    log.info("model builder: %s (merged) -> int4 MatMulNBits for %s", merged_awq, target)
    run_builder(merged_awq, raw, target, scratch / "cache")
    out.mkdir(parents=True, exist_ok=True)
    for item in sorted(raw.iterdir()):
        shutil.copyfile(item, out / item.name)
    context = context_limit.apply(out, read_config(merged_awq), section.max_context, target)
    if not target_runs_here(target):
        log.warning("%s model NOT checked: this host has no CUDA GPU", target)
        return {"checked": False, "reason": NO_GPU, "context": context}
    return {"checked": True, "context": context,
            **check_logits(out, merged_awq, Path(), None, prompts, section, target)}


def export_target(awq_dir: Path, finetune_dir: Path, section: ExportSection, target: str, out: Path,
                  scratch: Path, prompts: list[str]) -> dict:
    """One execution provider's model, adapter file and logit check, in ``out`` (= <export>/<target>)."""
    raw = scratch / f"builder-{target}"
    log.info("model builder: %s -> int4 MatMulNBits for %s", awq_dir, target)
    run_builder(awq_dir, raw, target, scratch / "cache")
    log.info("grafting LoRA branches and writing %s/%s%s", target, section.adapter_name, ADAPTER_SUFFIX)
    params = graft_lora(raw / "model.onnx", finetune_dir / "adapter", out / "model.onnx", read_config(awq_dir))
    for item in sorted(raw.iterdir()):
        if item.name not in ("model.onnx", "model.onnx.data"):
            (out / item.name).write_bytes(item.read_bytes())
    context = context_limit.apply(out, read_config(awq_dir), section.max_context, target)
    adapter_file = out / f"{section.adapter_name}{ADAPTER_SUFFIX}"
    write_adapter(params, adapter_file)
    if not target_runs_here(target):
        log.warning("%s model NOT checked: this host has no CUDA GPU. Build on a GPU host (or run "
                    "`doit evaluate` there) before shipping it", target)
        return {"checked": False, "reason": NO_GPU, "context": context}
    return {"checked": True, "context": context,
            **check_logits(out, awq_dir, finetune_dir / "adapter", adapter_file, prompts, section, target)}


def check_prompts(finetune_dir: Path, count: int, awq_dir: Path) -> list[str]:
    """The first held-out prompts of a finetune, as the model sees them at inference (rendered in the
    format it trained with)."""
    from transformers import AutoTokenizer

    from tasks.data import chat_renderer, prompt_text, read_heldout

    template, held = read_heldout(finetune_dir)
    render_chat = chat_renderer(AutoTokenizer.from_pretrained(awq_dir), template, awq_dir)
    return [prompt_text(render_chat, r) for r in held[:count]]


def build_adapter(export_dir: Path, awq_dir: Path, finetune_dir: Path, section: ExportSection, name: str,
                  out: Path) -> dict:
    """An extra adapter's ``<target>/<name>.onnx_adapter`` for the exported base (whose LoRA inputs
    the primary adapter's modules defined), logits checked like the export's own adapter."""
    import onnx

    prompts = check_prompts(finetune_dir, section.check_prompts, awq_dir)
    checks = {}
    for target in section.targets:
        model_path = export_dir / target / "model.onnx"
        graph = onnx.load(str(model_path), load_external_data=False).graph
        params = {}
        for _, _, a_name, b_name, _, a_param, b_param in _lora_sites(graph, finetune_dir / "adapter", read_config(awq_dir)):
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


def _merged(cfg) -> bool:
    return cfg.export.adapter_mode == "merged"


STAGE = Stage(
    "export", "ONNX Runtime GenAI int4 base + switchable .onnx_adapter (or the adapter merged), logits checked",
    upstream=("quantize", "finetune"), entry="tasks.export:run", keys=("export",),
    # merged: the quantize settings, calibration text and device of the AWQ run it repeats
    more_keys=lambda cfg: ("quantize", "build.device") if _merged(cfg) else (),
    files=lambda cfg: [cfg.quantize.calibration] if _merged(cfg) else [],
    gpu=lambda cfg: runs_cuda_target(cfg) or (_merged(cfg) and on_build_device(cfg)), disk=disk.need_export,
)


def run(cfg, paths, out: Path) -> dict:
    """The stage's entry (STAGE above): the builder works in a scratch folder beside the staging one."""
    scratch = paths.scratch("export")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        if cfg.export.adapter_mode == "merged":
            return build_merged(paths.stage("quantize"), paths.stage("finetune"), cfg.export, out, scratch,
                                cfg.quantize, paths.data(cfg.quantize.calibration), cfg.build.device)
        return build(paths.stage("quantize"), paths.stage("finetune"), cfg.export, out, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_adapter(cfg, paths, out: Path, adapter: str) -> dict:
    """The entry of an extra adapter's stage: its .onnx_adapter for the exported base."""
    from tasks.stages import FINETUNE_PREFIX

    return build_adapter(paths.stage("export"), paths.stage("quantize"), paths.stage(FINETUNE_PREFIX + adapter),
                         cfg.export, adapter, out)


def build(awq_dir: Path, finetune_dir: Path, section: ExportSection, out: Path, scratch: Path) -> dict:
    prompts = check_prompts(finetune_dir, section.check_prompts, awq_dir)
    checks = {}
    for target in section.targets:
        checks[target] = export_target(awq_dir, finetune_dir, section, target, out / target, scratch, prompts)
    (out / "export_check.json").write_text(json.dumps(checks, indent=2) + "\n")
    return {"logit_check": checks}


def build_merged(awq_dir: Path, finetune_dir: Path, section: ExportSection, out: Path, scratch: Path,
                 quantize: QuantizeSection, calibration: Path, device: str) -> dict:
    """export.adapter_mode = "merged": the adapter folded in and quantized again (tasks/merge.py), then
    a plain package per target; no adapter file."""
    from tasks.merge import merge_and_requantize, merge_report

    merged_awq = scratch / "merged-awq"
    merge_and_requantize(awq_dir, finetune_dir / "adapter", quantize, calibration, device, merged_awq, scratch)
    prompts = check_prompts(finetune_dir, section.check_prompts, awq_dir)
    checks = {target: export_merged(merged_awq, section, target, out / target, scratch, prompts)
              for target in section.targets}
    merge = merge_report(awq_dir, finetune_dir / "adapter", merged_awq, finetune_dir, device)
    (out / "export_check.json").write_text(json.dumps({**checks, "merge": merge}, indent=2) + "\n")
    return {"logit_check": checks, "merge": merge}
