"""Bit packing of 2/4/8-bit unsigned codes into uint8, several codes per byte along the last dim.

Layout: code i of a run of k = 8 / bits codes sits in bits [i * bits, (i + 1) * bits) of its byte (little-endian
within the byte), so ``pack_codes(c, 4)[..., 0] == c[..., 0] | c[..., 1] << 4``.
"""

from __future__ import annotations

import torch

PACK_BITS = (2, 4, 8)


def _per_byte(bits: int, n: int) -> int:
    if bits not in PACK_BITS:
        raise ValueError(f"can pack only {PACK_BITS}-bit codes, got {bits}")
    k = 8 // bits
    if n % k:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes (need a multiple of {k})")
    return k


def _shifts(bits: int, k: int, device: torch.device) -> torch.Tensor:
    return torch.arange(k, device=device, dtype=torch.uint8) * bits  # [k]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] with values < 2^bits -> uint8 [..., n * bits / 8]; n must fill whole bytes."""
    k = _per_byte(bits, codes.shape[-1])
    if k == 1:
        return codes.to(torch.uint8)
    runs = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, k)  # [..., n / k, k]
    # The fields are disjoint, so their sum is their bitwise or; sum promotes to int64, hence the cast back.
    return (runs << _shifts(bits, k, codes.device)).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [..., m] -> uint8 codes [..., m * 8 / bits]."""
    k = _per_byte(bits, 8 // bits if bits in PACK_BITS else 1)
    if k == 1:
        return packed
    fields = (packed.unsqueeze(-1) >> _shifts(bits, k, packed.device)) & (2**bits - 1)  # [..., m, k]
    return fields.reshape(*packed.shape[:-1], -1)
