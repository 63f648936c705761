"""Quantization settings as the papers name them ("W4A16", "W4A4KV4", "W4A16g128"): bits of weights, activations
and KV cache. Plain Python (no torch), so validating a recipe never imports torch."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llm_compress.errors import InputError

NO_QUANT_BITS = 16  # bits >= this means "leave in floating point"


def _check_bits(bits: int, what: str, lo: int = 2, hi: int = 8) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise InputError(f"{what} bits must be an integer in [{lo}, {hi}], got {bits!r}")


@dataclass(frozen=True)
class QuantSetting:
    """Bits of weights, activations (inputs of the decoder Linears) and KV cache; 16 = not quantized."""

    w_bits: int = 16
    a_bits: int = 16
    kv_bits: int = 16
    w_group_size: int | None = None  # None = per output channel
    w_symmetric: bool = True
    a_symmetric: bool = True
    kv_symmetric: bool = False  # per-head asymmetric KV, the QuaRot/OSTQuant convention

    def __post_init__(self) -> None:
        for what, b in (("weight", self.w_bits), ("activation", self.a_bits), ("KV cache", self.kv_bits)):
            if b != NO_QUANT_BITS:
                _check_bits(b, what)
        g = self.w_group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
            raise InputError(f"weight group size must be a positive integer or None, got {g!r}")

    @property
    def name(self) -> str:
        g = f"g{self.w_group_size}" if self.w_group_size else ""
        return f"W{self.w_bits}A{self.a_bits}KV{self.kv_bits}{g}"


_SETTING_RE = re.compile(r"^W(\d+)[-_]?A(\d+)(?:[-_]?KV(\d+))?(?:[-_]?G(\d+))?$", re.IGNORECASE)


def parse_setting(name: str, *, w_group_size: int | None = None, w_symmetric: bool = True,
                  a_symmetric: bool = True, kv_symmetric: bool = False) -> QuantSetting:
    """Parse "W4A16", "W4A4KV4", "W4A16g128" (group size suffix) ... into a QuantSetting; KV defaults to 16."""
    expected = "expected W<bits>A<bits>[KV<bits>][g<group>], e.g. W4A16, W8A8, W4A4KV4, W4A16g128, with bits 2-8 or 16"
    m = _SETTING_RE.match(name.strip()) if isinstance(name, str) else None
    if m is None:
        raise InputError(f"bad quantization setting {name!r}: {expected}")
    w, a, kv, g = m.groups()
    if g is not None and w_group_size is not None and int(g) != w_group_size:
        raise InputError(f"setting {name!r} names group size {g} but w_group_size={w_group_size} was also given")
    group = int(g) if g is not None else w_group_size
    try:
        return QuantSetting(int(w), int(a), int(kv) if kv is not None else NO_QUANT_BITS, group, w_symmetric,
                            a_symmetric, kv_symmetric)
    except InputError as e:
        raise InputError(f"bad quantization setting {name!r} ({e}): {expected}") from None
