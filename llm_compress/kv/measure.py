"""How much a KV cache saves and what it costs: memory ratio and quality against the full cache, teacher-forced.

``measure(model, rows, spec, prefill)``: each row [T] is split into a prompt of ``prefill`` tokens and a scored part.
The prompt goes through the model in one pass with the cache; then every further token is fed one decode step at a
time, so each prediction is made from what the cache kept (as in generation), and compared with the same procedure on
transformers' ``DynamicCache`` (the full cache):

- ``ppl`` / ``ppl_full`` / ``ppl_ratio``: perplexity of the scored tokens (each predicted from the tokens before it);
- ``kl_to_full``: mean over scored positions of KL(full-cache distribution || compressed-cache distribution);
- ``top1_agreement``: share of scored positions whose argmax matches the full cache's;
- memory over decoding (``MemoryTrace``): after every decode step, the bytes the cache holds in a 16-bit deployment
  (``KVCache.nbytes16``: every tensor it keeps, floats at 2 bytes per element whatever the run's dtype, codes, masks
  and pad counts as stored) and a 16-bit full cache's bytes for the same tokens. ``bytes_mean`` / ``bytes_max``: mean
  and maximum held bytes over the steps; ``full_bytes_mean``: the full cache's mean over the same steps;
  ``memory_ratio_mean`` = full_bytes_mean / bytes_mean (how many times smaller, on average while decoding);
  ``memory_ratio_min``: the smallest per-step ratio full / held (the step where the cache is fullest relative to a
  full cache: KIVI just before its window is flushed, KVMerger just before a compression); ``run_dtype_bytes_mean``:
  the mean bytes this run's storage really took (floats in the run's dtype); ``memory_steps``: steps sampled. A
  snapshot right after the prompt would flatter: KIVI's window is then empty, a merging cache just compressed.

``held_out_rows`` picks the rows and prompt length from the recipe's ``kv`` section: the KV stage and the evaluate
stage measure on the same rows.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from llm_compress.kv.base import KVCache, storage_nbytes
from llm_compress.kv.spec import kv_dims


@torch.no_grad()
def stepwise_logits(model, rows: torch.Tensor, prefill: int, cache,
                    on_step: Callable[[Any], None] | None = None) -> torch.Tensor:
    """Logits [B, T - prefill, V] predicting tokens prefill .. T-1 through ``cache``: the prompt rows[:, :prefill]
    in one pass, then tokens prefill .. T-2 one decode step each; ``on_step(cache)`` after every decode step."""
    out = model(input_ids=rows[:, :prefill], past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1:].float()]  # predicts token `prefill`
    for t in range(prefill, rows.shape[1] - 1):
        out = model(input_ids=rows[:, t:t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1:].float())
        if on_step is not None:
            on_step(cache)
    return torch.cat(logits, dim=1)  # [B, T - prefill, V]: position i predicts token prefill + i


def reachable_tensors(obj, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every plain tensor ``obj`` references: through attributes, lists, tuples and dicts, and into tensor subclasses
    that wrap others (``__tensor_flatten__``: quanto's QTensor and PackedTensor, whose own storage is a stand-in of
    the unpacked size). Modules, classes and functions are not entered: a cache that keeps a reference to the model
    does not hold its weights. How the bytes of a cache that is not a ``KVCache`` (transformers' DynamicCache,
    QuantizedCache) are found, and how a test checks that a ``KVCache``'s ``held_tensors`` misses nothing."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if hasattr(type(obj), "__tensor_flatten__"):
            for name in obj.__tensor_flatten__()[0]:
                yield from reachable_tensors(getattr(obj, name), seen)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from reachable_tensors(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from reachable_tensors(v, seen)
    elif isinstance(obj, (torch.nn.Module, type, types.FunctionType, types.MethodType, types.ModuleType,
                          functools.partial)):
        return
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from reachable_tensors(v, seen)


def cache_tensors(cache) -> Iterable[torch.Tensor]:
    """The tensors a cache holds: a ``KVCache``'s ``held_tensors``, any other cache's reachable tensors."""
    return cache.held_tensors() if isinstance(cache, KVCache) else reachable_tensors(cache)


def full16_bytes(config, batch: int, tokens: int) -> int:
    """A 16-bit full cache of ``tokens`` tokens per row: K and V of every layer and KV head, 2 bytes an element."""
    num_layers, kv_heads, head_dim = kv_dims(config)
    return 2 * num_layers * batch * kv_heads * tokens * head_dim * 2


class MemoryTrace:
    """Held bytes of a cache over decoding: call it with the cache after every decode step (``stepwise_logits``'s
    ``on_step``); ``summary()`` gives the figures of the module docstring. ``config``: the model's config, ``batch``:
    the rows decoded at once (the full cache's size counts every row)."""

    def __init__(self, config, batch: int) -> None:
        self.config, self.batch = config, batch
        self.held: list[int] = []  # 16-bit deployment bytes, per step
        self.run: list[int] = []  # this run's storage bytes, per step
        self.full: list[int] = []  # a 16-bit full cache of the tokens seen, per step

    def __call__(self, cache) -> None:
        tensors = list(cache_tensors(cache))
        self.held.append(storage_nbytes(tensors, float_bytes=2))
        self.run.append(storage_nbytes(tensors))
        self.full.append(full16_bytes(self.config, self.batch, cache.get_seq_length()))

    def summary(self) -> dict:
        """bytes_mean, bytes_max, full_bytes_mean, memory_ratio_mean, memory_ratio_min, run_dtype_bytes_mean,
        memory_steps; needs at least one step."""
        if not self.held:
            raise ValueError("MemoryTrace.summary: no step was recorded")
        n = len(self.held)
        bytes_mean, full_mean = sum(self.held) / n, sum(self.full) / n
        return {"bytes_mean": bytes_mean, "bytes_max": max(self.held), "full_bytes_mean": full_mean,
                "memory_ratio_mean": full_mean / max(1.0, bytes_mean),
                "memory_ratio_min": min(f / max(1, h) for f, h in zip(self.full, self.held)),
                "run_dtype_bytes_mean": sum(self.run) / n, "memory_steps": n}


def compare(comp: torch.Tensor, full: torch.Tensor, targets: torch.Tensor) -> dict:
    """Quality of logits ``comp`` against the full cache's ``full`` [B, S, V] on ``targets`` [B, S]: ppl, ppl_full,
    ppl_ratio, kl_to_full (mean KL(full || comp) per position, nats), top1_agreement."""
    nll = F.cross_entropy(comp.flatten(0, 1), targets.flatten()).item()
    nll_full = F.cross_entropy(full.flatten(0, 1), targets.flatten()).item()
    log_p, log_q = F.log_softmax(full, -1), F.log_softmax(comp, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return {"ppl": math.exp(nll), "ppl_full": math.exp(nll_full), "ppl_ratio": math.exp(nll - nll_full),
            "kl_to_full": max(0.0, kl), "top1_agreement": (comp.argmax(-1) == full.argmax(-1)).float().mean().item()}


def held_out_rows(eval_ids: torch.Tensor, kv_cfg, device) -> tuple[torch.Tensor, int]:
    """The first ``kv_cfg.eval_rows`` of the held-out token rows ``eval_ids`` (the data stage's whole eval file),
    [rows, T] on ``device``, and the prompt length (``llm_compress.kv.spec.prompt_length`` of ``kv_cfg.prefill``)."""
    from llm_compress.kv.spec import prompt_length

    rows = eval_ids[: kv_cfg.eval_rows].to(device)  # [rows, T]
    return rows, prompt_length(rows.shape[1], kv_cfg.prefill)


def rounded(metrics: dict) -> dict:
    """Float figures to 6 significant digits, the rest as is."""
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in metrics.items()}


@torch.no_grad()
def measure(model, rows: torch.Tensor, spec: dict, prefill: int) -> dict:
    """Quality and memory of the cache ``spec`` on token rows [B, T] (see the module docstring); 0 < prefill < T."""
    from transformers import DynamicCache

    from llm_compress.kv import build_cache

    if not 0 < prefill < rows.shape[1]:
        raise ValueError(f"prefill must lie in (0, {rows.shape[1]}), got {prefill}")
    rows = rows.long()
    cache = build_cache(spec, model)
    trace = MemoryTrace(model.config, rows.shape[0])
    comp = stepwise_logits(model, rows, prefill, cache, on_step=trace)
    if not trace.held:  # prefill = T - 1: no decode step, the state after the prompt is the only one
        trace(cache)
    full = stepwise_logits(model, rows, prefill, DynamicCache(config=model.config))
    targets = rows[:, prefill:]  # [B, T - prefill]
    return {
        **compare(comp, full, targets), **trace.summary(),
        "rows": int(rows.shape[0]), "context": int(rows.shape[1]), "prefill": int(prefill),
        "scored_tokens": int(targets.numel()),
    }


@torch.no_grad()
def retrieval_correct(model, items: list, make_cache: Callable[[], Any], batch_size: int = 8) -> list[bool]:
    """Whether the model, reading each retrieval probe's prompt through a fresh cache from ``make_cache()``, greedily
    decodes exactly the probe's answer tokens (``llm_compress.kv.retrieval.Probe``, token units), in probe order.

    The prompt goes through the cache in one pass, then the answer's tokens one decode step each
    (``stepwise_logits``): the answer is right when every step's argmax is the answer's next token. That is greedy
    decoding's exact match, without sampling the wrong continuations: while every argmax so far was right, greedy
    decoding fed exactly these tokens. Probes of the same context and answer length run as one batch [b, context]."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(items):
        groups.setdefault((len(p.prompt), len(p.answer)), []).append(i)
    correct = [False] * len(items)
    device = getattr(next(model.parameters(), None), "device", None) if hasattr(model, "parameters") else None
    for (prompt_len, _), idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            rows = torch.tensor([list(items[i].prompt) + list(items[i].answer) for i in chunk], device=device)
            logits = stepwise_logits(model, rows, prompt_len, make_cache())  # [b, answer, V]
            hit = (logits.argmax(-1) == rows[:, prompt_len:]).all(-1)  # [b]
            for i, h in zip(chunk, hit.tolist()):
                correct[i] = bool(h)
    return correct
