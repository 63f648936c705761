"""Uniform integer fake quantizers for weights, activations and the KV cache (OSTQuant/QuaRot conventions).

Every function here *fake*-quantizes: it quantizes to a b-bit integer grid and dequantizes straight back, so
the result has the input's shape and dtype and only its values are restricted to the grid.

Grids (b = bits, s = scale, z = zero point, r = clip ratio in (0, 1]):
    symmetric:  q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1),   s = r * max|x| / (2^(b-1) - 1),   z = 0
    asymmetric: q = clamp(round(x / s) + z, 0, 2^b - 1),           s = r * (max' - min') / (2^b - 1),
                z = round(-r * min' / s),  with min' = min(min x, 0), max' = max(max x, 0)  (0 is always on the grid)
    dequantize: x_hat = (q - z) * s
A range of zero (an all-zero row/group/token) gets a tiny positive scale, so zeros map to zeros.
Tight asymmetric grid (``zero_on_grid=False``, KIVI's and KVTuner's min-max): min' = min x, max' = max x, the rest as
above; the zero point stays an integer, so |x - x_hat| <= s / 2 still holds for every x in the range.

Weights, 2-D [out, in]: static, per output channel (one (s, z) per row) or per group of ``group_size`` consecutive
input columns, i.e. W viewed as [out, in / g, g] with one (s, z) per (row, group). Scales and zeros therefore have
shape [out, groups, 1]. The default is symmetric per-channel, as OSTQuant/QuaRot use for weights.
Clip ratios can be searched per row/group (``search_clip_ratio``): GPTQ/QuaRot's ``mse`` option, which shrinks the
range by 1 - i / grid and keeps the ratio minimising sum |x - x_hat|^norm with norm = 2.4.

Activations, [..., D]: dynamic per token (per row of the last dim, optionally in groups of the last dim), symmetric
by default. KV cache, [batch, heads, seq, head_dim]: dynamic per (batch, head, token), asymmetric by default, in groups
along head_dim (one group = the whole head, QuaRot's per-head KV convention). When gradients are needed they pass
the rounding straight through while the scale stays a differentiable function of the input
(``fake_quant_round_ste``), so rotations/scalings upstream can be trained through the quantizer and see its error.
``bits >= 16`` means "not quantized" and returns the input as is. The dynamic fake quantizers are
``dequantize_codes(*quantize_codes(x, ...))``: the KV-cache compressors (``llm_compress.kv``) store what
``quantize_codes`` returns instead of dequantizing it at once, so there is one KV quantizer, not a second copy.

Settings are named like "W4A4KV4": weight, activation and KV-cache bits (KV defaults to 16), see ``parse_setting``.
"""

from __future__ import annotations

import torch

from llm_compress.errors import InputError
from llm_compress.quantize.setting import NO_QUANT_BITS, QuantSetting, _check_bits, parse_setting  # noqa: F401

_MIN_SCALE = 1e-8


# ----------------------------------------------------------------------------------------------------------------
# grids


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range [qmin, qmax] of a b-bit grid."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _check_clip(clip_ratio: float | torch.Tensor, what: str) -> None:
    if isinstance(clip_ratio, torch.Tensor):
        if clip_ratio.numel() and (clip_ratio.min() <= 0 or clip_ratio.max() > 1):
            raise InputError(f"{what} clip ratios must lie in (0, 1]")
    elif not 0.0 < float(clip_ratio) <= 1.0:
        raise InputError(f"{what} clip ratio must lie in (0, 1], got {clip_ratio!r}")


def _group_count(n: int, group_size: int | None, what: str) -> int:
    """Number of groups along a dim of size n (1 when group_size is None)."""
    if group_size is None:
        return 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise InputError(f"{what} group size must be a positive integer or None, got {group_size!r}")
    if n % group_size:
        raise InputError(f"{what} group size {group_size} does not divide the dimension {n}")
    return n // group_size


def _minmax_qparams(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float | torch.Tensor = 1.0,
                    zero_on_grid: bool = True,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the range of x over its last dim, keepdim; x is float32 [..., n] -> [..., 1] each.

    ``zero_on_grid=False`` (asymmetric only) uses the tight range [min x, max x] instead of one stretched to hold 0.
    ``scale_dtype``: the scale is rounded *up* to that float dtype (returned as float32 holding such values), so a
    scale stored at that precision is the one the codes were made with, and the grid still spans the range.
    """
    qmin, qmax = quant_range(bits, symmetric)
    if symmetric:
        xmax = x.abs().amax(dim=-1, keepdim=True) * clip_ratio  # [..., 1]
        scale = (xmax / qmax).clamp_min(_MIN_SCALE)
    else:
        lo = x.amin(dim=-1, keepdim=True)  # [..., 1]
        hi = x.amax(dim=-1, keepdim=True)
        if zero_on_grid:
            lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
        lo, hi = lo * clip_ratio, hi * clip_ratio
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(_MIN_SCALE)
    if scale_dtype is not None and scale_dtype != scale.dtype:
        # Rounding to nearest could shrink the scale and clip the top of the range by up to qmax * ulp / 2 steps
        # (half a step at 8 bits in bfloat16); the next representable value up keeps |x - x_hat| <= s / 2.
        low = scale.to(scale_dtype)
        low = torch.where(low.float() < scale, torch.nextafter(low, torch.full_like(low, float("inf"))), low)
        scale = low.float()
    zero = torch.zeros_like(scale) if symmetric else torch.round(-lo / scale)
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The integer grid values clamp(round(x / s) + z, qmin, qmax), in x's (float) dtype."""
    qmin, qmax = quant_range(bits, symmetric)
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax)


def fake_quant_with_qparams(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                            symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize x with given (broadcastable) scale and zero point; computes in x's dtype."""
    return (_codes(x, scale, zero, bits, symmetric) - zero) * scale


def quantize_codes(x: torch.Tensor, bits: int, symmetric: bool = False, group_size: int | None = None,
                   clip_ratio: float = 1.0, zero_on_grid: bool = True, scale_dtype: torch.dtype | None = None,
                   what: str = "KV cache") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic min-max quantization of x [..., n] over its last dim in groups of ``group_size`` (None: one group).

    Parameters
    ----------
    x : [..., n] float tensor (any float dtype; the grid is computed in float32).
    bits : 2..8.
    symmetric, clip_ratio, zero_on_grid : the grid, as in the module docstring.
    scale_dtype : the float dtype the caller will store the scale in (see ``_minmax_qparams``); None = float32.
    what : names the quantized thing in errors.

    Returns
    -------
    codes : [..., n] integer codes, uint8 in [0, 2^b - 1] (asymmetric) or int8 in [-2^(b-1), 2^(b-1) - 1].
    scale, zero : float32 [..., n / group_size, 1]; zero holds integers (0 when symmetric).
    ``dequantize_codes(codes, scale, zero)`` gives x_hat = (q - z) * s.
    """
    _check_bits(bits, what)
    _check_clip(clip_ratio, what)
    n = x.shape[-1]
    n_groups = _group_count(n, group_size, what)
    xg = x.float().reshape(*x.shape[:-1], n_groups, n // n_groups)  # [..., groups, g]
    scale, zero = _minmax_qparams(xg, bits, symmetric, clip_ratio, zero_on_grid, scale_dtype)  # [..., groups, 1]
    q = _codes(xg, scale, zero, bits, symmetric)  # exact small integers in float32
    return q.reshape(x.shape).to(torch.int8 if symmetric else torch.uint8), scale, zero


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = (q - z) * s for codes [..., n] and scale/zero [..., groups, 1] (``quantize_codes``); [..., n] in dtype.

    Computed in float32 (the codes are exact there), then cast to dtype.
    """
    n_groups = scale.shape[-2]
    q = codes.float().reshape(*codes.shape[:-1], n_groups, codes.shape[-1] // n_groups)  # [..., groups, g]
    return ((q - zero) * scale).reshape(codes.shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# weights


def _weight_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """float32 view [out, groups, g] of a 2-D weight [out, in]."""
    if w.dim() != 2:
        raise InputError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    n_groups = _group_count(in_f, group_size, "weight")
    return w.float().reshape(out_f, n_groups, in_f // n_groups)


def weight_qparams(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                   clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Static (scale, zero) of a 2-D weight [out, in], each float32 [out, groups, 1] (groups = 1 per-channel).

    clip_ratio is a float or a tensor broadcastable to [out, groups, 1] (e.g. from ``search_clip_ratio``).
    """
    _check_bits(bits, "weight")
    _check_clip(clip_ratio, "weight")
    x = _weight_groups(w, group_size)  # [out, groups, g]
    if isinstance(clip_ratio, torch.Tensor):
        clip_ratio = clip_ratio.to(device=x.device, dtype=torch.float32)
    return _minmax_qparams(x, bits, symmetric, clip_ratio)


def weight_codes(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                 clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN of a 2-D weight [out, in] as integer codes: (codes [out, in] int8 (symmetric) / uint8, scale and zero
    float32 [out, groups, 1]); ``dequantize_codes`` of them is ``quantize_weight``'s result in float32."""
    scale, zero = weight_qparams(w, bits, group_size, symmetric, clip_ratio)  # [out, groups, 1]
    x = _weight_groups(w, group_size)  # [out, groups, g]
    codes = _codes(x, scale, zero, bits, symmetric).reshape(w.shape)
    return codes.to(torch.int8 if symmetric else torch.uint8), scale, zero


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                    clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """RTN fake quantization of a 2-D weight [out, in], per output channel or per group; same shape/dtype back."""
    return dequantize_codes(*weight_codes(w, bits, group_size, symmetric, clip_ratio), dtype=w.dtype)


@torch.no_grad()
def search_clip_ratio(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                      grid: int = 20, min_ratio: float = 0.5, norm: float = 2.4) -> torch.Tensor:
    """Per row (or per row-group) clip ratio minimising sum |w - Q_r(w)|^norm; float32 [out, groups, 1].

    Candidates are r = 1 - i (1 - min_ratio) / grid for i = 0..grid; r = 1 is a candidate and wins ties, so the
    result is never worse than no clipping in that norm (norm=2 gives the MSE; GPTQ/QuaRot use 2.4 with
    grid=100, min_ratio=0.2).
    """
    _check_bits(bits, "weight")
    if grid < 1 or not 0.0 < min_ratio <= 1.0:
        raise InputError(f"clip search needs grid >= 1 and min_ratio in (0, 1], got {grid}, {min_ratio}")
    x = _weight_groups(w, group_size)  # [out, groups, g]
    best_err = torch.full(x.shape[:2] + (1,), float("inf"), device=x.device)  # [out, groups, 1]
    best_ratio = torch.ones_like(best_err)
    for i in range(grid + 1):
        r = 1.0 - i * (1.0 - min_ratio) / grid
        scale, zero = _minmax_qparams(x, bits, symmetric, r)
        err = (fake_quant_with_qparams(x, scale, zero, bits, symmetric) - x).abs_().pow_(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio


# ----------------------------------------------------------------------------------------------------------------
# activations and KV cache (dynamic, straight-through)


def _dynamic_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float,
                        group_size: int | None, what: str) -> torch.Tensor:
    """Per-row (last dim) dynamic fake quantization; gradients pass the rounding straight through."""
    if bits >= NO_QUANT_BITS:
        return x
    _check_bits(bits, what)
    _check_clip(clip_ratio, what)
    d = x.shape[-1]
    n_groups = _group_count(d, group_size, what)
    if not (torch.is_grad_enabled() and x.requires_grad):
        with torch.no_grad():
            codes, scale, zero = quantize_codes(x, bits, symmetric, group_size, clip_ratio, what=what)
            return dequantize_codes(codes, scale, zero, x.dtype)
    # Training through the quantizer (e.g. OSTQuant's transforms): straight-through on the rounding only, with the
    # scale a differentiable function of x (its absmax / range), as QuaRot/SpinQuant's activation quantizers do.
    # A whole-quantizer STE (gradient of the identity) would make the gradient blind to the quantization error:
    # for function-preserving transforms it is the full-precision gradient, which is zero.
    xg = x.float().reshape(*x.shape[:-1], n_groups, d // n_groups)  # [..., groups, g]
    return fake_quant_round_ste(xg, bits, symmetric, clip_ratio).reshape(x.shape).to(x.dtype)


def fake_quant_round_ste(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """Min/max fake quantization over the last dim of float x [..., n], differentiable for training transforms.

    The scale is computed from x with gradient; only the rounding passes its gradient straight through (the zero
    point is held constant), and values clipped by the range get none.
    """
    scale, zero = _minmax_qparams(x, bits, symmetric, clip_ratio)  # [..., 1] each, scale differentiable
    zero = zero.detach()
    qmin, qmax = quant_range(bits, symmetric)
    v = x / scale
    v = v + (torch.round(v) - v).detach()  # round with an identity gradient
    return (torch.clamp(v + zero, qmin, qmax) - zero) * scale


def fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool = True, clip_ratio: float = 1.0,
                         group_size: int | None = None) -> torch.Tensor:
    """Dynamic per-token fake quantization of activations [..., D] over the last dim (optionally in groups); STE."""
    return _dynamic_fake_quant(x, bits, symmetric, clip_ratio, group_size, "activation")


def fake_quant_kv(x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                  clip_ratio: float = 1.0) -> torch.Tensor:
    """Fake-quantize keys or values [batch, heads, seq, head_dim] per (batch, head, token), groups along head_dim."""
    if x.dim() != 4:
        raise InputError(f"KV quantization expects [batch, heads, seq, head_dim], got shape {tuple(x.shape)}")
    return _dynamic_fake_quant(x, bits, symmetric, clip_ratio, group_size, "KV cache")
