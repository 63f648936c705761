"""Attention sinks + recent window (StreamingLLM-style eviction): keep the first ``sinks`` and the last ``window``
tokens of every sequence, drop the middle.

Based on StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453). Once more than sinks + window tokens are held,
each update keeps, per batch row, its first ``sinks`` real (non-pad) tokens and its last ``window`` tokens.

Positions. Keys arrive post-RoPE (Llama attention rotates before ``cache.update``), so kept keys carry their original
positions and need no re-rotation; new tokens get their positions from ``get_seq_length()`` = tokens seen, not held.
Distances between a query and a sink are therefore the true ones. This differs from StreamingLLM, which re-assigns
positions within the cache (HF's old ``SinkCache`` re-rotated kept keys) so a model can run past its trained
context; here positions keep growing, so stay within the model's context length.

Masks. The layer returns held + q_len rows and reports ``get_mask_sizes`` = (held + q_len, seen - held): the mask
treats the held rows as the last ``held`` positions, which is exact for causality (every held token precedes the
queries) and, for the padding bits, exact as long as the pad count of each row is known (``SinkCache.set_padding``).
With left padding, a row with at least sinks + window real tokens keeps only real tokens, which all read ones in
those mask columns; a row with fewer keeps a contiguous suffix of its sequence, pads included, and the mask
columns then line up with its pads exactly. Without declared padding every row is taken as unpadded; a prompt whose
RoPE positions show padding (``generate`` gives pads position 1, so a padded row's first token is not at 0) then
raises instead of silently attending to pad "sinks". Masks are only built for eager/SDPA attention here
(flash-attention's varlen path reads the 2-D mask itself and is not supported with eviction).

Stored per layer: the held K and V, [B, H_kv, min(seen, sinks + window), D], in the states' dtype, and the
pads still in front of each row, long [B] (once declared, or once tokens are evicted).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from llm_compress.errors import InputError
from llm_compress.kv.base import KVCache, KVLayer
from llm_compress.kv.config import SinkConfig
from llm_compress.kv.spec import check_params


def leading_pads(attention_mask: torch.Tensor) -> torch.Tensor:
    """Pad count per row of a left-padded 2-D mask [B, L] (1 = token, 0 = pad) -> long [B]; refuses other padding."""
    if attention_mask.dim() != 2:
        raise InputError(f"expected a 2-D attention mask [batch, seq], got shape {tuple(attention_mask.shape)}")
    real = attention_mask != 0
    pads = (~real).long().cumprod(dim=-1).sum(dim=-1)  # leading zeros per row
    if (real.sum(-1) + pads != attention_mask.shape[-1]).any():
        raise InputError("the sink and kvmerger caches support left padding only (pads before the tokens of each row)")
    return pads


class EvictionLayer(KVLayer):
    """A layer that holds fewer rows than tokens seen (sink, kvmerger): the held K/V [B, H, held, D] stand for the
    last ``held`` positions of the sequence, and ``pads`` counts the left pads still at the front of each row (see
    the module docstring, Masks). Subclasses implement ``_update`` with ``_joined`` and set the three fields."""

    def _reset_state(self) -> None:
        self.k_held: torch.Tensor | None = None  # [B, H, held, D]
        self.v_held: torch.Tensor | None = None
        self.pads: torch.Tensor | None = None  # long [B]: pads still at the front of the held rows; None = undeclared

    @property
    def held(self) -> int:
        return 0 if self.k_held is None else self.k_held.shape[-2]

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(held + q_len, seen - held): the held rows stand for the last ``held`` positions (see module docstring)."""
        return self.held + cache_position.shape[0], self.seen - self.held

    def _check_padding(self, cache_kwargs: dict[str, Any]) -> None:
        """On the first call without declared padding: refuse a prompt whose first token is not at position 0."""
        sin = cache_kwargs.get("sin")  # [B, q_len, D] for the current positions; sin(0) = 0 for every frequency
        if sin is not None and sin.dim() == 3 and (sin[:, 0] != 0).any():
            raise InputError(f"the prompt looks left-padded (its first token is not at position 0): call "
                             f"cache.set_padding(attention_mask) before running it, or {type(self).__name__} would "
                             "keep pads as sink tokens and attend to them")

    def _joined(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The held past + the new states, K and V [B, H, held + q_len, D], and the pads per row (long [B], zeros
        when undeclared); checks the padding first."""
        if self.seen == 0 and self.pads is None:
            self._check_padding(cache_kwargs)
        if self.pads is not None and self.pads.shape[0] != k.shape[0]:
            raise InputError(f"set_padding declared {self.pads.shape[0]} rows, the batch has {k.shape[0]}")
        keys = k if self.k_held is None else torch.cat([self.k_held, k], dim=-2)  # [B, H, N, D]
        values = v if self.v_held is None else torch.cat([self.v_held, v], dim=-2)
        pads = self.pads.to(k.device) if self.pads is not None else torch.zeros(k.shape[0], dtype=torch.long,
                                                                                 device=k.device)
        return keys, values, pads

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_held is None:
            return self.empty(), self.empty()
        return self.k_held, self.v_held

    def held_tensors(self) -> Iterable[torch.Tensor]:
        held = [] if self.k_held is None else [self.k_held, self.v_held]
        return held + ([self.pads] if self.pads is not None else [])  # pads: long [B], 8 bytes a row


class PaddedCache(KVCache):
    """A cache whose layers keep a left-padded batch's pads (``layer.pads``, [B]), declared by ``set_padding``."""

    def set_padding(self, attention_mask: torch.Tensor) -> "PaddedCache":
        """Declare the prompt's left padding, [B, L] (1 = token, 0 = pad); before the first forward. Returns self."""
        if self.get_seq_length() > 0:
            raise InputError("set_padding must be called before the cache has seen any token")
        pads = leading_pads(attention_mask)
        for layer in self.layers:
            layer.pads = pads.clone()
        return self


class EvictionCache(PaddedCache):
    """A cache of ``EvictionLayer``s."""


class SinkLayer(EvictionLayer):
    """One layer keeping ``sinks`` first and ``window`` last tokens per row (see the module docstring)."""

    def __init__(self, sinks: int, window: int) -> None:
        self.sinks, self.window = sinks, window
        super().__init__()

    def __repr__(self) -> str:
        return f"SinkLayer(sinks={self.sinks}, window={self.window}, seen={self.seen})"

    def _update(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, pads = self._joined(k, v, cache_kwargs)
        n, cap = keys.shape[-2], self.sinks + self.window
        if n <= cap:
            self.k_held, self.v_held = keys, values
            return keys, values
        # Per row: the first `sinks` real tokens and the last `window` ones if it has at least cap real tokens
        # in the buffer, else its last cap entries (all its real tokens plus the pads just before them).
        keep_ends = torch.cat([torch.arange(self.sinks, device=k.device),
                               torch.arange(n - self.window, n, device=k.device)])  # [cap]
        suffix = torch.arange(n - cap, n, device=k.device)  # [cap]
        enough = (n - pads >= cap).unsqueeze(-1)  # [B, 1]
        sink_shift = torch.cat([pads.unsqueeze(-1).expand(-1, self.sinks),
                                torch.zeros(k.shape[0], self.window, dtype=torch.long, device=k.device)], dim=-1)
        idx = torch.where(enough, keep_ends + sink_shift, suffix)  # [B, cap]
        gather = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])  # [B, H, cap, D]
        self.k_held, self.v_held = keys.gather(2, gather), values.gather(2, gather)
        self.pads = (pads - (n - cap)).clamp_min(0)
        return keys, values


_DEFAULT = SinkConfig()  # the defaults of the constructor's arguments


class SinkCache(EvictionCache):
    """StreamingLLM-style cache: ``sinks`` first + ``window`` last tokens kept in every one of ``num_layers`` layers.

    For a left-padded batch call ``set_padding(attention_mask)`` (the prompt's 2-D mask) before the first forward.
    Defaults and ranges of the settings: ``llm_compress.kv.config.SinkConfig``, which checks them.
    """

    def __init__(self, num_layers: int, sinks: int = _DEFAULT.sinks, window: int = _DEFAULT.window,
                 spec: dict | None = None) -> None:
        check_params("sink", {"sinks": sinks, "window": window})
        super().__init__([SinkLayer(sinks, window) for _ in range(num_layers)], spec)
