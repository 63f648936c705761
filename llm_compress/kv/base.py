"""The interface every KV-cache compressor in ``llm_compress.kv`` implements: a Hugging Face ``Cache`` of
per-layer objects.

A method is one ``KVCache`` subclass built of ``KVLayer`` subclasses (transformers 4.57 ``Cache(layers=[...])`` API),
usable as ``model.generate(..., past_key_values=cache)`` or ``model(ids, past_key_values=cache, use_cache=True)``.
Contracts every layer keeps (each one is what transformers 4.57's attention, masks and ``generate`` rely on):

- ``update(k, v)`` receives the current tokens' states, keys post-RoPE, both [B, H_kv, q_len, D], and returns the
  K/V attention uses, [B, H_kv, N, D] in the incoming dtype and device, whose last q_len rows are the incoming states
  themselves (exact). N is what ``get_mask_sizes`` predicted before the update, so the shared mask fits; on the
  first (prompt) call N = q_len: the prompt attends to its exact states, compression applies to what is kept.
- ``get_seq_length()`` is the number of tokens *seen*, never the number held: RoPE positions and ``generate``'s
  ``cache_position`` come from it.
- Storage follows the incoming states' device and dtype; nothing is allocated before the first update.
- Beam search, assisted decoding and the other batch/crop helpers are refused (their base versions touch only
  ``layer.keys``/``layer.values`` and would silently corrupt compressed storage). Build one cache per sequence batch.

Memory: ``KVCache.held_tensors()`` is every tensor the layers hold between updates (codes, scales, offsets,
magnitudes, retained tokens, masks, pad counts, full-precision windows), each storage counted once even when layers
share it or a view keeps a larger one alive. Two sums of them:

- ``nbytes16()``, the figure every memory ratio uses: what the cache holds in a 16-bit deployment. Floating-point
  tensors (exact K/V, scales, offsets, magnitudes) count 2 bytes per element whatever the run's dtype; integer and
  bool tensors (packed codes, masks, pad counts) count as stored. So the figure, and the ratio, is the same in a
  float32 run (the recipe default) and a bfloat16 one, and a cache that keeps everything exact scores 1.0.
- ``nbytes()``: the bytes this run's storage really takes (floats in the run's dtype; twice the above in float32).

``full_bytes(dtype_bytes=2)`` is what a 16-bit full ``DynamicCache`` would hold for the same tokens, 2 (K and V) x
layers x B x H_kv x seen x D x 2 bytes. Memory ratio = full_bytes / nbytes16 (how many times smaller).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Iterable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from llm_compress.errors import InputError


class KVLayer(CacheLayerMixin):
    """One layer of a compressed cache: a seen-token counter, geometry, and the tensors it holds.

    Subclasses implement ``_update(k, v) -> (K, V)`` (after the counter and geometry are set by ``update``),
    ``_reset_state()`` (empty storage) and ``held_tensors()``; they override ``get_mask_sizes`` when they return
    fewer rows than tokens seen. ``keys`` / ``values`` (what ``cache[i]`` gives, legacy indexing) are the past
    states as attention would see them now, rebuilt from storage on each read, [B, H_kv, held, D].
    """

    is_sliding = False

    def __init__(self) -> None:
        # CacheLayerMixin.__init__ would assign keys/values, which are read-only views here.
        self.is_initialized = False
        self.seen = 0
        self.batch = self.kv_heads = self.head_dim = 0
        self._reset_state()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seen={self.seen})"

    # -- the transformers layer API ------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        """Record dtype, device and geometry [B, H_kv, *, D] from the first states."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.kv_heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states [B, H_kv, q_len, D]; return the K/V attention uses (see the module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        elif key_states.shape[0] != self.batch:
            raise InputError(f"{type(self).__name__} was filled with batch size {self.batch}, got "
                             f"{key_states.shape[0]}; build a new cache per batch")
        keys, values = self._update(key_states, value_states, cache_kwargs or {})
        self.seen += key_states.shape[-2]
        return keys, values

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(kv_length, kv_offset): every token seen is returned, so (seen + q_len, 0) as for ``DynamicLayer``."""
        return self.seen + cache_position.shape[0], 0

    def get_seq_length(self) -> int:
        """Tokens seen (not held)."""
        return self.seen

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget everything (a fresh layer)."""
        self.seen = 0
        self._reset_state()

    @property
    def keys(self) -> torch.Tensor | None:
        return self.past()[0] if self.is_initialized else None

    @property
    def values(self) -> torch.Tensor | None:
        return self.past()[1] if self.is_initialized else None

    def _refuse(self, what: str):
        raise NotImplementedError(f"{type(self).__name__} does not support {what} (beam search, assisted or "
                                  "contrastive decoding, offloading): use greedy/sampling with a new cache per batch")

    def crop(self, max_length: int) -> None:
        self._refuse("crop")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse("reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("batch_select_indices")

    def offload(self) -> None:
        self._refuse("offload")

    def prefetch(self) -> None:
        self._refuse("prefetch")

    # -- what a method implements ---------------------------------------------------------------------------------

    @abstractmethod
    def _reset_state(self) -> None:
        """Set storage to empty (called from ``__init__`` and ``reset``; geometry may still be unknown)."""

    @abstractmethod
    def _update(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` without the bookkeeping; ``self.seen`` still counts the tokens before this call."""

    @abstractmethod
    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held past states as attention sees them, K and V [B, H_kv, held, D] in the states' dtype."""

    @abstractmethod
    def held_tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor this layer keeps between updates (shared ones too: the cache counts each storage once)."""

    def empty(self) -> torch.Tensor:
        """[B, H_kv, 0, D] in the states' dtype and device (what ``past`` holds before any token)."""
        return torch.empty(self.batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)

    def full_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes a full cache of ``dtype_bytes`` per element would hold for this layer's tokens seen (K and V)."""
        return 2 * self.batch * self.kv_heads * self.seen * self.head_dim * dtype_bytes


def storage_nbytes(tensors: Iterable[torch.Tensor], float_bytes: int | None = None) -> int:
    """Bytes of the storages behind tensors, each storage once (a view keeps its whole storage alive).

    ``float_bytes``: count floating-point storages at that many bytes per element (2: what they hold in a 16-bit
    dtype) instead of their own; integer and bool storages always count as stored.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() and key not in seen:
            seen.add(key)
            scaled = float_bytes is not None and t.is_floating_point()
            total += storage.nbytes() // t.element_size() * float_bytes if scaled else storage.nbytes()
    return total


class KVCache(Cache):
    """A ``Cache`` of ``KVLayer``s with memory accounting; ``spec`` is the plain-dict config it was built from."""

    def __init__(self, layers: list[KVLayer], spec: dict | None = None) -> None:
        super().__init__(layers=layers)
        self.spec = spec

    def held_tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor every layer holds between updates (a storage shared by layers may come more than once)."""
        return (t for layer in self.layers for t in layer.held_tensors())

    def nbytes(self) -> int:
        """Bytes this run's storage takes: every held tensor in its own dtype, each storage counted once."""
        return storage_nbytes(self.held_tensors())

    def nbytes16(self) -> int:
        """Bytes held in a 16-bit deployment: floating-point tensors at 2 bytes per element, codes, masks and pad
        counts as stored, each storage once (the module docstring); the same in a float32 and a bfloat16 run."""
        return storage_nbytes(self.held_tensors(), float_bytes=2)

    def full_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes a full ``DynamicCache`` in a ``dtype_bytes``-byte dtype would hold for the same tokens."""
        return sum(layer.full_bytes(dtype_bytes) for layer in self.layers)

    def memory_ratio(self) -> float:
        """full_bytes / nbytes16 (how many times smaller than a 16-bit full cache, now); inf for an empty cache."""
        held = self.nbytes16()
        return self.full_bytes() / held if held else float("inf")
