"""Round-to-nearest (RTN) weight quantization, per output channel or per group.

A Linear weight W is [out, in]. Per-channel: one scale (and zero point) per output row.
Group-wise: the input dimension is cut into groups of ``group_size`` columns, one scale per
(row, group): W viewed as [out, in / g, g]. Weights are fake-quantized (quantize, then dequantize
back to the original dtype), which is what evaluation needs; the export stage makes the real
low-bit artifacts.
"""

from __future__ import annotations

import torch

from stages.errors import InputError


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """Fake-quantize a 2-D weight [out, in]; returns a tensor of the same shape and dtype.

    symmetric:  q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),   s = max|w| / (2^(b-1) - 1)
    asymmetric: q = clamp(round(w / s) + z, 0, 2^b - 1),          s = (max - min) / (2^b - 1), z = round(-min / s)
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise InputError(f"quantize.scheme.group_size {g} does not divide the input size {in_f} of a layer")
    x = w.float().reshape(out_f, in_f // g, g)  # [out, groups, g]
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax  # [out, groups, 1]
        q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax)
        deq = q * scale
    else:
        qmax = 2**bits - 1
        lo = x.amin(dim=-1, keepdim=True).clamp_max(0.0)
        hi = x.amax(dim=-1, keepdim=True).clamp_min(0.0)
        scale = (hi - lo).clamp_min(1e-8) / qmax
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
        deq = (q - zero) * scale
    return deq.reshape(out_f, in_f).to(w.dtype)


@torch.no_grad()
def quantize_model(model, bits: int, group_size: int | None, symmetric: bool, skip: list[str],
                   clip_search: bool = False) -> dict:
    """Fake-quantize every nn.Linear in place except names ending with an entry of ``skip``.

    clip_search: per row (group) clipping ratio minimising the error (``quantizers.search_clip_ratio``).

    Returns per-layer relative Frobenius error ||W - Q(W)|| / ||W|| and totals.
    """
    layers = {}
    n_quant = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(name.endswith(s) for s in skip):
            continue
        w = mod.weight.data
        if clip_search:
            from stages.quantize.quantizers import quantize_weight, search_clip_ratio

            if w.shape[1] % (group_size or w.shape[1]):
                raise InputError(f"quantize.scheme.group_size {group_size} does not divide the input size "
                                 f"{w.shape[1]} of a layer")
            ratio = search_clip_ratio(w, bits, group_size, symmetric)
            q = quantize_weight(w, bits, group_size, symmetric, clip_ratio=ratio)
        else:
            q = quantize_tensor(w, bits, group_size, symmetric)
        layers[name] = round(((w.float() - q.float()).norm() / w.float().norm().clamp_min(1e-12)).item(), 6)
        mod.weight.data.copy_(q)
        n_quant += w.numel()
    if not layers:
        raise InputError("quantize: no Linear layers to quantize (all skipped?)")
    return {"layers": layers, "quantized_params": n_quant,
            "mean_rel_error": round(sum(layers.values()) / len(layers), 6)}
