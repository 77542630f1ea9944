"""A faster AWQ search that makes AutoAWQ's choices: same scale grid, same clip grid, same loss.

AutoAWQ 0.2.9's ``AwqQuantizer`` spends most of a layer's time on the GPU moving data, not
computing: it copies every linear's inputs to host memory and back, sums activation magnitudes on
the CPU, saves the inspected module's weights to host memory and reloads them for each of the 20
grid points, and evaluates the clip grid as a broadcast multiply over [channels, tokens, groups,
group size] in slices of 256 channels. ``FastAwqQuantizer`` keeps AutoAWQ's outer loop (layer
order, scale application, clipping, packing) and replaces only the searches:

- scale search: the candidate weights Q(W*s)/s are computed exactly as AutoAWQ does, but passed to
  the module with ``torch.func.functional_call`` instead of being written into it and restored from
  a host copy; the module's forward and the loss are AutoAWQ's own, so each candidate's loss is the
  same number and the chosen scales are the same;
- clip search: the candidates are clipped and quantized exactly as AutoAWQ does, but their outputs
  are one batched matrix product per candidate ([groups, tokens, group size] @ [groups, group size,
  channels], all output channels at once) in float32. AutoAWQ computes products, outputs and squared
  errors in fp16, where small errors underflow and candidates tie or rank wrongly; so the two pick
  different clips now and then, and there the fast pick has the lower exact error
  (tests/test_awq_search.py measures both facts);
- activations and features stay on the device (no host round trips);
- packing into AutoAWQ's GEMM layout is vectorised (AutoAWQ loops over every input column and
  every packed output column in Python, ~0.7 s per linear on the Phi-3.5-mini shape); the bits are
  identical (tests/test_awq_search.py).

On CPU the same code runs (and the in-place weight bug of AutoAWQ's CPU search cannot occur,
since the search never writes the weights).
"""

from __future__ import annotations

import functools
from collections import defaultdict

from tasks.awq_twin import import_awq_quietly

import_awq_quietly()

import torch  # noqa: E402
from awq.quantize.quantizer import AwqQuantizer  # noqa: E402
from awq.utils.module import get_op_name  # noqa: E402

N_GRID = 20
# Model types whose feature capture AutoAWQ special-cases (MoE blocks); left to AutoAWQ.
SPECIAL_FEATURE_TYPES = ("mixtral", "deepseek_v2", "deepseek_v3", "qwen3_moe")


def clip_errors(quantize, w: torch.Tensor, x: torch.Tensor, group_size: int, n_grid: int = N_GRID,
                max_shrink: float = 0.5, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors of every clip candidate and the candidates' max values.

    w: [co, ci] weights, x: [tokens, ci] sampled inputs. Candidates are clipped and quantized in w's
    dtype, exactly as AutoAWQ does; their outputs and errors are computed in ``dtype``. Returns
    (errors [steps, co, n_group], max_vals [steps, co, n_group] in w's dtype), step i clipping at
    (1 - i/n_grid) * max|w|.
    """
    co, ci = w.shape
    n_group = ci // group_size
    wg = w.reshape(co, n_group, group_size)
    xg = x.to(dtype).reshape(-1, n_group, group_size).transpose(0, 1)  # [g, tok, gs]
    org_max_val = wg.abs().amax(dim=-1, keepdim=True)                 # [co, g, 1]
    org_out = torch.bmm(xg, wg.to(dtype).permute(1, 2, 0))            # [g, tok, co]
    errors, max_vals = [], []
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)                    # AutoAWQ's expression, same dtype
        cur_w = torch.clamp(wg, -max_val, max_val)
        q_w = quantize(cur_w.reshape(co, ci))[0].reshape(co, n_group, group_size)
        cur_out = torch.bmm(xg, q_w.to(dtype).permute(1, 2, 0))
        errors.append((cur_out - org_out).pow(2).mean(dim=1).transpose(0, 1))  # [co, g]
        max_vals.append(max_val.squeeze(-1))
    return torch.stack(errors), torch.stack(max_vals)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM layout: nibble i of a word holds column AWQ_ORDER[i]


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] int32 in 0..15 -> [rows, cols/8] int32, bit for bit as WQLinear_GEMM.from_linear."""
    grouped = values.view(values.shape[0], -1, 8)
    packed = torch.zeros(grouped.shape[:2], dtype=torch.int32, device=values.device)
    for i, col in enumerate(AWQ_ORDER):
        packed |= grouped[:, :, col] << (4 * i)
    return packed


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols/8] packed int32 -> [8, rows, cols/8] codes 0..15 (nibble order, enough to compare)."""
    return torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)])


def identical_codes(a: dict, b: dict) -> tuple[int, int]:
    """(identical, total) int4 codes over every ``*qweight`` tensor of two state dicts."""
    same = total = 0
    for key in a:
        if key.endswith("qweight"):
            ca, cb = unpack_int4(a[key]), unpack_int4(b[key])
            same, total = same + int((ca == cb).sum()), total + ca.numel()
    return same, total


@torch.no_grad()
def pack_gemm(linear, group_size: int, scales: torch.Tensor, zeros: torch.Tensor):
    """WQLinear_GEMM.from_linear without its per-column Python loops (same fp16 arithmetic, same bits).

    scales, zeros: [in/group, out] as AutoAWQ's _apply_quant passes them.
    """
    from awq.modules.linear.gemm import WQLinear_GEMM

    q = WQLinear_GEMM.from_linear(linear, 4, group_size, init_only=True)
    q.scales = scales.clone().half()
    if linear.bias is not None:
        q.bias = linear.bias.clone().half()
    scale_zeros = zeros * scales
    # AutoAWQ: round((W[:, i] + scale_zeros[i // g]) / scales[i // g]) column by column, in fp16.
    per_column = lambda t: t.repeat_interleave(group_size, dim=0).t()
    intweight = torch.round((linear.weight.data + per_column(scale_zeros)) / per_column(q.scales)).to(torch.int)
    q.qweight = pack_int4(intweight.t().contiguous().to(torch.int32))
    q.qzeros = pack_int4(zeros.to(torch.int32))
    return q


class FastAwqQuantizer(AwqQuantizer):
    """AwqQuantizer with device-resident, batched scale and clip searches (see module docstring)."""

    # --- features: keep them on the device ---------------------------------------------------

    def _get_input_feat(self, layer, named_linears):
        if self.awq_model.model_type in SPECIAL_FEATURE_TYPES:
            return super()._get_input_feat(layer, named_linears)
        feats: dict[str, list] = defaultdict(list)

        def keep_input(module, inputs, output, name):
            feats[name].append(inputs[0].detach())

        handles = [m.register_forward_hook(functools.partial(keep_input, name=n)) for n, m in named_linears.items()]
        self.inps = self.inps.to(next(layer.parameters()).device)
        try:
            self.inps = self._module_forward(self.inps, layer, self._sanitize_kwargs(self.module_kwargs, layer))
        finally:
            for h in handles:
                h.remove()
        return {name: torch.cat(chunks, dim=0) for name, chunks in feats.items()}

    # --- scale search ------------------------------------------------------------------------

    @torch.no_grad()
    def _search_best_scale(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
        if module2inspect is None:
            assert len(layers) == 1
            module2inspect = layers[0]
        kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
        inp = inp.to(next(module2inspect.parameters()).device)

        # Per-channel mean of group-normalised weight magnitudes (AutoAWQ's w_mean).
        weight = torch.cat([m.weight for m in layers], dim=0)
        grouped = weight.view(-1, self.group_size)
        w_scale = (grouped.abs() / (grouped.abs().amax(dim=1, keepdim=True) + 1e-6)).view(weight.shape)
        w_mean = w_scale.mean(0)
        del weight, grouped, w_scale

        # Per-channel mean input magnitude, summed in float32 in AutoAWQ's chunks, on the device.
        flat = inp.view(-1, inp.shape[-1])
        chunk = min(int(self.max_chunk_memory // (flat.element_size() * 2 * flat.shape[1])), flat.shape[0])
        x_sum = torch.zeros(flat.shape[1], dtype=torch.float32, device=inp.device)
        for start in range(0, flat.shape[0], chunk):
            x_sum += flat[start:start + chunk].abs().float().sum(dim=0)
        x_mean = (x_sum / flat.shape[0]).to(inp.dtype)

        module_kwargs = self._sanitize_kwargs(kwargs, module2inspect)
        fp16_output = self._module_forward(inp, module2inspect, module_kwargs)
        fp16_output = fp16_output.clip(torch.finfo(fp16_output.dtype).min, torch.finfo(fp16_output.dtype).max)
        best_scales = self._compute_best_scale(inp, w_mean, x_mean, module2inspect, layers, fp16_output, module_kwargs)
        return get_op_name(module, prev_op), tuple(get_op_name(module, m) for m in layers), best_scales

    def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
        device = x.device
        x_mean, w_mean = x_mean.view(-1).to(device), w_mean.view(-1).to(device)
        names = {id(m): n for n, m in module2inspect.named_modules()}
        weight_keys = [f"{names[id(fc)]}.weight" if names[id(fc)] else "weight" for fc in linears2scale]
        best_ratio, best_error, best_scales, history = -1, float("inf"), None, []
        for step in range(N_GRID):
            ratio = step / N_GRID
            if self.duo_scaling:
                scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            else:
                scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
            scales = scales / (scales.max() * scales.min()).sqrt()
            scales_view = scales.view(1, -1).to(device)
            scales[torch.isinf(scales)] = 1
            scales[torch.isnan(scales)] = 1
            # Q(W * s) / s, the same operations AutoAWQ applies in place, as new tensors.
            candidates = {key: self.pseudo_quantize_tensor(fc.weight * scales_view)[0] / scales_view
                          for key, fc in zip(weight_keys, linears2scale)}
            out = self._candidate_forward(x, module2inspect, candidates, kwargs)
            out = out.clip(torch.finfo(out.dtype).min, torch.finfo(out.dtype).max)
            loss = self._compute_loss(fp16_output, out, device)
            history.append(loss)
            if loss < best_error:
                best_error, best_ratio, best_scales = loss, ratio, scales.clone()
            del candidates, out
        if best_ratio == -1:
            raise RuntimeError(f"AWQ scale search found no finite loss: {history}")
        return best_scales.detach().cpu()

    def _candidate_forward(self, x, module, weights: dict, kwargs: dict):
        """``module(x)`` with some weights replaced, without touching the module's parameters."""
        from torch.func import functional_call

        if self.n_parallel_calib_samples is None:
            out = functional_call(module, weights, (x,), kwargs)
            return out[0] if isinstance(out, tuple) else out
        parts = []
        for part in torch.split(x, self.n_parallel_calib_samples):
            out = functional_call(module, weights, (part,), kwargs)
            parts.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(parts, dim=0)

    # --- clip search -------------------------------------------------------------------------

    @torch.no_grad()
    def _search_best_clip(self, layer, named_linears, input_feat):
        avoid = ["q_", "k_", "query", "key", "Wqkv"]  # AutoAWQ's list: q/k feed a product, not clipped
        # AutoAWQ's apply_scale has just moved the linears to host memory; search where the features are.
        return [(name, self._compute_best_clip(linear.weight.data.to(input_feat[name].device), input_feat[name]).cpu())
                for name, linear in named_linears.items() if not any(a in name for a in avoid)]

    # --- packing ---------------------------------------------------------------------------

    def _apply_quant(self, module, named_linears):
        if self.version != "gemm" or self.w_bit != 4:
            return super()._apply_quant(module, named_linears)
        from awq.utils.module import set_op_by_name

        device = next(module.parameters()).device
        for name, linear in named_linears.items():
            linear = linear.to(device).half()
            linear.weight.data, scales, zeros = self.pseudo_quantize_tensor(linear.weight.data)
            q_linear = pack_gemm(linear, self.group_size, scales.t().contiguous(), zeros.t().contiguous())
            linear.cpu()
            set_op_by_name(module, name, q_linear.to(device))

    @torch.no_grad()
    def _compute_best_clip(self, w, input_feat, n_grid=N_GRID, max_shrink=0.5, n_sample_token=512):
        group_size = self.group_size if self.group_size > 0 else w.shape[1]
        x = input_feat.reshape(-1, input_feat.shape[-1])
        x = x[:: max(1, x.shape[0] // n_sample_token)].to(w.device)   # AutoAWQ's token sample
        errors, max_vals = clip_errors(self.pseudo_quantize_tensor, w, x, group_size, n_grid, max_shrink)
        best = errors.argmin(dim=0, keepdim=True)                      # first minimum, as AutoAWQ's "<"
        return max_vals.gather(0, best)[0].unsqueeze(-1)               # [co, n_group, 1]
