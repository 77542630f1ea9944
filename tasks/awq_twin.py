"""The float "training twin" of an AWQ checkpoint.

Transformers 5 and peft route AWQ layers through gptqmodel, which needs the CUDA 13 line. The twin
avoids that: a plain model of the checkpoint's family whose every quantized linear holds exactly the
AWQ weights dequantized (int4 - zero) * scale in fp32 (the int4 ONNX computes with exactly these
numbers; an fp16 product would put a quarter of them up to half an fp16 step off), and whose
every other tensor (embeddings, lm_head and the layer norms, into which AWQ folded its scales) is
taken from the AWQ checkpoint. A LoRA trained on the twin is trained against the 4-bit weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path


def import_awq_quietly() -> None:
    """AutoAWQ's package import forces its multi-line deprecation notice through the warning
    filters (it installs its own filter first); import it once with warnings captured instead of
    shown (AutoAWQ is archived upstream; docs/design.md says why it is still used)."""
    with warnings.catch_warnings(record=True):
        import awq  # noqa: F401


def dequantized_state_dict(awq_dir: Path, dtype=None) -> dict:
    import torch

    import_awq_quietly()
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file

    dtype = dtype or torch.float32
    qcfg = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    bits, group = qcfg["bits"], qcfg["group_size"]
    raw: dict = {}
    for shard in sorted(awq_dir.glob("*.safetensors")):
        raw.update(load_file(shard))
    state = {}
    for name, tensor in raw.items():
        if name.endswith(".qweight"):
            prefix = name.removesuffix(".qweight")
            weight = dequantize_gemm(tensor, raw[prefix + ".qzeros"], raw[prefix + ".scales"].float(), bits, group)
            state[prefix + ".weight"] = weight.T.contiguous().to(dtype)
        elif name.endswith((".qzeros", ".scales")):
            continue
        else:
            state[name] = tensor.to(dtype)
    return state


def twin_config(awq_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(awq_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_float_twin(awq_dir: Path, dtype=None, device: str = "cpu"):
    """A ...ForCausalLM of the checkpoint's family (eval mode, on ``device``) computing what the AWQ
    checkpoint computes. With tied embeddings the checkpoint has no lm_head.weight: the model ties it."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    config = twin_config(awq_dir)
    # Built directly on the target device: the random init it starts with is overwritten at once.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dequantized_state_dict(awq_dir, dtype)
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise RuntimeError(f"the float twin does not match {awq_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    model.name_or_path = "awq-float-twin"  # recorded by peft in adapter_config.json: keep it stable
    model.config.name_or_path = "awq-float-twin"
    return model.eval()
