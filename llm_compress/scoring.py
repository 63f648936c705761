"""Scoring models against a reference on held-out token rows, in one pass: perplexity, KL(reference || model) and
top-1 agreement. Used by the evaluate stage (the teacher is the reference) and by unlearning's utility check (the
model before unlearning is). The reference's logits are computed batch by batch and never stored for the whole set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def score(models: dict[str, torch.nn.Module], teacher: torch.nn.Module, eval_ids: torch.Tensor, batch_size: int,
          device: torch.device, progress: bool = True) -> dict[str, dict]:
    """Perplexity, KL(teacher || model) and top-1 agreement for each model, one pass over the data."""
    acc = {k: {"nll": 0.0, "kl": 0.0, "agree": 0, "n_pred": 0, "n_pos": 0} for k in models}
    for i in tqdm(range(0, len(eval_ids), batch_size), desc="evaluate", disable=not progress, unit="batch"):
        ids = eval_ids[i:i + batch_size].to(device)  # [B, T]
        log_p = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)  # [B, T, V]
        top_p = log_p.argmax(-1)  # [B, T]
        for name, model in models.items():
            logits = log_p if model is teacher else model(input_ids=ids).logits.float()
            log_q = F.log_softmax(logits, dim=-1)
            a = acc[name]
            a["nll"] += F.nll_loss(log_q[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            a["n_pred"] += ids[:, 1:].numel()
            a["kl"] += (log_p.exp() * (log_p - log_q)).sum(-1).sum().item()
            a["agree"] += (log_q.argmax(-1) == top_p).sum().item()
            a["n_pos"] += ids.numel()
    out = {}
    for name, a in acc.items():
        nll = a["nll"] / a["n_pred"]
        kl = max(0.0, a["kl"] / a["n_pos"])  # float rounding can give -1e-9 for the teacher itself
        out[name] = {"ppl": math.exp(min(nll, 50.0)), "nll": nll, "kl_to_teacher": kl,
                     "top1_agreement": a["agree"] / a["n_pos"], "eval_tokens": a["n_pos"]}
    return out
