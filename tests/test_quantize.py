"""AWQ on CPU and the float training twin, against AutoAWQ's own reference arithmetic."""

from pathlib import Path

import pytest
import torch

from tasks.awq_twin import load_float_twin, twin_config
from tasks.awq_quantize import _cloning_quantizer_cls, quant_config, read_calibration

from conftest import REPO

pytestmark = pytest.mark.slow
PROMPTS = ["<|user|>\nWhat's a must-see in Paris?<|end|>\n<|assistant|>\n",
           "Lisbon is built on seven hills above the Tagus river, and its trams climb them all day."]


def logits_of(model, tokenizer):
    with torch.no_grad():
        return [model(torch.tensor([tokenizer.encode(p)])).logits[0].float() for p in PROMPTS]


def compare(a, b):
    a, b = torch.cat(a), torch.cat(b)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    return (a - b).abs().max().item(), cos, (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def scale_only(base: Path, quantizer_cls, samples: int = 32):
    """AWQ's scale search and scaling without quantizing: must not change what the model computes."""
    from awq import AutoAWQForCausalLM
    from awq.quantize.quantizer import AwqQuantizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoAWQForCausalLM.from_pretrained(str(base), torch_dtype=torch.float16, device_map="cpu", trust_remote_code=False)
    before = logits_of(model.model, tokenizer)
    from tasks.config import QuantizeSection

    model.quantize(tokenizer, quant_config=quant_config(QuantizeSection(group_size=64)),
                   calib_data=read_calibration(REPO / "data" / "calibration.txt"), max_calib_samples=samples,
                   max_calib_seq_len=128, export_compatible=True, apply_clip=False,
                   quantizer_cls=quantizer_cls or AwqQuantizer)
    return compare(before, logits_of(model.model, tokenizer))


def family_base(family: str, tmp_path_factory) -> Path:
    """A tiny random-init model of ``family`` (hidden 128, 2 layers), as the tiny profile builds it."""
    from tasks.base_model import build_tiny_model
    from tasks.config import TinyModel

    out = tmp_path_factory.mktemp(family) / "base"
    build_tiny_model(TinyModel(family=family, hidden_size=128, intermediate_size=256, vocab_size=1000), REPO, out)
    return out


@pytest.mark.parametrize("family", ["phi3", "llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_awq_scaling_alone_preserves_the_model_on_cpu_for_every_family(family, request, tmp_path_factory):
    """AutoAWQ's search with our CPU fix, on each family's own layer map (which linears are scaled
    together, against which norm or linear): scaling by s and 1/s must leave the function alone."""
    base = (request.getfixturevalue("built_project") / "build/tiny/base" if family == "phi3"
            else family_base(family, tmp_path_factory))
    max_abs, cos, top1 = scale_only(base, _cloning_quantizer_cls(), 32 if family == "phi3" else 8)
    # fp16 arithmetic: scaling by s and 1/s rounds differently (one fp16 step), nothing more. Top-1
    # is not asserted: a random-init model's logits are nearly tied, so one ulp can flip an argmax.
    assert max_abs < 0.01 and cos > 0.99999, (max_abs, cos, top1)


def test_stock_autoawq_corrupts_the_model_on_cpu_which_is_why_we_patch_it(built_project):
    """If this starts failing, AutoAWQ fixed its CPU scale search and the workaround can go."""
    max_abs, cos, top1 = scale_only(built_project / "build/tiny/base", None)
    assert max_abs > 0.05 and cos < 0.9999, (max_abs, cos, top1)


def awq_reference_model(awq_dir: Path):
    """The AWQ checkpoint run by AutoAWQ's own WQLinear_GEMM modules (naive CPU path)."""
    import json

    from awq.modules.linear import gemm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    group = json.loads((awq_dir / "config.json").read_text())["quantization_config"]["group_size"]
    model = AutoModelForCausalLM.from_config(twin_config(awq_dir), dtype=torch.float16)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                setattr(module, child_name, gemm.WQLinear_GEMM(4, group, child.in_features, child.out_features, False, "cpu"))
    model.load_state_dict(load_file(awq_dir / "model.safetensors"), strict=True)
    return model.eval()


def test_float_twin_computes_the_awq_checkpoints_logits(built_project, monkeypatch):
    from awq.modules.linear import gemm
    from transformers import AutoTokenizer

    monkeypatch.setattr(gemm, "TRITON_AVAILABLE", False)  # triton needs a GPU; use AutoAWQ's CPU path
    awq_dir = built_project / "build/tiny/quantize"
    tokenizer = AutoTokenizer.from_pretrained(awq_dir)
    reference = logits_of(awq_reference_model(awq_dir), tokenizer)
    # Same dtype as AutoAWQ's kernel: identical weights, only matmul summation order may differ.
    max_abs, cos, top1 = compare(reference, logits_of(load_float_twin(awq_dir, torch.float16), tokenizer))
    assert max_abs < 1e-2 and cos > 0.99999 and top1 == 1.0, (max_abs, cos, top1)
    # The fp32 twin that finetune trains: same weights, fp32 activations (AutoAWQ's are fp16).
    max_abs, cos, top1 = compare(reference, logits_of(load_float_twin(awq_dir, torch.float32), tokenizer))
    assert max_abs < 5e-2 and cos > 0.9999 and top1 > 0.99, (max_abs, cos, top1)
