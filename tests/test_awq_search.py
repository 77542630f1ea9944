"""The fast AWQ search makes AutoAWQ's choices on the same model and data."""

from pathlib import Path

import pytest
import torch

from tasks.awq_search import identical_codes
from tasks.config import QuantizeSection
from tasks.awq_quantize import half_matmuls_in_float32_on_cpu, quant_config, quantizer_class, read_calibration

from conftest import REPO, doit

pytestmark = pytest.mark.slow
CODES_IDENTICAL_AT_LEAST = 0.99  # measured: 1,302,498 of 1,310,720 (99.37%) on the tiny model
CLIP_DIFFERENT_AT_MOST = 0.05  # measured: 151 of 5120 (2.9%) on the tiny model's first layer


def quantizer(base: Path, search: str):
    """A quantizer of the given kind, initialised on the tiny base (calibration inputs captured)."""
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    awq_model = AutoAWQForCausalLM.from_pretrained(str(base), torch_dtype=torch.float16, device_map="cpu")
    cfg = quant_config(QuantizeSection())
    return quantizer_class(search)(
        awq_model, awq_model.model, tokenizer, cfg["w_bit"], cfg["q_group_size"], cfg["zero_point"],
        cfg["version"], read_calibration(REPO / "data/calibration.txt"), "train", "text", True,
        max_calib_samples=64, max_calib_seq_len=256,
    )


@pytest.fixture(scope="module")
def layer0(built_project):
    base = built_project / "build/tiny/base"
    out = {}
    with half_matmuls_in_float32_on_cpu():  # as the stage runs both searches
        for search in ("autoawq", "fast"):
            q = quantizer(base, search)
            layer = q.modules[0]
            from awq.utils.module import get_named_linears

            linears = get_named_linears(layer)
            # What AwqQuantizer.quantize() prepares before a layer's searches (transformers >= 4.48).
            q.module_kwargs["position_embeddings"] = q.model.model.rotary_emb(q.inps, q.module_kwargs["position_ids"])
            q.module_kwargs.setdefault("attention_mask", None)
            feats = q._get_input_feat(layer, linears)
            groups = q.awq_model.get_layers_for_scaling(layer, feats, q.module_kwargs)
            out[search] = {"q": q, "linears": linears, "feats": feats,
                           "scales": [q._search_best_scale(layer, **g)[2] for g in groups]}
    return out


def test_fast_scale_search_picks_exactly_autoawqs_scales(layer0):
    ref, fast = layer0["autoawq"]["scales"], layer0["fast"]["scales"]
    assert len(ref) == len(fast) == 4  # qkv, o, gate_up, down
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)


def test_fast_clip_search_agrees_with_autoawq_or_picks_a_better_clip(layer0):
    """AutoAWQ rounds every product and squared error to fp16; on small outputs (this tiny model's
    are ~1e-3) its error underflows and candidates tie or rank wrongly. The fast search computes the
    same error in float32. Where the two picks differ, the fast pick is never worse by the exact
    (float64) error, and they differ rarely."""
    from tasks.awq_search import clip_errors

    ref_q, fast_q = layer0["autoawq"]["q"], layer0["fast"]["q"]
    total = differing = 0
    for name, linear in layer0["autoawq"]["linears"].items():
        w, feat = linear.weight.data, layer0["autoawq"]["feats"][name]
        ref = ref_q._compute_best_clip(w, feat)
        fast = fast_q._compute_best_clip(w, feat)
        assert ref.shape == fast.shape
        differ = (ref != fast).squeeze(-1)
        total += differ.numel()
        differing += int(differ.sum())
        if differ.any():
            x = feat.reshape(-1, feat.shape[-1])
            x = x[:: max(1, x.shape[0] // 512)]
            errors, max_vals = clip_errors(ref_q.pseudo_quantize_tensor, w, x, ref_q.group_size, dtype=torch.float64)

            def exact_error(chosen):
                matches = max_vals == chosen.squeeze(-1)
                assert matches.any(0).all(), "a pick is not one of the grid's candidates"
                step = matches.float().argmax(0, keepdim=True)
                return errors.gather(0, step)[0][differ]

            e_ref, e_fast = exact_error(ref), exact_error(fast)
            assert (e_fast <= e_ref * (1 + 1e-3) + 1e-15).all(), name
    print(f"clip picks differing: {differing} of {total}")
    assert differing / total <= CLIP_DIFFERENT_AT_MOST, f"{differing} of {total} clip values differ"


def test_fast_and_autoawq_checkpoints_match(built_project, project_copy):
    """End to end: the default (fast) build's int4 codes against a build with AutoAWQ's own search.
    Same scales (so norms and embeddings are bit-identical); codes differ only in the groups whose
    clip differs (see above)."""
    from safetensors.torch import load_file

    doit(project_copy, "quantize", "quantize.search=autoawq", "build.dir=build/autoawq")
    fast = load_file(built_project / "build/tiny/quantize/model.safetensors")
    ref = load_file(project_copy / "build/autoawq/quantize/model.safetensors")
    assert fast.keys() == ref.keys()
    for key in fast:
        if not key.endswith((".qweight", ".qzeros", ".scales")):
            assert torch.equal(fast[key], ref[key]), key  # norms (with folded scales), embeddings, lm_head
    same, total = identical_codes(fast, ref)  # eight 4-bit codes per int32: compare codes, not words
    print(f"int4 codes identical: {same} of {total}")
    assert same / total >= CODES_IDENTICAL_AT_LEAST, f"{same}/{total} int4 codes identical"


def test_vectorised_packing_is_bit_identical_to_autoawqs_from_linear():
    from awq.modules.linear.gemm import WQLinear_GEMM

    from tasks.awq_search import pack_gemm

    from awq.quantize.quantizer import AwqQuantizer

    torch.manual_seed(0)
    settings = type("Settings", (), {"group_size": 64, "zero_point": True, "w_bit": 4})()  # all pseudo_quantize reads
    linear = torch.nn.Linear(256, 96, bias=True).half()
    linear.weight.data, scales, zeros = AwqQuantizer.pseudo_quantize_tensor(settings, linear.weight.data)
    scales, zeros = scales.t().contiguous(), zeros.t().contiguous()
    ref = WQLinear_GEMM.from_linear(linear, 4, 64, scales=scales, zeros=zeros)
    fast = pack_gemm(linear, 64, scales, zeros)
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(ref, name), getattr(fast, name)), name
