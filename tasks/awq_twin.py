"""The float "training twin" of an AWQ checkpoint.

Transformers 5 and peft route AWQ layers through gptqmodel, which needs the CUDA 13 line. The twin
avoids that: a plain Phi-3 whose every quantized linear holds exactly the AWQ weights dequantized
(int4 - zero) * scale, the very numbers AutoAWQ's own fallback kernel multiplies with, and whose
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
    shown (the notice is recorded in the README)."""
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
            weight = dequantize_gemm(tensor, raw[prefix + ".qzeros"], raw[prefix + ".scales"], bits, group)
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
    """A Phi3ForCausalLM (eval mode, on ``device``) computing what the AWQ checkpoint computes."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    config = twin_config(awq_dir)
    # Built directly on the target device: the random init it starts with is overwritten at once.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(dequantized_state_dict(awq_dir, dtype), strict=True)
    model.name_or_path = "awq-float-twin"  # recorded by peft in adapter_config.json: keep it stable
    model.config.name_or_path = "awq-float-twin"
    return model.eval()
