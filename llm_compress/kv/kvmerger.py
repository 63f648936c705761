"""KVMerger: merge runs of consecutive tokens whose keys are alike into one K/V state each; how much merges is decided
by a similarity threshold, so it varies per layer and head.

Based on KVMerger (Wang, Jin, Yu, Zhang 2024, arXiv 2407.08454, "Model Tells You Where to Merge: Adaptive KV Cache
Merging for LLMs on Long-Context Tasks"): within a layer and head, the (post-RoPE) keys of neighbouring tokens are
highly similar, so runs of them ("merging sets") can be replaced by one Gaussian-kernel-weighted state around the
member the model attends to most (the pivot). Rules, per layer, (batch row, KV head) independently, over the held
states in token order (keys as cached, post-RoPE):

- Protected: the first ``sinks`` held states and the last ``window`` ones are never merged (pads are never held).
- Merging sets (the paper's Algorithm 1, a greedy backward scan): the latest unassigned state a opens a set (its
  anchor); earlier states a-1, a-2, ... join while cos(k_j, k_a) > ``threshold`` (the paper's 0.75; cosines clamped to
  [-1, 1], so 1 merges nothing) and j is not protected; the first one that fails opens the next set. So every member
  of a set has key cosine above the threshold to its anchor, a set is a run of consecutive states, and nothing at or
  below the threshold is ever merged.
  Computed without a Python loop over tokens: ``predecessors`` finds for every state i where the scan from i stops,
  ``anchors`` walks the chain from the last state by pointer doubling (log2 N gathers).
- Budget (optional, ``budget``): the least share of a row's real tokens each head keeps, a cap on merging, not a
  quota: a head whose sets would hold fewer than ceil(budget x tokens) raises its own threshold (never lowers it,
  binary search) until they hold at least that many; with no budget the threshold alone decides, as in the paper.
- Pivot p of a set: the member with the highest accumulated attention (``pivot="attention"``, the paper), ties to the
  earliest; or, as an option, the member whose key is closest (cosine) to the set's mean key (``pivot="mean_key"``).
  Accumulated attention of a held state = the softmax attention weight it received, summed over the last ``observe``
  queries of the prompt and every later query, over the query heads that share its KV head; a merged state carries
  the sum of its members'. A cache never sees queries: ``attach(model)`` (``build_cache(spec, model)`` calls it)
  registers a forward pre-hook on every attention module that recomputes those queries (q_proj + RoPE, only the
  last ``observe`` rows) and hands them to the layer, which scores them against the keys it is about to return.
- Gaussian kernel weights (the paper's kernel-weighted merging as the reviews quote it): g_i = exp(-|k_i - k_p|^2 /
  (2 sigma^2)), w_i = g_i / sum_j g_j (the pivot has g_p = 1, the largest weight). sigma^2 = the set's mean of
  |k_i - k_p|^2 (adaptive; when it is 0, every g_i = 1).
- Merged key k* = sum_i w_i k_i; merged value v* = |S| sum_i w_i v_i (the paper's value rule as a reading note and a
  re-implementation quote it, the latter as its Eq. 7): the value weights are the key weights rescaled by the set size
  |S| (states counted, a merged state as one: its value already carries its own size), so the numerator of the
  attention output keeps roughly the |S| shares the set had before the merge. Computed in float32 with scatter_add
  over set ids, stored in the states' dtype; a set of one is copied exactly.
- When: right after the prompt pass (the paper compresses the prompt's cache), and again whenever ``interval`` tokens
  were added since the last compression (an extension: decoding would otherwise grow the cache without bound);
  merged states can be merged again.

Storage is ragged: each (row, head) holds its own number of states. Stored per layer: the held K and V of every
(row, head) packed one after another, [T, D] in the states' dtype (T = the total held), their accumulated attention
[T] float32 (pivot attention only), the held count per (row, head), long [B, H_kv], and the declared pads per row,
long [B]. ``nbytes`` counts exactly these; no padding to the longest head is held between updates.

Attention over ragged storage: ``update`` returns [B, H_kv, L + q_len, D], L = the longest head's count, each head's
states first and zeros after them, then the exact new states; the attention module's pre-hook replaces the mask for
that layer by one that hides each head's empty slots ([B, H_q, q_len, L + q_len]: bool for SDPA, additive for eager;
its new-token block is the model's own mask's last q_len columns, so causality and padding of the new tokens stay
the model's). The model builds its mask from layer 0's ``get_mask_sizes`` = (L + q_len, seen - L); a layer whose
storage is rectangular with that width keeps the model's mask untouched (so with nothing merged the cache gives
DynamicCache's logits bit for bit). Running the model with a cache that was never attached is refused once a layer
holds states (the mask would be wrong). The prompt pass attends to its exact states (the first ``update`` returns its
input). Positions: ``get_seq_length()`` = tokens seen, so new tokens keep their true RoPE positions; a merged key
mixes the rotations of nearby positions, as in the paper. Left padding: ``set_padding(attention_mask)`` before the
prompt (``build_cache(..., attention_mask=...)``); pads are dropped at the prompt; an undeclared padded prompt is
refused. Eager/SDPA attention only.

Deviations from the paper (details of which come from its abstract, reviews and a third-party re-implementation; the
body was not readable here): sigma is adaptive per set, not the paper's fixed-point formula or its tuned sigma = 5 (a
distance scale of Llama-2's keys, meaningless for another model); attention-selected heavy hitters are not protected
(only the first ``sinks`` and the last ``window``); compression repeats during decoding; a budget, when given, is met
by raising a head's threshold, which the paper does not specify; whether Algorithm 1 compares a candidate with the
set's anchor (here) or with its adjacent neighbour (chained) could not be checked against the paper's text.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from llm_compress.errors import InputError
from llm_compress.kv.config import KVMergerConfig
from llm_compress.kv.fingerprint import attention_modules
from llm_compress.kv.sink import EvictionCache, EvictionLayer
from llm_compress.kv.spec import check_params

_SEARCH_STEPS = 24  # bisections of a head's raised threshold in [threshold, 1]
_CHUNK = 256  # query rows per block of the [B, H, rows, N] similarity matrix in ``predecessors``


def slots(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Which of ``width`` left-aligned slots hold a state: bool [B, H, width] from the counts long [B, H]."""
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(-1)


def unpack(flat: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Packed states [T, *E] (each (row, head)'s in turn) -> left-aligned [B, H, width, *E], zeros in empty slots."""
    out = flat.new_zeros(*lengths.shape, width, *flat.shape[1:])
    out[slots(lengths, width)] = flat
    return out


def _region(lengths: torch.Tensor, width: int, sinks: int, window: int) -> torch.Tensor:
    """bool [B, H, width]: the held slots that may merge (not among the first ``sinks`` or the last ``window``)."""
    idx = torch.arange(width, device=lengths.device)
    return (idx >= sinks) & (idx < (lengths - window).unsqueeze(-1))


def predecessors(keys: torch.Tensor, lengths: torch.Tensor, sinks: int, window: int,
                 threshold: float) -> torch.Tensor:
    """Where the backward scan of Algorithm 1 stops for every anchor: long [B, H, N].

    keys [B, H, N, D] left-aligned, ``lengths`` long [B, H] held per (row, head). For a mergeable slot i: the latest
    j < i that may not join i's set (cos(k_j, k_i) <= threshold, or j protected), -1 if none; the set opened at i is
    then (prev(i), i]. Protected and empty slots get i - 1 (a set of one).
    """
    b, h, n, _ = keys.shape
    unit = F.normalize(keys.float(), dim=-1)
    idx = torch.arange(n, device=keys.device)
    region = _region(lengths, n, sinks, window)
    prev = (idx - 1).expand(b, h, n).clone()
    for start in range(0, n, _CHUNK):
        rows = idx[start:start + _CHUNK]
        sim = (unit[:, :, start:start + _CHUNK] @ unit.transpose(-1, -2)).clamp(-1, 1)  # [B, H, rows, N]
        stops = (idx < rows.unsqueeze(-1)) & ((sim <= threshold) | (idx < sinks))  # j < i that ends the scan from i
        last = torch.where(stops, idx, -1).amax(-1)  # [B, H, rows]
        prev[:, :, start:start + _CHUNK] = torch.where(region[:, :, start:start + _CHUNK], last,
                                                       prev[:, :, start:start + _CHUNK])
    return prev


def anchors(prev: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The anchors of the scan that starts at each head's last held slot and jumps through ``prev``: bool [B, H, N].

    Every set is (previous anchor, anchor]. Pointer doubling: the slot reached after t jumps, for every t < N at once,
    is built from the jumps of 2^k steps (about log2 N gathers), then marked.
    """
    b, h, n = prev.shape
    jump = torch.cat([torch.where(prev < 0, n, prev), torch.full((b, h, 1), n, device=prev.device)], -1)  # n: done
    start = torch.where(lengths > 0, lengths - 1, n)
    at = start.unsqueeze(-1).expand(b, h, n).contiguous()  # [B, H, t]: the slot after t jumps
    steps = torch.arange(n, device=prev.device)
    for k in range(max(1, n.bit_length())):
        at = torch.where(((steps >> k) & 1).bool(), jump.gather(-1, at), at)
        jump = jump.gather(-1, jump)
    return torch.zeros(b, h, n + 1, dtype=torch.bool, device=prev.device).scatter_(-1, at, True)[..., :n]


def _raised_predecessors(keys: torch.Tensor, lengths: torch.Tensor, prev: torch.Tensor,
                         sinks: int, window: int) -> Any:
    """A function eps [B, H] -> ``predecessors`` at per-head thresholds eps >= the one that gave ``prev``.

    A higher threshold only shortens each scan, so the band of the base scan's longest run suffices: run[b, h, i, u] =
    min over u' <= u of cos(k_i, k_{i-1-u'}) (-inf below the sinks), and the scan from i at eps takes the run's
    leading entries > eps (the run is non-increasing in u).
    """
    n = keys.shape[-2]
    idx = torch.arange(n, device=keys.device)
    depth = int((idx - 1 - prev).amax()) if n else 0
    unit = F.normalize(keys.float(), dim=-1)
    band = torch.full((*keys.shape[:2], n, max(depth, 1)), float("-inf"), device=keys.device)
    for u in range(depth):  # band[..., i, u] = cos(k_i, k_{i-1-u}) where i-1-u is mergeable
        band[:, :, u + 1:, u] = (unit[:, :, u + 1:] * unit[:, :, :n - u - 1]).sum(-1).clamp(-1, 1)
    band[..., (idx.unsqueeze(-1) - 1 - torch.arange(band.shape[-1], device=keys.device)) < sinks] = float("-inf")
    run = band.cummin(-1).values
    region = _region(lengths, n, sinks, window)

    def at(eps: torch.Tensor) -> torch.Tensor:
        taken = (run > eps[:, :, None, None]).sum(-1)  # [B, H, N]
        return torch.where(region, idx - 1 - taken, idx - 1)

    return at


def merging_sets(keys: torch.Tensor, lengths: torch.Tensor, sinks: int, window: int, threshold: float,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """The anchors (set ends) of every (row, head)'s merging sets: bool [B, H, N] (module docstring).

    keys [B, H, N, D] left-aligned; ``lengths`` long [B, H]; ``keep`` long [B, H] (optional): the fewest states a head
    may be left with; a head whose sets would be fewer gets the lowest threshold in [threshold, 1] (bisection) at
    which they are not (1 merges nothing).
    """
    prev = predecessors(keys, lengths, sinks, window, threshold)
    ends = anchors(prev, lengths)
    if keep is None or not (ends.sum(-1) < keep).any():
        return ends
    at = _raised_predecessors(keys, lengths, prev, sinks, window)
    short = ends.sum(-1) < keep
    lo = torch.full(lengths.shape, float(threshold), device=keys.device)
    hi = torch.where(short, 1.0, lo)  # feasible thresholds; 1 merges nothing
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        ok = anchors(at(mid), lengths).sum(-1) >= keep
        hi, lo = torch.where(short & ok, mid, hi), torch.where(short & ~ok, mid, lo)
    return anchors(at(hi), lengths)


def merge_sets(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None, ends: torch.Tensor,
               lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Merge every set the anchors ``ends`` define (module docstring: pivot, Gaussian weights, |S| on values).

    keys, values [B, H, N, D] left-aligned with ``lengths`` long [B, H] held; ``scores`` [B, H, N] float32, the
    accumulated attention (the pivot is the member with the most) or None (the pivot is the member closest to the
    set's mean key); ``ends`` bool [B, H, N]. Returns K, V [B, H, M, D] in the states' dtype, the merged scores
    [B, H, M] (sums) or None, and the held counts long [B, H] (M = the largest).
    """
    b, h, n, d = keys.shape
    first = ends.long()
    out = first.cumsum(-1) - first  # [B, H, N]: each slot's set; a head's empty slots go to row `its count`, unused
    counts = first.sum(-1)
    size = int(counts.max()) + 1

    def set_sum(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, E] -> [B, H, size, E], summed per set
        return x.new_zeros(b, h, size, x.shape[-1]).scatter_add_(2, out.unsqueeze(-1).expand_as(x), x)

    def per_token(x: torch.Tensor) -> torch.Tensor:  # [B, H, size, E] -> [B, H, N, E], each slot's set's value
        return x.gather(2, out.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))

    k, v = keys.float(), values.float()
    members = set_sum(torch.ones(b, h, n, 1, device=keys.device))  # [B, H, size, 1]: |S|
    rank = scores if scores is not None else F.cosine_similarity(k, per_token(set_sum(k) / members.clamp_min(1)), -1)
    best = torch.full((b, h, size), float("-inf"), device=keys.device).scatter_reduce(2, out, rank, "amax")
    position = torch.arange(n, device=keys.device).expand(b, h, n)
    candidates = position.masked_fill(rank < best.gather(2, out), n)
    pivot = torch.full((b, h, size), n, device=keys.device).scatter_reduce(2, out, candidates, "amin")  # earliest
    k_pivot = k.gather(2, pivot.gather(2, out).clamp_max(n - 1).unsqueeze(-1).expand(-1, -1, -1, d))  # [B, H, N, D]
    dist2 = (k - k_pivot).pow(2).sum(-1, keepdim=True)  # [B, H, N, 1]
    sigma2 = per_token(set_sum(dist2) / members.clamp_min(1))
    g = torch.where(sigma2 > 0, torch.exp(-dist2 / (2 * sigma2).clamp_min(torch.finfo(torch.float32).tiny)),
                    torch.ones_like(dist2))
    total = set_sum(g)  # [B, H, size, 1], >= 1 for every set (its pivot has g = 1)
    merged_k = (set_sum(g * k) / total.clamp_min(1))[:, :, :-1]
    merged_v = (members * set_sum(g * v) / total.clamp_min(1))[:, :, :-1]  # |S| sum_i w_i v_i
    merged_s = None if scores is None else set_sum(scores.unsqueeze(-1))[:, :, :-1, 0]
    return merged_k.to(keys.dtype), merged_v.to(values.dtype), merged_s, counts


class KVMergerLayer(EvictionLayer):
    """One layer of ragged merged storage (see the module docstring). ``lengths`` long [B, H]: states held per
    (row, head); ``held`` is the longest head's count (the width ``update`` returns for the past)."""

    def __init__(self, threshold: float, budget: float | None, pivot: str, observe: int, sinks: int, window: int,
                 interval: int) -> None:
        self.threshold, self.budget, self.pivot, self.observe = threshold, budget, pivot, observe
        self.sinks, self.window, self.interval = sinks, window, interval
        super().__init__()

    def __repr__(self) -> str:
        return (f"KVMergerLayer(threshold={self.threshold}, budget={self.budget}, pivot={self.pivot!r}, "
                f"observe={self.observe}, sinks={self.sinks}, window={self.window}, interval={self.interval}, "
                f"held={self.held}, seen={self.seen})")

    def _reset_state(self) -> None:
        super()._reset_state()  # pads (k_held / v_held stay None: the storage is the packed tensors below)
        self.k_flat: torch.Tensor | None = None  # [T, D]
        self.v_flat: torch.Tensor | None = None
        self.s_flat: torch.Tensor | None = None  # [T] float32: accumulated attention (pivot "attention")
        self.lengths: torch.Tensor | None = None  # long [B, H]
        self.since = 0  # tokens added since the last compression
        self.queries: tuple[torch.Tensor, float] | None = None  # from the pre-hook: ([B, H_q, w, D] post-RoPE, scale)
        self.prepared = False  # the pre-hook set this forward's mask

    @property
    def held(self) -> int:
        return 0 if self.lengths is None else int(self.lengths.max())

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, held, D] each: every head's states left-aligned, zeros after them (``lengths`` says where)."""
        if self.lengths is None:
            return self.empty(), self.empty()
        return unpack(self.k_flat, self.lengths, self.held), unpack(self.v_flat, self.lengths, self.held)

    def held_tensors(self) -> Iterable[torch.Tensor]:
        tensors = [self.k_flat, self.v_flat, self.lengths, self.s_flat, self.pads]
        return [t for t in tensors if t is not None]

    def attention_mask(self, mask: torch.Tensor | None, q_len: int, groups: int, eager: bool) -> torch.Tensor | None:
        """The mask this layer's attention needs, from the model's ``mask`` (built for layer 0's sizes): unchanged
        when this layer's storage is rectangular at that width, else [B, H_q, q_len, held + q_len] hiding each head's
        empty slots (bool for SDPA, additive in ``mask``'s dtype for eager)."""
        width = self.held
        if width == 0:
            return mask
        valid = slots(self.lengths, width)  # [B, H, width]
        if bool(valid.all()) and (mask is None or mask.shape[-1] == width + q_len):
            return mask
        if mask is None:
            new = torch.ones(q_len, q_len, dtype=torch.bool, device=valid.device).tril()[None, None]
        else:
            new = mask[..., -q_len:] if mask.dtype == torch.bool else mask[..., -q_len:] == 0  # [B, 1, q, q]
        b = valid.shape[0]
        past = valid.repeat_interleave(groups, dim=1).unsqueeze(2).expand(-1, -1, q_len, -1)  # [B, H_q, q, width]
        allowed = torch.cat([past, new.expand(b, past.shape[1], -1, -1)], dim=-1)
        if not eager:
            return allowed
        dtype = mask.dtype if mask is not None else self.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                         torch.finfo(dtype).min)

    def _attention(self, keys: torch.Tensor, valid: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Attention the pending queries pay to ``keys`` [B, H, S, D] (the past slots, ``valid`` [B, H, S - q], then
        the q new tokens, ``real`` [B, q]: not a pad), summed over the queries and each KV head's query heads:
        float32 [B, H, S]. Pad queries count nothing."""
        queries, scaling = self.queries
        b, hq, w, d = queries.shape
        h, s = keys.shape[1], keys.shape[2]
        q, width = real.shape[1], s - real.shape[1]
        logits = torch.einsum("bhgwd,bhsd->bhgws", queries.float().view(b, h, hq // h, w, d), keys.float()) * scaling
        causal = torch.arange(q, device=keys.device) <= torch.arange(q - w, q, device=keys.device).unsqueeze(-1)
        new = (causal & real.unsqueeze(1)).unsqueeze(1).expand(b, h, w, q)  # [B, H, w, q]
        allowed = torch.cat([valid.unsqueeze(2).expand(b, h, w, width), new], dim=-1).unsqueeze(2)  # [B, H, 1, w, S]
        weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        return (weights * real[:, None, None, q - w:, None]).sum((2, 3))

    def _update(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seen == 0 and self.pads is None:
            self._check_padding(cache_kwargs)
        if self.pads is not None and self.pads.shape[0] != k.shape[0]:
            raise InputError(f"set_padding declared {self.pads.shape[0]} rows, the batch has {k.shape[0]}")
        width, prepared, self.prepared = self.held, self.prepared, False
        if width and not prepared:
            raise InputError("the KVMerger cache holds a different number of states per head and layer and needs its "
                             "attention hook: build it with build_cache(spec, model) / load_kv_cache(folder, model), "
                             "or call cache.attach(model) before running the model")
        b, h, q, _ = k.shape
        pads = self.pads.to(k.device) if self.pads is not None else torch.zeros(b, dtype=torch.long, device=k.device)
        real = self.seen + torch.arange(q, device=k.device) >= pads.unsqueeze(-1)  # [B, q]: not a pad
        valid_past = slots(self.lengths, width) if width else torch.zeros(b, h, 0, dtype=torch.bool, device=k.device)
        keys = torch.cat([unpack(self.k_flat, self.lengths, width), k], dim=-2) if width else k  # [B, H, S, D]
        values = torch.cat([unpack(self.v_flat, self.lengths, width), v], dim=-2) if width else v
        valid = torch.cat([valid_past, real.unsqueeze(1).expand(b, h, q)], dim=-1)  # [B, H, S]
        scores = None
        if self.pivot == "attention":
            if self.queries is None:
                raise InputError("KVMerger pivot 'attention' needs the model's queries: build the cache with "
                                 "build_cache(spec, model) or call cache.attach(model) (or use pivot 'mean_key')")
            past = unpack(self.s_flat, self.lengths, width) if width else keys.new_zeros(b, h, 0, dtype=torch.float32)
            scores = torch.cat([past, past.new_zeros(b, h, q)], -1) + self._attention(keys, valid_past, real)
        self.queries = None
        self.since += q
        lengths = valid.sum(-1)
        k_flat, v_flat = keys[valid], values[valid]
        s_flat = None if scores is None else scores[valid]
        if self.seen == 0 or self.since >= self.interval:
            self.since = 0
            n = int(lengths.max())
            k_rect, v_rect = unpack(k_flat, lengths, n), unpack(v_flat, lengths, n)
            s_rect = None if s_flat is None else unpack(s_flat, lengths, n)
            keep = None
            if self.budget is not None:  # ceil(budget x real tokens of the row), rounded first (0.07 * 100 > 7)
                tokens = (self.seen + q - pads).clamp_min(0).double()
                keep = torch.ceil(torch.round(self.budget * tokens, decimals=9)).long().unsqueeze(-1).expand(b, h)
            ends = merging_sets(k_rect, lengths, self.sinks, self.window, self.threshold, keep)
            if bool((ends.sum(-1) < lengths).any()):
                k_rect, v_rect, s_rect, lengths = merge_sets(k_rect, v_rect, s_rect, ends, lengths)
                held = slots(lengths, k_rect.shape[-2])
                k_flat, v_flat = k_rect[held], v_rect[held]
                s_flat = None if s_rect is None else s_rect[held]
        self.k_flat, self.v_flat, self.s_flat, self.lengths = k_flat, v_flat, s_flat, lengths
        return keys, values

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(held + q_len, seen - held): the width ``update`` returns; each layer's pre-hook fixes its own mask."""
        return self.held + cache_position.shape[0], self.seen - self.held


def _attention_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of an attention module: when it runs with a ``KVMergerCache``, give the layer the last
    ``observe`` queries (post-RoPE, [B, H_q, w, D]) and replace the mask by the layer's own (module docstring).
    Other caches pass through untouched."""
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, KVMergerCache):
        return None
    hidden, rope = kwargs.get("hidden_states"), kwargs.get("position_embeddings")
    if hidden is None or rope is None:
        return None  # called in an unknown way: the layer's update refuses to run without its mask
    layer = cache.layers[module.layer_idx]
    q_len = hidden.shape[1]
    if layer.pivot == "attention":
        w = min(layer.observe, q_len)
        with torch.no_grad():
            q = module.q_proj(hidden[:, -w:]).view(hidden.shape[0], w, -1, module.head_dim).transpose(1, 2)
            cos, sin = (x[:, -w:].unsqueeze(1) for x in rope)
            layer.queries = (q * cos + rotate_half(q) * sin, module.scaling)
    eager = module.config._attn_implementation == "eager"
    kwargs["attention_mask"] = layer.attention_mask(kwargs.get("attention_mask"), q_len,
                                                    module.num_key_value_groups, eager)
    layer.prepared = True
    return args, kwargs


_DEFAULT = KVMergerConfig()  # the defaults of the constructor's arguments


class KVMergerCache(EvictionCache):
    """KVMerger in every one of ``num_layers`` layers (settings: ``llm_compress.kv.config.KVMergerConfig``; rules: the
    module docstring). Run it on a model only after ``attach(model)`` (``build_cache(spec, model)`` does it). For a
    left-padded batch call ``set_padding(attention_mask)`` (the prompt's 2-D mask) before the first forward."""

    def __init__(self, num_layers: int, threshold: float = _DEFAULT.threshold, budget: float | None = _DEFAULT.budget,
                 pivot: str = _DEFAULT.pivot, observe: int = _DEFAULT.observe, sinks: int = _DEFAULT.sinks,
                 window: int = _DEFAULT.window, interval: int = _DEFAULT.interval, spec: dict | None = None) -> None:
        check_params("kvmerger", {"threshold": threshold, "budget": budget, "pivot": pivot, "observe": observe,
                                  "sinks": sinks, "window": window, "interval": interval})
        super().__init__([KVMergerLayer(threshold, budget, pivot, observe, sinks, window, interval)
                          for _ in range(num_layers)], spec)

    def attach(self, model: torch.nn.Module) -> "KVMergerCache":
        """Register the attention pre-hook on every attention module of ``model`` (once per module; it does nothing
        for other caches), so ``model(..., past_key_values=self)`` and ``model.generate`` work. Returns self."""
        modules = attention_modules(model)
        for module in modules:
            if not getattr(module, "_kvmerger_hooked", False):
                module.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
                module._kvmerger_hooked = True
        found = len(modules)
        if found != len(self.layers):
            raise InputError(f"KVMerger cache of {len(self.layers)} layers attached to a model with {found} attention "
                             "modules of the Llama layout")
        return self
