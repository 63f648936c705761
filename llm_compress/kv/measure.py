"""How much a KV cache saves and what it costs: memory ratio and quality against the full cache, teacher-forced.

``measure(model, rows, spec, prefill)``: each row [T] is split into a prompt of ``prefill`` tokens and a scored part.
The prompt goes through the model in one pass with the cache; then every further token is fed one decode step at a
time, so each prediction is made from what the cache kept (as in generation), and compared with the same procedure on
transformers' ``DynamicCache`` (the full cache):

- ``ppl`` / ``ppl_full`` / ``ppl_ratio``: perplexity of the scored tokens (each predicted from the tokens before it);
- ``kl_to_full``: mean over scored positions of KL(full-cache distribution || compressed-cache distribution);
- ``top1_agreement``: share of scored positions whose argmax matches the full cache's;
- ``bytes`` / ``full_bytes`` / ``memory_ratio``: what the cache holds after the whole rows (``KVCache.nbytes``,
  every tensor it keeps) against a 16-bit full cache of the same tokens (2 bytes per element, what a GPU user holds).

``held_out_rows`` picks the rows and prompt length from the recipe's ``kv`` section: the KV stage and the evaluate
stage measure on the same rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def stepwise_logits(model, rows: torch.Tensor, prefill: int, cache) -> torch.Tensor:
    """Logits [B, T - prefill, V] predicting tokens prefill .. T-1 through ``cache``: the prompt rows[:, :prefill]
    in one pass, then tokens prefill .. T-2 one decode step each."""
    out = model(input_ids=rows[:, :prefill], past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1:].float()]  # predicts token `prefill`
    for t in range(prefill, rows.shape[1] - 1):
        out = model(input_ids=rows[:, t:t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1:].float())
    return torch.cat(logits, dim=1)  # [B, T - prefill, V]: position i predicts token prefill + i


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
    comp = stepwise_logits(model, rows, prefill, cache)
    full = stepwise_logits(model, rows, prefill, DynamicCache(config=model.config))
    targets = rows[:, prefill:]  # [B, T - prefill]
    return {
        **compare(comp, full, targets),
        "bytes": int(cache.nbytes()), "full_bytes": int(cache.full_bytes()),
        "memory_ratio": cache.full_bytes() / max(1, cache.nbytes()),
        "rows": int(rows.shape[0]), "context": int(rows.shape[1]), "prefill": int(prefill),
        "scored_tokens": int(targets.numel()),
    }
