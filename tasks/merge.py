"""export.adapter_mode = "merged": one adapter folded into the model, which is then quantized again.

The float twin of the AWQ checkpoint (its exact dequantized weights) plus the LoRA delta, merged by
peft, is saved as a float16 model folder and quantized with the same AWQ settings, calibration text
and search as the quantize stage. The model builder then exports it as a plain int4 graph: no LoRA
branches and no adapter inputs, so the package decodes as fast as the builder's own. Requantizing
rounds the merged weights to the int4 grid again, which can eat a small adapter's effect:
``merge_report`` measures the held-out loss of the unmerged model (int4 base + LoRA, what the
switchable package computes) against the merged, requantized one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tasks.awq_quantize import CARRIED_FILES, build as awq_build
from tasks.config import QuantizeSection

log = logging.getLogger(__name__)

# Below this share of the adapter's held-out gain the merged package has mostly lost the fine-tune: export
# says so (log and report) rather than failing, since the package itself is sound. A 2-step adapter on the
# Qwen2.5-0.5B shape kept 11%; 100 steps kept 99.6% (BENCHMARKS.md).
LOW_GAIN_KEPT = 0.5


def merge_and_requantize(awq_dir: Path, adapter_dir: Path, section: QuantizeSection, calibration: Path, device: str,
                         out: Path, scratch: Path) -> dict:
    """An AWQ checkpoint in ``out`` of (the twin of ``awq_dir``) + (the LoRA in ``adapter_dir``)."""
    import torch
    from peft import PeftModel

    from tasks.awq_twin import load_float_twin

    merged_float = scratch / "merged-float16"
    twin = load_float_twin(awq_dir)
    merged = PeftModel.from_pretrained(twin, str(adapter_dir)).merge_and_unload()
    merged.to(torch.float16).save_pretrained(merged_float, safe_serialization=True)
    for name in CARRIED_FILES:
        if (awq_dir / name).is_file():
            shutil.copyfile(awq_dir / name, merged_float / name)
    del twin, merged
    log.info("LoRA merged into the float twin; quantizing the merged model again (AWQ, same settings)")
    facts = awq_build(merged_float, section, calibration, device, out)
    return {"merged_float": merged_float, **facts}


def _response_loss(model, tokenizer, render_chat, records, device: str) -> tuple[float, int]:
    """Mean cross-entropy of the final answers' tokens given the rest, over ``records``."""
    import torch

    from tasks.data import full_text, prompt_text

    total, count = 0.0, 0
    for record in records:
        prompt = tokenizer(prompt_text(render_chat, record), add_special_tokens=False)["input_ids"]
        ids = tokenizer(full_text(render_chat, record), add_special_tokens=False)["input_ids"]
        if len(ids) <= len(prompt):
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        targets = torch.tensor(ids[len(prompt):], device=device)
        total += float(torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], targets, reduction="sum"))
        count += len(targets)
    return total / max(count, 1), count


def merge_report(awq_dir: Path, adapter_dir: Path, merged_awq: Path, finetune_dir: Path, device: str = "cpu",
                 records: int = 16) -> dict:
    """Held-out loss without merging (int4 base + LoRA) and merged (the requantized checkpoint), on the
    build device (the Phi-3.5 shape's three passes took 317 s on an H200 host's CPU)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.awq_twin import load_float_twin
    from tasks.data import chat_renderer, read_heldout

    template, held = read_heldout(finetune_dir)
    tokenizer = AutoTokenizer.from_pretrained(awq_dir)
    render_chat = chat_renderer(tokenizer, template, awq_dir)
    held = held[:records]
    unmerged = PeftModel.from_pretrained(load_float_twin(awq_dir, device=device), str(adapter_dir)).eval()
    with unmerged.disable_adapter():  # the same twin, LoRA off: the base
        base_loss, tokens = _response_loss(unmerged, tokenizer, render_chat, held, device)
    unmerged_loss, _ = _response_loss(unmerged, tokenizer, render_chat, held, device)
    del unmerged
    merged_loss, _ = _response_loss(load_float_twin(merged_awq, device=device), tokenizer, render_chat, held, device)
    # A share of a gain that is itself within rounding (an adapter that barely moved the loss) means nothing.
    gain = base_loss - unmerged_loss
    kept = (base_loss - merged_loss) / gain if abs(gain) >= 1e-3 else None
    log.info("held-out loss over %d answer tokens: base %.4f, base + LoRA %.4f, merged and requantized %.4f "
             "(%s of the adapter's gain kept)", tokens, base_loss, unmerged_loss, merged_loss,
             "n/a" if kept is None else f"{kept:.0%}")
    report = {"tokens": tokens, "base": round(base_loss, 5), "unmerged": round(unmerged_loss, 5),
              "merged": round(merged_loss, 5), "gain_kept": None if kept is None else round(kept, 4)}
    if kept is not None and kept < LOW_GAIN_KEPT:
        report["warning"] = (f"merging kept {kept:.0%} of the adapter's gain on the held-out records: requantizing to "
                             "int4 rounded most of the LoRA away; ship export.adapter_mode = \"switchable\" (exact), or "
                             "train a stronger adapter (more finetune.max_steps, a higher finetune.rank)")
        log.warning(report["warning"])
    return report
