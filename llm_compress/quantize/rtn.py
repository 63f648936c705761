"""Round-to-nearest (RTN) weight quantization, per output channel or per group.

A Linear weight W is [out, in]. Per-channel: one scale (and zero point) per output row.
Group-wise: the input dimension is cut into groups of ``group_size`` columns, one scale per
(row, group): W viewed as [out, in / g, g]. Weights are fake-quantized (quantize, then dequantize
back to the original dtype), which is what evaluation needs; the export stage makes the real
low-bit artifacts.
"""

from __future__ import annotations

import torch

from llm_compress.errors import InputError
from llm_compress.quantize.quantizers import dequantize_codes, quantize_weight, search_clip_ratio, weight_codes


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                    clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Fake-quantize a 2-D weight [out, in]; returns a tensor of the same shape and dtype.

    symmetric:  q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),   s = max|w| / (2^(b-1) - 1)
    asymmetric: q = clamp(round(w / s) + z, 0, 2^b - 1),          s = (max - min) / (2^b - 1), z = round(-min / s)
    (ranges shrunk by ``clip_ratio``); the arithmetic is ``quantizers.quantize_weight``'s. This entry point
    checks the group size against the layer in the recipe's terms.
    """
    _check_layer(w, group_size)
    return quantize_weight(w, bits, group_size, symmetric, clip_ratio)


def _check_layer(w: torch.Tensor, group_size: int | None) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if group_size is not None and w.shape[1] % group_size:
        raise InputError(f"quantize.scheme.group_size {group_size} does not divide the input size {w.shape[1]} "
                         "of a layer")


@torch.no_grad()
def quantize_model(model, bits: int, group_size: int | None, symmetric: bool, skip: list[str],
                   clip_search: bool = False, codes: dict | None = None) -> dict:
    """Fake-quantize every nn.Linear in place except names ending with an entry of ``skip``.

    clip_search: per row (group) clipping ratio minimising the error (``quantizers.search_clip_ratio``).
    codes: if given, filled with {name: (codes [out, in], scale, zero [out, groups, 1])}, the integer solution the
    weights are the dequantization of (what the packed exports write).

    Returns per-layer relative Frobenius error ||W - Q(W)|| / ||W|| and totals.
    """
    layers = {}
    n_quant = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(name.endswith(s) for s in skip):
            continue
        w = mod.weight.data
        _check_layer(w, group_size)  # before the search, so a bad group size is named in the recipe's terms
        ratio = search_clip_ratio(w, bits, group_size, symmetric) if clip_search else 1.0
        c, scale, zero = weight_codes(w, bits, group_size, symmetric, ratio)
        q = dequantize_codes(c, scale, zero, dtype=w.dtype)  # = quantize_weight(w, ...)
        if codes is not None:
            codes[name] = (c, scale, zero)
        layers[name] = round(((w.float() - q.float()).norm() / w.float().norm().clamp_min(1e-12)).item(), 6)
        mod.weight.data.copy_(q)
        n_quant += w.numel()
    if not layers:
        raise InputError("quantize: no Linear layers to quantize (all skipped?)")
    return {"layers": layers, "quantized_params": n_quant,
            "mean_rel_error": round(sum(layers.values()) / len(layers), 6)}
