"""KIVI-style quantized KV cache: keys per channel, values per token, a full-precision recent window.

Based on KIVI (Liu et al., ICML 2024, arXiv 2402.02750; jy-yuan/KIVI ``models/llama_kivi.py``), with KVTuner's
per-layer (key bits, value bits) pairs (Li et al., ICML 2025).

Quantization (``llm_compress.quantize.quantizers.quantize_codes``, the project's one KV quantizer, tight min-max grid):
asymmetric, per group, s = (max - min) / (2^b - 1), integer zero point z = round(-min / s),
q = clamp(round(x / s) + z, 0, 2^b - 1), x_hat = (q - z) s, so |x - x_hat| <= s / 2.

- Keys, [B, H_kv, T, D]: per channel, groups of ``group_size`` consecutive tokens of one channel. Keys have a few
  outlier channels; per-channel groups confine their error (the paper's motivation).
- Values: per token, groups of ``group_size`` consecutive channels of one token (``group_size`` divides D).

Streaming (KIVI's rule, R = ``residual``, a multiple of ``group_size``):
- keys: new keys join a full-precision buffer; whenever it holds R or more tokens, its first floor(len / R) * R are
  quantized (R-token blocks, each quantized once, never re-quantized) and leave the buffer. So 0..R-1 recent keys
  stay exact; the prompt's first L - (L mod R) keys are quantized at once.
- values: the last R values always stay exact; older ones are quantized token by token as they leave the window.
- The current call's states are returned exact, with the past dequantized before them; the prompt pass therefore
  attends to exact states and quantization applies to what is kept (as in KIVI and HF ``QuantizedCache``).

Stored per layer (``held_tensors``): packed codes (uint8, 8 / b codes a byte, packed along head_dim), a scale and an
offset per group in the states' dtype, and the full-precision windows. The offset is -z s, the value of code 0
(KIVI's "mn" up to the grid snap): stored as an offset rather than the integer z, because |z| can exceed what a
16-bit float holds exactly (a group far from 0 relative to its range), while the offset has the data's own
precision. The scale is rounded up to the states' dtype before coding, so the stored scale is the coding one.
``bits = 16`` keeps that tensor in full precision (all of it in the window): KIVI with (16, 16) is a full cache.

Deviations from the paper: attention dequantizes the whole past each step (plain PyTorch, no fused kernels), so the
transient full-precision copy of one layer exists during its attention; bits 2/4/8 only (packing); the zero point
is snapped to an integer (the project's quantizer) where KIVI keeps a float minimum (same error bound).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from llm_compress.kv.base import KVCache, KVLayer
from llm_compress.kv.config import KIVIConfig
from llm_compress.kv.packing import pack_codes, unpack_codes
from llm_compress.kv.spec import check_kivi_head_dim, check_params, per_layer_bits
from llm_compress.quantize.quantizers import NO_QUANT_BITS, quantize_codes


class QuantStore:
    """Tokens quantized once and appended along the sequence, [B, H_kv, T, D] in, dequantized on read.

    per_channel=True: groups of ``group_size`` tokens per channel (appended token counts must be multiples of it);
    False: groups of ``group_size`` channels per token. Holds codes uint8 [B, H, T, D * b / 8] and scale/offset
    [B, H, T / g, D] (per channel) or [B, H, T, D / g] (per token), in the states' dtype.
    """

    def __init__(self, bits: int, group_size: int, per_channel: bool) -> None:
        self.bits, self.group_size, self.per_channel = bits, group_size, per_channel
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.codes is None else self.codes.shape[-2]

    def append(self, x: torch.Tensor) -> None:
        """Quantize x [B, H, n, D] and append it."""
        kw = dict(symmetric=False, group_size=self.group_size, zero_on_grid=False, scale_dtype=x.dtype)
        if self.per_channel:
            codes, scale, zero = quantize_codes(x.transpose(-1, -2), self.bits, **kw)  # [B,H,D,n], [B,H,D,n/g,1]
            codes = codes.transpose(-1, -2)  # [B, H, n, D]
            scale, zero = scale.squeeze(-1).transpose(-1, -2), zero.squeeze(-1).transpose(-1, -2)  # [B, H, n/g, D]
        else:
            codes, scale, zero = quantize_codes(x, self.bits, **kw)  # [B, H, n, D], [B, H, n, D/g, 1]
            scale, zero = scale.squeeze(-1), zero.squeeze(-1)  # [B, H, n, D/g]
        parts = (pack_codes(codes, self.bits), scale.to(x.dtype), (-zero * scale).to(x.dtype))
        if self.codes is None:
            self.codes, self.scale, self.offset = (p.contiguous() for p in parts)
        else:
            self.codes, self.scale, self.offset = (torch.cat([old, new], dim=-2) for old, new in
                                                   zip((self.codes, self.scale, self.offset), parts))

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized tokens [B, H, T, D] (computed in float32, returned in dtype); needs len > 0."""
        q = unpack_codes(self.codes, self.bits).float()  # [B, H, T, D]
        b, h, t, d = q.shape
        g = self.group_size
        if self.per_channel:  # [B, H, T/g, g, D] against [B, H, T/g, 1, D]
            x = q.view(b, h, t // g, g, d) * self.scale.float().unsqueeze(-2) + self.offset.float().unsqueeze(-2)
        else:  # [B, H, T, D/g, g] against [B, H, T, D/g, 1]
            x = q.view(b, h, t, d // g, g) * self.scale.float().unsqueeze(-1) + self.offset.float().unsqueeze(-1)
        return x.reshape(b, h, t, d).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.codes is None else [self.codes, self.scale, self.offset]


class KIVIStream:
    """One of K or V of a layer under KIVI's streaming rule: a ``QuantStore`` of old tokens + an exact window.

    per_channel=True (keys): the window is flushed in blocks of ``residual`` tokens, so 0..R-1 stay exact;
    False (values): a sliding window, the last R stay exact. bits = 16: everything stays in the window.
    """

    def __init__(self, bits: int, group_size: int, residual: int, per_channel: bool) -> None:
        self.bits, self.residual, self.per_channel = bits, residual, per_channel
        self.store = QuantStore(bits, group_size, per_channel) if bits < NO_QUANT_BITS else None
        self.window: torch.Tensor | None = None  # [B, H, w, D], exact

    def read(self, like: torch.Tensor, new: torch.Tensor | None = None) -> torch.Tensor:
        """[dequantized old, exact window, new] along the sequence, [B, H, T (+ n), D] in like's dtype.

        ``like`` is any [B, H, *, D] tensor of the states' dtype (its rows are not used): it gives the dtype and, when
        nothing is held, the empty result.
        """
        parts = [self.store.read(like.dtype)] if self.store is not None and len(self.store) else []
        parts += [p for p in (self.window, new) if p is not None]
        if not parts:
            return like[..., :0, :]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def append(self, x: torch.Tensor) -> None:
        """Add x [B, H, n, D] to the window and quantize what leaves it."""
        window = x if self.window is None else torch.cat([self.window, x], dim=-2)
        n = window.shape[-2]
        if self.store is None:
            n_old = 0
        elif self.per_channel:
            n_old = n // self.residual * self.residual
        else:
            n_old = max(n - self.residual, 0)
        if n_old:
            self.store.append(window[..., :n_old, :])
        # A slice would keep the whole concatenation's storage alive, and x may be a view of a larger tensor the
        # model made (e.g. a projection output); the clone holds just the window. A fresh concatenation is kept.
        self.window = window[..., n_old:, :].clone() if n_old or window is x else window

    def tensors(self) -> list[torch.Tensor]:
        held = self.store.tensors() if self.store is not None else []
        return held + ([self.window] if self.window is not None else [])


class KIVILayer(KVLayer):
    """One layer of KIVI: a key stream (per channel) and a value stream (per token), see the module docstring.
    The settings are checked by the cache that holds the layer (``KIVICache``, ``MiniCache``)."""

    def __init__(self, k_bits: int, v_bits: int, group_size: int, residual: int) -> None:
        self.k_bits, self.v_bits, self.group_size, self.residual = k_bits, v_bits, group_size, residual
        super().__init__()

    def __repr__(self) -> str:
        return f"KIVILayer(k{self.k_bits}v{self.v_bits}, g={self.group_size}, r={self.residual}, seen={self.seen})"

    def _reset_state(self) -> None:
        self.k = KIVIStream(self.k_bits, self.group_size, self.residual, per_channel=True)
        self.v = KIVIStream(self.v_bits, self.group_size, self.residual, per_channel=False)

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        check_kivi_head_dim(self.k_bits, self.v_bits, self.group_size, key_states.shape[-1])
        super().lazy_initialization(key_states)

    def _update(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # The past (dequantized, then the exact window) followed by the exact new states.
        keys, values = self.k.read(k, new=k), self.v.read(v, new=v)
        self.k.append(k)
        self.v.append(v)
        return keys, values

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        empty = self.empty()
        return self.k.read(empty), self.v.read(empty)

    def held_tensors(self) -> Iterable[torch.Tensor]:
        return self.k.tensors() + self.v.tensors()


_DEFAULT = KIVIConfig()  # the defaults of the constructor's arguments


class KIVICache(KVCache):
    """KIVI quantized cache over ``num_layers`` layers.

    Parameters (defaults, ranges and descriptions: ``llm_compress.kv.config.KIVIConfig``, which checks them)
    ----------
    num_layers : the model's decoder layers.
    bits : one (k_bits, v_bits) pair for every layer, or a list of one pair per layer (KVTuner).
    group_size : tokens per key group (per channel) and channels per value group (per token).
    residual : R, the full-precision window.
    spec : the plain-dict spec this cache was built from (``llm_compress.kv.build_cache``), kept for saving.
    """

    def __init__(self, num_layers: int, bits: Sequence = tuple(_DEFAULT.bits), group_size: int = _DEFAULT.group_size,
                 residual: int = _DEFAULT.residual, spec: dict | None = None) -> None:
        p = check_params("kivi", {"bits": bits, "group_size": group_size, "residual": residual})
        pairs = per_layer_bits(p["bits"], num_layers)
        super().__init__([KIVILayer(kb, vb, group_size, residual) for kb, vb in pairs], spec)
