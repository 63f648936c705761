"""MiniCache: cross-layer merging of KV states in the deeper half of the model, optionally over KIVI quantization.

Based on MiniCache (Liu et al., NeurIPS 2024, arXiv 2405.14366). From ``start_layer`` (default
L // 2, where adjacent layers' states are most alike) on, layers pair up as (s, s+1), (s+2, s+3), ...; a leftover
last layer stays unmerged. For each token, head and batch row, and separately for K and V, a pair stores:

- one shared direction e = SLERP(x0 / |x0|, x1 / |x1|; t) (``slerp``), computed in float32:
  e = sin((1 - t) W) / sin W * u0 + sin(t W) / sin W * u1, W = arccos(u0 . u1), the angle between the unit vectors;
- each layer's own magnitude |x0|, |x1|, so a merged token is restored as |x_l| e (norms are exact);
- the most distinct token pairs *retained* (unmerged, ``retention_mask``): layer s's state takes the token's slot in
  the shared storage, layer s+1's state is kept aside, and both are put back on restore.

The retention rule. Each token pair has the normalized angular distance d = W / pi in [0, 1] (0: same direction,
0.5: orthogonal, 1: opposite). Within a layer pair, per batch row and head, separately for K and V, with d_min and
d_max the smallest and largest d of the tokens this pair has seen so far (running, so a decode token is judged
against the prompt's range), a token is retained when

    d > d_max - gamma (d_max - d_min)           (it lies in the top gamma of the distance range)
    or d > max_distance                          (its two states are too far apart to share a direction)

The first line is the paper's rule as its text and ablations describe it: only the most distinct pairs are kept,
"with minimal additional storage", gamma is the retention threshold (0.05 the paper's best trade-off; raising it
keeps more tokens and compresses less), and its retention ratios stay at or under 1 %. The paper's equation itself
could not be read here (only its abstract, project page and third-party summaries): this is the rule its text
implies, see "Deviations" below. gamma = 1 retains every token (no compression: the lossless setting), gamma = 0
none (but the guard's). A rule relative to the observed range cannot tell how alike the layers are: it
keeps the same small share whether adjacent layers agree to cosine 0.999 or are unrelated (measured in
tests/test_kv_minicache.py). The second line, the project's addition, is the absolute guard: a pair more than
``max_distance`` apart (0.5 by default: more than 90 degrees) is never merged, since their shared direction would be
at least 45 degrees from one of them whatever t; ``max_distance = 1`` turns it off (the paper's rule alone). On a
model whose adjacent layers are unrelated the guard retains about half the tokens instead of merging them blindly.

Pairing in a cache. Layer s's states arrive before layer s+1's in the same forward pass, so layer s cannot be merged
when it updates. Layer s returns its restored past + its exact new states and parks the new states ("pending");
layer s+1 returns its restored past + its exact new states, then merges both layers' new states into the pair's
storage. Each layer therefore attends to its own exact states for the current tokens (the prompt pass is exact),
and to merged/restored states for every earlier token; nothing is pending between forward passes.

MiniCache over KIVI (the paper's "MiniCache-4"): with ``bits`` < 16, the shared slots are stored in KIVI streams
(keys per channel, values per token, a full-precision recent window of ``residual`` tokens) and the layers below
``start_layer`` (and a leftover last one) are KIVI layers. A retained token is quantized like every other state:
layer s's state takes its slot as its unit direction (restored with its own magnitude; the per-channel key groups
need values of one scale), and layer s+1's retained states stay exact while their token is in the shared stream's
recent window and are then stored as KIVI codes at the same bits, per token in groups of ``group_size`` channels
(for K too: the retained rows are a ragged set of (token, head) rows, with no run of consecutive tokens of one head
to group a channel along). With bits 16 everything is exact and the other layers are full-precision caches.

Stored per pair, K and V each (``held_tensors``): the shared slots [B, H, T, D] (directions, or layer s's state for
retained tokens; or their KIVI codes, scales, offsets and window), magnitudes [B, H, T] x 2 in the states' dtype, the
retention mask bool [B, H, T], layer s+1's retained states [N, D] (token-major order: t, then b, then h; under KIVI
the older ones as codes uint8 [1, 1, N_q, D b / 8] with scales and offsets [1, 1, N_q, D / group_size]), and the
running d_min, d_max float32 [B, H]. A retained token thus costs about what the two layers' unmerged states cost
(2 D elements or their codes, plus magnitudes and a mask byte), a merged one about half.

Deviations from the paper, or where it could not be checked: the retention equation (above); the guard
``max_distance`` (the project's addition); states are merged and judged per head (the paper writes a token's state
as one vector, which may span every head); the range is per (batch row, head) and running over the tokens seen, so
decode tokens are merged one step at a time against it, where the paper's streaming details are unknown; the
paper's merge of layer l with l - 1 is written here as (s, s+1) from s = start; a retained token's magnitudes are
stored too (rectangular storage); no official code exists (AkideLiu/MiniCache holds the project page only).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from llm_compress.kv.base import KVCache, KVLayer
from llm_compress.kv.config import MiniCacheConfig
from llm_compress.kv.kivi import KIVILayer, KIVIStream, QuantStore
from llm_compress.kv.spec import check_minicache_depth, check_minicache_head_dim, check_params
from llm_compress.quantize.quantizers import NO_QUANT_BITS

_EPS = 1e-6


def angle(u0: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    """The angle in [0, pi] between unit vectors [..., D], as [...]: 2 atan2(|u0 - u1|, |u0 + u1|), which is exact
    near 0 and pi, where arccos of their dot product loses half its digits (identical states give exactly 0; arccos
    would give float32 noise of about 1e-4 rad, and ties at the top of the retention range)."""
    return 2 * torch.atan2((u0 - u1).norm(dim=-1), (u0 + u1).norm(dim=-1))


def slerp(u0: torch.Tensor, u1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors [..., D] (t = 0 gives u0, 1 gives u1); unit vectors back.

    Nearly parallel pairs (angle < 1e-3) use normalised linear interpolation, where the SLERP weights are 0/0; a
    nearly opposite pair has no unique arc and gets u0 (such tokens are retained by the guard, not merged).
    """
    omega = angle(u0, u1).unsqueeze(-1)  # [..., 1]
    sin = torch.sin(omega)
    small = omega < 1e-3
    safe_sin = torch.where(small, torch.ones_like(sin), sin)
    w0 = torch.where(small, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe_sin)
    w1 = torch.where(small, torch.full_like(sin, t), torch.sin(t * omega) / safe_sin)
    e = w0 * u0 + w1 * u1
    norm = e.norm(dim=-1, keepdim=True)
    # Renormalising removes rounding drift (SLERP of unit vectors is a unit vector in exact arithmetic).
    return torch.where(norm > _EPS, e / norm.clamp_min(_EPS), u0)


def merge_states(x0: torch.Tensor, x1: torch.Tensor,
                 t: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge two layers' states [..., D] into (direction [..., D], |x0| [...], |x1| [...], distance d [...]).

    All float32. x_l is restored as |x_l| * direction; d = angle(x0, x1) / pi in [0, 1]. A zero vector has no
    direction: its unit vector is taken as 0 (it restores to 0 through its zero magnitude).
    """
    x0, x1 = x0.float(), x1.float()
    n0, n1 = x0.norm(dim=-1), x1.norm(dim=-1)
    u0, u1 = x0 / n0.clamp_min(_EPS).unsqueeze(-1), x1 / n1.clamp_min(_EPS).unsqueeze(-1)
    return slerp(u0, u1, t), n0, n1, angle(u0, u1) / math.pi


def retention_mask(d: torch.Tensor, d_min: torch.Tensor, d_max: torch.Tensor, gamma: float,
                   max_distance: float) -> torch.Tensor:
    """bool [..., n]: which token pairs of distances d [..., n] stay unmerged, given the range d_min, d_max [...] (the
    module docstring): the top ``gamma`` of the range, and every pair more than ``max_distance`` apart.

    Strictly above the threshold, so that gamma = 0 retains nothing (d never exceeds d_max) and layers whose pairs
    are all equally far apart (identical layers: all 0) merge every token; gamma = 1 retains every token, the
    closest too (the lossless setting).
    """
    if gamma >= 1:
        return torch.ones_like(d, dtype=torch.bool)
    threshold = d_max - gamma * (d_max - d_min)
    return (d > threshold.unsqueeze(-1)) | (d > max_distance)


class MergedStates:
    """K or V of one merged layer pair: shared slots, per-layer magnitudes, layer s+1's retained states."""

    def __init__(self, t: float, gamma: float, max_distance: float, bits: int, group_size: int, residual: int,
                 per_channel: bool) -> None:
        self.t, self.gamma, self.max_distance = t, gamma, max_distance
        self.dirs = KIVIStream(bits, group_size, residual, per_channel)
        self.mags: list[torch.Tensor | None] = [None, None]  # [B, H, T] per layer, states' dtype
        self.mask: torch.Tensor | None = None  # bool [B, H, T]: retained
        # Layer s+1's retained states, token-major (t, b, h): the exact ones [N_w, D], and under KIVI the older ones
        # as codes (per token, [1, 1, N_q, D]); ``coded_tokens``: how many of the pair's tokens have theirs coded.
        self.kept: torch.Tensor | None = None
        self.kept_codes = QuantStore(bits, group_size, per_channel=False) if bits < NO_QUANT_BITS else None
        self.coded_tokens = 0
        self.d_min: torch.Tensor | None = None  # float32 [B, H]
        self.d_max: torch.Tensor | None = None

    def add(self, x0: torch.Tensor, x1: torch.Tensor) -> None:
        """Merge the two layers' new states [B, H, n, D] and append them."""
        direction, n0, n1, d = merge_states(x0, x1, self.t)
        lo, hi = d.amin(-1), d.amax(-1)  # [B, H]
        self.d_min = lo if self.d_min is None else torch.minimum(self.d_min, lo)
        self.d_max = hi if self.d_max is None else torch.maximum(self.d_max, hi)
        keep = retention_mask(d, self.d_min, self.d_max, self.gamma, self.max_distance)  # [B, H, n]
        # A retained token's slot in the shared storage holds layer s's own state: exact x0 without quantization,
        # its unit direction (restored with its own magnitude, like every state) under KIVI, whose per-channel
        # groups need values of one scale. Layer s+1's retained states are kept aside, token-major (t, b, h).
        own = x0.float() if self.exact_slots else x0.float() / n0.clamp_min(_EPS).unsqueeze(-1)
        slot = torch.where(keep.unsqueeze(-1), own, direction)  # [B, H, n, D]
        kept = x1.permute(2, 0, 1, 3)[keep.permute(2, 0, 1)]  # [N_new, D]
        self.dirs.append(slot.to(x0.dtype))
        mags = (n0.to(x0.dtype), n1.to(x0.dtype))
        if self.mask is None:
            self.mask, self.mags, self.kept = keep, list(mags), kept
        else:
            self.mask = torch.cat([self.mask, keep], dim=-1)
            self.mags = [torch.cat([old, new], dim=-1) for old, new in zip(self.mags, mags)]
            self.kept = torch.cat([self.kept, kept], dim=0)
        self._code_kept()

    def _code_kept(self) -> None:
        """Under KIVI, code layer s+1's retained states of the tokens whose slots the shared stream has quantized
        (they left its exact window): the kept rows of those tokens are a prefix of ``kept`` (token-major)."""
        if self.kept_codes is None:
            return
        coded = len(self.dirs.store)
        if coded == self.coded_tokens:
            return
        rows = int(self.mask[..., self.coded_tokens:coded].sum())
        if rows:
            self.kept_codes.append(self.kept[:rows].unsqueeze(0).unsqueeze(0))  # [1, 1, rows, D]
            self.kept = self.kept[rows:].clone()  # a slice would keep the old rows' storage alive
        self.coded_tokens = coded

    @property
    def exact_slots(self) -> bool:
        """True when the shared storage is not quantized (bits 16): a retained x0 is stored as it is."""
        return self.dirs.store is None

    def restore(self, role: int, like: torch.Tensor) -> torch.Tensor:
        """Layer ``role``'s (0 or 1) past states [B, H, T, D] in like's dtype (like: any [B, H, *, D] tensor)."""
        if self.mask is None:
            return like[..., :0, :]
        slots = self.dirs.read(like)  # [B, H, T, D]
        out = (self.mags[role].float().unsqueeze(-1) * slots.float()).to(like.dtype)
        if role == 1:
            kept = self.kept.to(like.dtype)
            if self.kept_codes is not None and len(self.kept_codes):
                kept = torch.cat([self.kept_codes.read(like.dtype)[0, 0], kept], dim=0)
            out.permute(2, 0, 1, 3)[self.mask.permute(2, 0, 1)] = kept  # writes through the view into out
        elif self.exact_slots:
            out = torch.where(self.mask.unsqueeze(-1), slots, out)
        return out

    def tensors(self) -> list[torch.Tensor]:
        if self.mask is None:
            return []
        coded = self.kept_codes.tensors() if self.kept_codes is not None else []
        return self.dirs.tensors() + self.mags + [self.mask, self.kept, self.d_min, self.d_max] + coded


class MergedPair:
    """The shared storage of layers (s, s+1): K and V ``MergedStates`` and layer s's pending new states."""

    def __init__(self, t: float, gamma: float, bits: tuple[int, int], group_size: int, residual: int,
                 max_distance: float = MiniCacheConfig().max_distance) -> None:
        self.settings = (t, gamma, max_distance, bits, group_size, residual)
        self.reset()

    def reset(self) -> None:
        t, gamma, max_distance, (k_bits, v_bits), group_size, residual = self.settings
        self.k = MergedStates(t, gamma, max_distance, k_bits, group_size, residual, per_channel=True)
        self.v = MergedStates(t, gamma, max_distance, v_bits, group_size, residual, per_channel=False)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        return self.k.tensors() + self.v.tensors() + (list(self.pending) if self.pending is not None else [])


class MiniCacheLayer(KVLayer):
    """Layer ``role`` (0: the first, s; 1: the second, s+1) of a ``MergedPair`` (see the module docstring)."""

    def __init__(self, pair: MergedPair, role: int) -> None:
        self.pair, self.role = pair, role
        super().__init__()

    def __repr__(self) -> str:
        return f"MiniCacheLayer(role={self.role}, seen={self.seen})"

    def _reset_state(self) -> None:
        if self.role == 0:  # the pair is shared; one of its layers resets it
            self.pair.reset()

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        _, _, _, bits, group_size, _ = self.pair.settings
        check_minicache_head_dim(bits, group_size, key_states.shape[-1])
        super().lazy_initialization(key_states)

    def _update(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pair
        keys = torch.cat([pair.k.restore(self.role, k), k], dim=-2)
        values = torch.cat([pair.v.restore(self.role, v), v], dim=-2)
        if self.role == 0:
            pair.pending = (k, v)
            return keys, values
        if pair.pending is None or pair.pending[0].shape != k.shape:
            raise RuntimeError("MiniCache: the second layer of a pair updated without the first layer's states for "
                               "the same tokens (layers must run in order, every layer once per forward)")
        (k0, v0), pair.pending = pair.pending, None
        pair.k.add(k0, k)
        pair.v.add(v0, v)
        return keys, values

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        empty = self.empty()
        return self.pair.k.restore(self.role, empty), self.pair.v.restore(self.role, empty)

    def held_tensors(self) -> Iterable[torch.Tensor]:
        return self.pair.tensors()


_DEFAULT = MiniCacheConfig()  # the defaults of the constructor's arguments


class MiniCache(KVCache):
    """MiniCache over ``num_layers`` layers.

    Parameters (defaults and ranges: ``llm_compress.kv.config.MiniCacheConfig``, which checks them)
    ----------
    num_layers : the model's decoder layers.
    start_layer : first merged layer (None: num_layers // 2); pairs (s, s+1), (s+2, s+3), ...
    t : SLERP interpolation toward the second layer of a pair.
    gamma : retention threshold, the top share of each pair's distance range kept unmerged (module docstring); 1
        retains everything.
    max_distance : normalized angular distance above which a pair is always retained (1: never).
    bits : (k_bits, v_bits) of KIVI under the cache (16, 16 = no quantization).
    group_size, residual : KIVI's group size and full-precision window (used where bits < 16).
    """

    def __init__(self, num_layers: int, start_layer: int | None = _DEFAULT.start_layer, t: float = _DEFAULT.t,
                 gamma: float = _DEFAULT.gamma, bits: tuple[int, int] = tuple(_DEFAULT.bits),
                 group_size: int = _DEFAULT.group_size, residual: int = _DEFAULT.residual,
                 max_distance: float = _DEFAULT.max_distance, spec: dict | None = None) -> None:
        check_params("minicache", {"start_layer": start_layer, "t": t, "gamma": gamma, "max_distance": max_distance,
                                   "bits": bits, "group_size": group_size, "residual": residual})
        start = num_layers // 2 if start_layer is None else start_layer
        check_minicache_depth(start, num_layers)
        k_bits, v_bits = bits
        self.start_layer = start
        layers: list[KVLayer] = [KIVILayer(k_bits, v_bits, group_size, residual) for _ in range(start)]
        for first in range(start, num_layers - 1, 2):
            pair = MergedPair(t, gamma, (k_bits, v_bits), group_size, residual, max_distance)
            layers += [MiniCacheLayer(pair, 0), MiniCacheLayer(pair, 1)]
        if len(layers) < num_layers:  # an odd number of layers from start: the last one stays unmerged
            layers.append(KIVILayer(k_bits, v_bits, group_size, residual))
        super().__init__(layers, spec)

    def merged_states(self) -> list[MergedStates]:
        """The K and V ``MergedStates`` of every pair that has merged tokens."""
        return [s for layer in self.layers if isinstance(layer, MiniCacheLayer) and layer.role == 0
                for s in (layer.pair.k, layer.pair.v) if s.mask is not None]

    def retained_fraction(self) -> float:
        """Share of merged-pair token slots (K and V, every pair) kept unmerged; nan before any merge."""
        states = self.merged_states()
        total = sum(s.mask.numel() for s in states)
        return sum(int(s.mask.sum()) for s in states) / total if total else float("nan")
