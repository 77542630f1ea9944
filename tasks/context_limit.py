"""export.max_context: a package that supports a fixed context, and what that buys.

The model builder gives a longrope model (Phi-3/3.5) an ``If`` node that picks the short or the long
rotary cos/sin caches by the sequence's length. onnxruntime-genai cannot capture a CUDA graph around
an ``If`` node, and the node runs on every decode step. A package that never sees more than the
model's original context needs only the short caches: the ``If`` is replaced by its else branch's
constants (the short-context caches, bit for bit), and the cuda target then turns on the CUDA graph.
genai_config.json states the limit (``context_length`` and ``search.max_length``); tasks/genai.py
refuses a longer prompt in one line (onnxruntime-genai 0.14.1 aborts the process instead).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tasks.errors import PipelineError

log = logging.getLogger(__name__)

ROTARY_CACHES = {"cos_cache", "sin_cache"}


def model_context(config: dict) -> tuple[int, int | None]:
    """(the model's context, its original context where longrope extends it, else None)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    longrope = rope.get("rope_type", rope.get("type")) == "longrope"
    original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    return int(config["max_position_embeddings"]), (int(original) if longrope and original else None)


def _context_switch(graph):
    return next(((i, n) for i, n in enumerate(graph.node) if n.op_type == "If" and set(n.output) == ROTARY_CACHES),
                (None, None))


def fold_context_switch(model_path: Path) -> bool:
    """Replace the longrope ``If`` by its short-context branch's constants, in place (the graph file
    only: the weights stay in their external data file). Returns whether there was one."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    index, node = _context_switch(graph)
    if node is None:
        return False
    # The condition is Greater(sequence length, original context): the else branch is the short one.
    branch = next(a.g for a in node.attribute if a.name == "else_branch")
    outside = dict(zip([o.name for o in branch.output], node.output))
    constants = []
    for inner in branch.node:
        if inner.op_type != "Constant" or inner.output[0] not in outside:
            raise PipelineError(f"{model_path.name}: the rotary cache switch's short branch is not constants "
                                "(the builder's layout changed); unset export.max_context or check "
                                "onnxruntime-genai's version against the lock")
        fixed = helper.make_node("Constant", [], [outside[inner.output[0]]], name=f"{node.name}/short/{inner.output[0]}")
        fixed.attribute.extend(inner.attribute)
        constants.append(fixed)
    del graph.node[index]
    for offset, fixed in enumerate(constants):
        graph.node.insert(index + offset, fixed)
    # The nodes that only fed the condition (Shape -> Gather -> Greater ...) are dead now.
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    while True:
        dead = [n for n in graph.node if n.output and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    onnx.save(model, str(model_path))
    return True


def enable_cuda_graph(genai: dict) -> None:
    """Turn on onnxruntime-genai's CUDA graph capture in a genai_config.json's content, in place."""
    options = genai["model"]["decoder"].setdefault("session_options", {})
    providers = options.setdefault("provider_options", [])
    cuda = next((p["cuda"] for p in providers if "cuda" in p), None)
    if cuda is None:
        providers.append({"cuda": (cuda := {})})
    cuda["enable_cuda_graph"] = "1"


def has_context_switch(model_path: Path) -> bool:
    """Whether the graph has longrope's If node choosing the short or the long rotary caches."""
    import onnx

    return _context_switch(onnx.load(str(model_path), load_external_data=False).graph)[1] is not None


def apply(target_dir: Path, config: dict, max_context: int | None, target: str) -> dict:
    """Fit the exported package in ``target_dir`` to ``max_context`` (None: the model's own context,
    nothing changes). Returns what was done, for the export's record."""
    context, original = model_context(config)
    if max_context is None:
        return {"context": context, "fixed": False, "cuda_graph": False}
    if max_context > context:
        raise PipelineError(f"export.max_context={max_context} is more than the model's context ({context}, "
                            "max_position_embeddings in config.json); lower it or unset it")
    fixed = False
    if original is not None:
        if max_context <= original:
            fixed = fold_context_switch(target_dir / "model.onnx")
        else:
            log.info("export.max_context=%d is past the original context (%d): the long rotary caches stay "
                     "switchable, so no CUDA graph", max_context, original)
    path = target_dir / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    genai["model"]["context_length"] = max_context
    genai["search"]["max_length"] = max_context
    cuda_graph = target == "cuda" and (original is None or fixed)
    if cuda_graph:
        enable_cuda_graph(genai)
    path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    log.info("%s: context fixed at %d tokens%s%s", target, max_context,
             "; rotary cache switch folded to the short caches" if fixed else "",
             "; CUDA graph on" if cuda_graph else "")
    return {"context": max_context, "fixed": fixed, "cuda_graph": cuda_graph}
