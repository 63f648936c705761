"""KVMerger: merge runs of consecutive tokens whose keys are alike into one K/V state each, under a memory budget.

Based on KVMerger (Wang et al. 2024, arXiv 2407.08454, "Model Tells You Where to Merge: Adaptive KV Cache Merging
for LLMs on Long-Context Tasks"): within a layer, the keys of neighbouring tokens are highly similar, so runs of
them ("merging sets") can be replaced by one Gaussian-kernel-weighted state around a pivot token of the run.

Rules, per layer, for the held past + the current tokens, K and V [B, H_kv, N, D] (keys post-RoPE):

- Target: T = max(sinks + window, ceil(budget * seen)), seen = tokens seen including the current ones (the product
  rounded to 9 decimals first: 0.07 * 100 is 7.000000000000001 in floats). A compression runs right after the
  prompt pass when N > T, and afterwards whenever N > T + interval, so most decode steps only append.
- Mergeable region of batch row b: held rows [p_b + sinks, N - window), p_b = the left pads still at the front of
  the row. The first ``sinks`` real tokens and the last ``window`` tokens are never merged (kept exactly).
- Edges: (i, i + 1), both in the region; candidates are those with cos(k_i, k_{i+1}) >= threshold. Similarities
  in float32, sim [B, H, N - 1].
- The budget is kept: a compression removes r = N - T rows (or all the region allows). Storage stays rectangular
  and one attention mask serves every layer (transformers builds it from layer 0's ``get_mask_sizes``), so every
  layer, row and head loses the same r rows. Pads go first (never attended, free to drop): row b drops
  d_b = min(p_b, r) pads and merges m_b = r - d_b edges in each head, r = min(N - T, min over rows b of (p_b + the
  region's edge count)). Each (l, b, h) merges its m_b highest-ranked edges: its candidates by decreasing
  similarity, then, where it has fewer than m_b candidates, its other edges by decreasing similarity (ties: the
  earlier edge). The threshold thus says which neighbours are alike enough to merge first; the budget says how
  many merge. So a layer only plans in ``update`` (``rank_edges``, [B, H, N - 1] ranks) and the cache applies
  every plan after the last layer's update (``KVMergerCache.compress``); all layers are due at the same steps, as
  they hold and see the same counts.
- Merging sets: maximal runs of consecutive tokens joined by chosen edges (a chain graph); every other token is a
  set of one and is copied exactly. Set ids come from a cumsum over "starts a set" flags, [B, H, N].
- Pivot p of a set: the member whose key has the highest cosine similarity to the set's mean key (the first such).
- Weights: w_i = exp(-|k_i - k_p|^2 / (2 sigma^2)), sigma^2 = the set's mean of |k_i - k_p|^2 (adaptive); when
  sigma^2 = 0 (a set of one, or all keys equal) every w_i = 1.
- Merged K = sum w_i k_i / sum w_i, merged V = sum w_i v_i / sum w_i (the key weights for both), computed in float32
  with scatter_add over set ids and stored in the states' dtype. A merged state counts as one token afterwards.

``update`` returns the held past + the exact new states (the prompt pass attends to its exact states); the
compression applies to what is kept. Positions: keys arrive post-RoPE and new tokens' positions come from
``get_seq_length()`` = tokens seen, so a merged key mixes the rotations of nearby positions (as in the paper).

Masks and padding are sink.py's (``EvictionLayer``/``EvictionCache``): ``get_mask_sizes`` = (held + q_len,
seen - held), the held rows standing for the last ``held`` positions of the 2-D attention mask. Dropping pads
before merging keeps that exact: after a total reduction D = seen - held, each row still holds max(0, P_b - D)
pads in front, which line up with its pad columns. A left-padded batch needs ``cache.set_padding(attention_mask)``
before the prompt (``build_cache(..., attention_mask=...)`` does it); an undeclared padded prompt is refused.
Eager/SDPA attention only.

Stored per layer: the held K and V, [B, H_kv, held, D] in the states' dtype, and the pads long [B]. Within the
forward pass that compresses, each layer also keeps its uncompressed rows and plan until the last layer's update,
so that pass peaks at the uncompressed size (for the prompt: the full cache).

Deviations from the paper (its details as recalled, not re-read): the paper's pivot is the set member with the
highest accumulated attention score; a cache never sees queries or attention weights, so the pivot here is the
member closest (cosine) to the set's mean key, a medoid. sigma is set per merging set from the distances to the
pivot (adaptive), not a tuned constant. The paper forms merging sets from all consecutive similarities above the
threshold, per layer and head; here the number merged is set by the budget and is equal for every layer, row and
head (rectangular storage, one shared mask): a (layer, row, head) with more candidates than that leaves its least
similar ones unmerged, one with fewer also merges its most similar non-candidate neighbours (the paper evaluates at
fixed cache budgets too).
The paper compresses the prompt's cache once; here compression repeats during decoding every ``interval`` tokens
beyond the target, merged states can be merged again (weighted as one token each), and the first ``sinks`` and
last ``window`` tokens are protected.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from llm_compress.kv.config import KVMergerConfig
from llm_compress.kv.sink import EvictionCache, EvictionLayer
from llm_compress.kv.spec import check_params


def rank_edges(keys: torch.Tensor, pads: torch.Tensor, sinks: int, window: int,
               threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the edges (i, i + 1) for merging, per the rules in the module docstring.

    keys [B, H, N, D]; pads long [B]. Returns (rank long [B, H, N - 1]: 0 = the most similar candidate edge of that
    (b, h), candidates before the region's other edges, those before edges outside the region; removable long [B]:
    rows each row can lose, its pads + its region's edge count). Removing r rows drops d_b = min(pads_b, r) pads and
    merges the edges ranked below r - d_b in every head (``choose_edges``).
    """
    n = keys.shape[-2]
    k = keys.float()
    sim = F.cosine_similarity(k[..., :-1, :], k[..., 1:, :], dim=-1)  # [B, H, N-1]: edge i joins tokens i, i+1
    edge = torch.arange(n - 1, device=keys.device)
    region = (edge >= (pads + sinks).unsqueeze(-1)) & (edge <= n - window - 2)  # [B, N-1]: both ends mergeable
    # Candidates (>= threshold) first, then the region's other edges, each group by decreasing similarity (cosines
    # lie in [-1, 1], so a shift of 3 orders the groups); edges outside the region last, never chosen.
    score = torch.where(sim >= threshold, sim, sim - 3.0).masked_fill(~region.unsqueeze(1), float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)  # [B, H, N-1]; ties: the earlier edge
    rank = torch.empty_like(order).scatter_(-1, order, edge.expand_as(order))
    return rank, pads + region.sum(-1)


def choose_edges(rank: torch.Tensor, pads: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen bool [B, H, N - 1], dropped long [B]) removing r rows from every row (r <= its removable count)."""
    dropped = pads.clamp_max(r)
    return rank < (r - dropped)[:, None, None], dropped


def merge_sets(keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor, dropped: torch.Tensor,
               rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the sets the chosen edges define and drop each row's first ``dropped[b]`` tokens (pads).

    keys, values [B, H, N, D]; chosen bool [B, H, N - 1]; dropped long [B]; rows: the rows left (the same for every
    (b, h)). Returns K, V [B, H, rows, D] in the states' dtype (see the module docstring for the weights).
    """
    b, h, n, d = keys.shape
    starts = torch.ones(b, h, n, dtype=torch.long, device=keys.device)
    starts[..., 1:] = (~chosen).long()
    out = starts.cumsum(-1) - 1 - dropped[:, None, None]  # [B, H, N]: output row of each token; < 0: a dropped pad
    out = out.masked_fill(out < 0, rows)  # dropped pads go to one extra row, cut off at the end
    size = rows + 1

    def set_sum(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, E] -> [B, H, size, E], summed per set
        return x.new_zeros(b, h, size, x.shape[-1]).scatter_add_(2, out.unsqueeze(-1).expand_as(x), x)

    def per_token(x: torch.Tensor) -> torch.Tensor:  # [B, H, size, E] -> [B, H, N, E], each token's set's value
        return x.gather(2, out.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))

    k, v = keys.float(), values.float()
    count = set_sum(torch.ones(b, h, n, 1, device=keys.device))  # [B, H, size, 1]
    mean = set_sum(k) / count.clamp_min(1)  # [B, H, size, D]
    closeness = F.cosine_similarity(k, per_token(mean), dim=-1)  # [B, H, N]
    best = torch.full((b, h, size), float("-inf"), device=keys.device).scatter_reduce(2, out, closeness, "amax")
    position = torch.arange(n, device=keys.device).expand(b, h, n)
    candidates = position.masked_fill(closeness < best.gather(2, out), n)
    pivot = torch.full((b, h, size), n, device=keys.device).scatter_reduce(2, out, candidates, "amin")  # first best
    k_pivot = k.gather(2, pivot.gather(2, out).unsqueeze(-1).expand(-1, -1, -1, d))  # [B, H, N, D]
    dist2 = (k - k_pivot).pow(2).sum(-1, keepdim=True)  # [B, H, N, 1]
    sigma2 = per_token(set_sum(dist2) / count.clamp_min(1))  # [B, H, N, 1]
    weight = torch.where(sigma2 > 0, torch.exp(-dist2 / (2 * sigma2).clamp_min(torch.finfo(torch.float32).tiny)),
                         torch.ones_like(dist2))
    total = set_sum(weight)  # [B, H, size, 1], >= 1 for every set (its pivot weighs 1)
    merged_k = (set_sum(weight * k) / total)[:, :, :rows]
    merged_v = (set_sum(weight * v) / total)[:, :, :rows]
    return merged_k.to(keys.dtype), merged_v.to(values.dtype)


class KVMergerLayer(EvictionLayer):
    """One layer merging similar consecutive tokens down to its budget (see the module docstring)."""

    def __init__(self, budget: float, threshold: float, sinks: int, window: int, interval: int) -> None:
        self.budget, self.threshold = budget, threshold
        self.sinks, self.window, self.interval = sinks, window, interval
        super().__init__()

    def __repr__(self) -> str:
        return (f"KVMergerLayer(budget={self.budget}, threshold={self.threshold}, sinks={self.sinks}, "
                f"window={self.window}, interval={self.interval}, held={self.held}, seen={self.seen})")

    def target(self, seen: int) -> int:
        """Rows held right after a compression, for ``seen`` tokens seen."""
        return max(self.sinks + self.window, math.ceil(round(self.budget * seen, 9)))

    def _reset_state(self) -> None:
        super()._reset_state()
        self.plan: tuple[torch.Tensor, torch.Tensor, int] | None = None  # pending: (rank, pads, removable rows)

    def _update(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, pads = self._joined(k, v, cache_kwargs)  # [B, H, N, D], long [B]
        n, target = keys.shape[-2], self.target(self.seen + k.shape[-2])
        self.k_held, self.v_held, self.plan = keys, values, None
        if n > target + (0 if self.seen == 0 else self.interval):
            rank, removable = rank_edges(keys, pads, self.sinks, self.window, self.threshold)
            self.plan = rank, pads, min(n - target, int(removable.min()))
        return keys, values

    @property
    def removable(self) -> int:
        """Rows the pending compression can remove (0 when none is pending)."""
        return 0 if self.plan is None else self.plan[2]

    def compress(self, r: int) -> None:
        """Apply the pending compression, removing r <= ``removable`` rows from every (row, head); clears it."""
        if self.plan is not None and r > 0:
            rank, pads, _ = self.plan
            chosen, dropped = choose_edges(rank, pads, r)
            self.k_held, self.v_held = merge_sets(self.k_held, self.v_held, chosen, dropped, self.held - r)
            self.pads = pads - dropped
        self.plan = None


_DEFAULT = KVMergerConfig()  # the defaults of the constructor's arguments


class KVMergerCache(EvictionCache):
    """KVMerger in every one of ``num_layers`` layers (settings: see the module docstring).

    Every layer must hold the same number of rows (one attention mask serves all layers), so the layers only plan
    their compression in ``update``; after the last layer's update the cache removes from every layer the fewest
    rows any layer can remove (``compress``). For a left-padded batch call ``set_padding(attention_mask)`` (the
    prompt's 2-D mask) before the first forward.
    """

    def __init__(self, num_layers: int, budget: float = _DEFAULT.budget, threshold: float = _DEFAULT.threshold,
                 sinks: int = _DEFAULT.sinks, window: int = _DEFAULT.window, interval: int = _DEFAULT.interval,
                 spec: dict | None = None) -> None:
        check_params("kvmerger", {"budget": budget, "threshold": threshold, "sinks": sinks, "window": window,
                                  "interval": interval})
        super().__init__([KVMergerLayer(budget, threshold, sinks, window, interval) for _ in range(num_layers)],
                         spec)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        if layer_idx == len(self.layers) - 1:
            self.compress()
        return keys, values

    def compress(self) -> None:
        """Apply the layers' pending compressions, all removing the same number of rows."""
        r = min(layer.removable for layer in self.layers)
        for layer in self.layers:
            layer.compress(r)
