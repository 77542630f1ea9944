"""AWQ 4-bit (zero point, GEMM layout) of a model folder with AutoAWQ, on CPU or CUDA: the quantize
stage's work, and the export's in export.adapter_mode = "merged" (the merged model quantized again).

Calibration text comes from a local file, never from a Hub dataset. Olive's AWQ pass refuses CPU,
so AutoAWQ is called directly; the same code runs on both devices. The scale and clip searches are
tasks/awq_search.py's by default (same choices, several times faster on a GPU); ``quantize.search =
"autoawq"`` runs AutoAWQ's own.

AutoAWQ 0.2.9 has a CPU-only bug in its scale search: it "saves" the weights with ``.cpu()``, which
on CPU returns the same tensors, then scales them in place, so every candidate is evaluated on the
wrong weights and the model is left corrupted. ``CloningAwqQuantizer`` hands the search real copies;
tests/test_quantize.py shows that AWQ scaling alone then preserves the model's function.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from tasks.awq_twin import import_awq_quietly
from tasks.config import QuantizeSection
from tasks.devices import select_device
from tasks.errors import PipelineError

log = logging.getLogger(__name__)

# Files of the base folder that AutoAWQ's save_quantized does not carry over.
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json", "added_tokens.json",
)


def _cloning_quantizer_cls():
    import_awq_quietly()
    from awq.quantize.quantizer import AwqQuantizer

    class CloningAwqQuantizer(AwqQuantizer):
        """AwqQuantizer whose scale search restores the weights from true copies."""

        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
            original = module2inspect.state_dict

            def cloned_state_dict(*args, **kw):
                return {k: v.detach().clone() for k, v in original(*args, **kw).items()}

            module2inspect.state_dict = cloned_state_dict  # instance attribute shadows the method
            try:
                return super()._compute_best_scale(
                    x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs
                )
            finally:
                del module2inspect.state_dict

    return CloningAwqQuantizer


class LayerProgress:
    """Mixin: one log line per quantized decoder layer (AutoAWQ's own tqdm bar goes to the console only)."""

    def __init__(self, *args, **kwargs):
        import time

        super().__init__(*args, **kwargs)  # captures the calibration inputs
        self._search_start, self._layers_done = time.monotonic(), 0

    def _apply_quant(self, module, named_linears):
        import time

        super()._apply_quant(module, named_linears)
        self._layers_done += 1
        log.info("AWQ layer %d/%d done, %.1fs into the search", self._layers_done, len(self.modules),
                 time.monotonic() - self._search_start)


def quantizer_class(search: str):
    """The AwqQuantizer subclass for ``quantize.search``: "fast" or "autoawq" (AutoAWQ's loops, CPU-fixed)."""
    if search == "fast":
        from tasks.awq_search import FastAwqQuantizer
        base = FastAwqQuantizer
    else:
        base = _cloning_quantizer_cls()
    return type(base.__name__, (LayerProgress, base), {})


@contextlib.contextmanager
def half_matmuls_in_float32_on_cpu():
    """Every fp16 linear and attention on CPU computed in float32 and rounded once to fp16.

    PyTorch's CPU fp16 matmul runs about five times slower than its float32 one (measured on the tiny
    model's AWQ shapes: 0.63 s against 0.13 s), and AWQ's search is mostly such matmuls: 67 of the
    stage's 70 s here. A GPU's fp16 matmul also accumulates in float32 and rounds once, so these are
    the numerics AutoAWQ was written for; both searches ("fast" and "autoawq") run under them."""
    import torch
    import torch.nn.functional as F

    half_linear, half_attention = F.linear, F.scaled_dot_product_attention

    def on_cpu_in_half(x):
        return x.dtype == torch.float16 and x.device.type == "cpu"

    def linear(x, weight, bias=None):
        if on_cpu_in_half(x):
            return half_linear(x.float(), weight.float(), None if bias is None else bias.float()).half()
        return half_linear(x, weight, bias)

    def attention(query, key, value, attn_mask=None, *args, **kwargs):
        if on_cpu_in_half(query):
            mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
            return half_attention(query.float(), key.float(), value.float(), mask, *args, **kwargs).half()
        return half_attention(query, key, value, attn_mask, *args, **kwargs)

    # Modules look both up on torch.nn.functional at call time (nn.Linear.forward, transformers' sdpa).
    F.linear, F.scaled_dot_product_attention = linear, attention
    try:
        yield
    finally:
        F.linear, F.scaled_dot_product_attention = half_linear, half_attention


def quant_config(section: QuantizeSection) -> dict:
    return {
        "zero_point": section.zero_point,
        "q_group_size": section.group_size,
        "w_bit": section.bits,
        "version": section.version.upper(),
    }


def read_calibration(path: Path) -> list[str]:
    if not path.is_file():
        raise PipelineError(f"calibration text {path} not found; set quantize.calibration to a local text file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise PipelineError(f"calibration text {path} is empty; put one paragraph per line in it")
    return lines


def build(base: Path, section: QuantizeSection, calibration: Path, device: str, out: Path,
          trust_remote_code: bool = False) -> dict:
    select_device(device)
    import torch

    import_awq_quietly()
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    texts = read_calibration(calibration)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    n_tokens = sum(len(tokenizer.encode(t)) for t in texts[: section.calibration_samples]
                   if len(tokenizer.encode(t)) <= section.calibration_seq_len)
    if n_tokens < section.calibration_seq_len:
        raise PipelineError(
            f"calibration text {calibration} gives {n_tokens} tokens, fewer than one block of "
            f"quantize.calibration_seq_len={section.calibration_seq_len}; add text or lower the setting"
        )
    log.info("AWQ %d-bit, group %d, zero point %s, %s; calibration: %d texts, %d tokens in blocks of %d; "
             "%s search on %s", section.bits, section.group_size, section.zero_point, section.version.upper(),
             min(len(texts), section.calibration_samples), n_tokens, section.calibration_seq_len,
             section.search, device)
    torch.manual_seed(0)
    model = AutoAWQForCausalLM.from_pretrained(
        str(base), torch_dtype=torch.float16, device_map="cpu",
        trust_remote_code=trust_remote_code, use_cache=False,
    )
    with half_matmuls_in_float32_on_cpu():
        model.quantize(
            tokenizer,
            quant_config=quant_config(section),
            calib_data=texts,
            max_calib_samples=section.calibration_samples,
            max_calib_seq_len=section.calibration_seq_len,
            quantizer_cls=quantizer_class(section.search),
        )
    model.save_quantized(str(out), safetensors=True)
    for name in CARRIED_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    return {"calibration_tokens": n_tokens}
