"""SHRED: retain-set-free unlearning by self-distillation with logit demotion.

Based on "Retain-Set-Free Unlearning via Self-Distillation with Logit Demotion" (Hu et al. 2026, arXiv 2605.07482);
the paper's exact rule, P and K are not public (see notes/methods.md 5.1), so the choices below are ours.

1. One no-grad pass of the frozen original model over the forget set gives p(y_t) = p(ids[t] | ids[<t]).
2. Forget positions: per record, of its span positions after the first ``skip_tokens``, the ceil(P n) with the lowest
   p(y_t). The other span positions (the skipped ones included) are anchors.
3. Targets: the original top-K logits at every span position. At forget positions the true token's logit is demoted
   before the softmax (when it is in the top-K; otherwise there is nothing to demote and the target is the original
   top-K):
       subtract (default): z_y <- z_y - gamma
       floor:              z_y <- min_{top-K} z - gamma        (the undemoted top-K minimum)
   target = log_softmax over the K logits: a top-K renormalised distribution.
4. Train the model alone on  loss = mean_{span positions} KL(target || student restricted to the same K tokens).

Mass rule: the softmax over K means the mass the demoted token loses is redistributed among the other K - 1 tokens in
proportion to their original probabilities (their ratios are untouched). With q the true token's top-K probability,
subtract gives q' = q e^-gamma / (q e^-gamma + 1 - q): q' < 1/2 whenever q < 1 / (1 + e^-gamma) (1 - 4.5e-5 at
gamma = 10), so the memorised token stops dominating unless it was near-certain, while the rest of the distribution
keeps its shape.
Why subtract is the default: it is shift-invariant and relative (the demotion is the same gamma nats whatever the
logit scale of the position), strength 0 is exactly self-distillation (a continuous knob), and it leaves the
memorised token ranked where gamma puts it rather than always last. floor always drops the token below all K - 1
others, which is harsher and ignores how confident the original was.

Which positions the loss averages over: all span positions (forget positions + anchors, equal weight per token);
prompt and pad positions are not trained. At the start (student = original) anchor terms are exactly 0, so the
gradient comes from the forget positions alone and the anchors pull back any drift.
"""

from __future__ import annotations

import math

import torch

from llm_compress.unlearn.base import Batch, UnlearnData, token_logp
from llm_compress.unlearn.loop import LossUnlearner


def forget_positions(logp_true: torch.Tensor, span: torch.Tensor, share: float, skip_tokens: int) -> torch.Tensor:
    """Forget positions [N, T] bool: per record, of its span positions except the first ``skip_tokens``, the
    ceil(share * n) with the lowest ``logp_true`` (ties: the earlier position first).

    logp_true: [N, T] log p(ids[n, t] | ids[n, <t]) of the original model; span: [N, T] bool (token t is forgotten).
    ceil is taken with a 1e-9 slack, so 0.3 * 10 picks 3 and not 4.
    """
    out = torch.zeros_like(span, dtype=torch.bool)
    for n in range(span.shape[0]):
        pos = span[n].nonzero().squeeze(1)[skip_tokens:]  # [n] eligible positions, ascending
        m = math.ceil(share * len(pos) - 1e-9)
        if m:
            order = torch.sort(logp_true[n, pos], stable=True).indices  # lowest first, ties keep position order
            out[n, pos[order[:m]]] = True
    return out


def demoted_targets(logits: torch.Tensor, ids: torch.Tensor, forget: torch.Tensor, span: torch.Tensor, k: int,
                    rule: str, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K targets of the original ``logits`` [N, T, V] with the true token demoted at ``forget`` positions.

    Aligned like ``span``: position t holds the distribution over token t, built from logits[:, t - 1]; position 0
    (predicted by nothing) holds a uniform placeholder over tokens 0..K-1. Returns (topk_idx [N, T, K] long,
    target_logp [N, T, K] fp32), target_logp = log_softmax of the K (demoted) logits (module docstring, step 3).
    """
    if (forget & ~span).any():
        raise ValueError("forget positions must lie inside the span")
    k = min(k, logits.shape[-1])
    top, idx = logits[:, :-1].float().topk(k, dim=-1)  # [N, T-1, K], sorted descending
    hit = forget[:, 1:, None] & (idx == ids[:, 1:, None])  # [N, T-1, K]: the true token, where it is demoted
    if rule == "subtract":
        demoted = top - strength
    elif rule == "floor":
        demoted = (top[..., -1:] - strength).expand_as(top)  # below the undemoted top-K minimum
    else:
        raise ValueError(f"unknown demotion rule {rule!r} (subtract, floor)")
    target = torch.where(hit, demoted, top).log_softmax(-1)  # [N, T-1, K]
    N, K = ids.shape[0], k
    idx0 = torch.arange(K, device=idx.device).expand(N, 1, K)  # position 0 placeholder
    logp0 = torch.full((N, 1, K), -math.log(K), device=target.device)
    return torch.cat([idx0, idx], 1), torch.cat([logp0, target], 1)


def shred_loss(student_logits: torch.Tensor, topk_idx: torch.Tensor, target_logp: torch.Tensor,
               weight_mask: torch.Tensor) -> torch.Tensor:
    """Forward KL(target || student) over the target's K tokens, averaged over ``weight_mask`` positions.

        loss = (1 / |M|) sum_{(b, t) in M} sum_{i in K} p_i (log p_i - log q_i),   q = softmax_K(student z[b, t-1, K])

    student_logits [B, T, V] (logits at t - 1 predict token t); topk_idx, target_logp [B, T, K] aligned like span;
    weight_mask [B, T] bool (position 0 is never used). The student is renormalised over the same K tokens, so a
    student equal to the original scores exactly 0 wherever the target is the undemoted top-K.
    """
    z = student_logits[:, :-1].float().gather(-1, topk_idx[:, 1:])  # [B, T-1, K]
    logq = z.log_softmax(-1)
    logp = target_logp[:, 1:]
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [B, T-1]
    mask = weight_mask[:, 1:]
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp_min(1)


class Shred(LossUnlearner):
    """SHRED (module docstring). After ``prepare``: ``forget_mask`` [N, T] bool, the chosen forget positions, and the
    targets ``topk_idx`` / ``target_logp`` [N, T, K] on the CPU, indexed by record."""

    @torch.no_grad()
    def prepare(self, model, data: UnlearnData) -> None:
        cfg, fs = self.cfg, data.forget
        device = next(model.parameters()).device
        masks, idxs, logps = [], [], []
        for i in range(0, len(fs), cfg.batch_size):
            b = fs.rows(slice(i, i + cfg.batch_size)).to(device)
            logits = model(b.ids, attention_mask=b.attn).logits  # [b, T, V]
            forget = forget_positions(token_logp(logits, b.ids), b.span, cfg.forget_share, cfg.skip_tokens)
            ti, tl = demoted_targets(logits, b.ids, forget, b.span, cfg.top_k, cfg.demotion, cfg.strength)
            masks.append(forget.cpu())
            idxs.append(ti.cpu())
            logps.append(tl.cpu())
        self.forget_mask = torch.cat(masks)  # [N, T]
        self.topk_idx, self.target_logp = torch.cat(idxs), torch.cat(logps)  # [N, T, K]

    @property
    def n_forget_positions(self) -> int:
        return int(self.forget_mask.sum())

    def report(self) -> dict:
        return {"forget_positions": self.n_forget_positions}

    def loss(self, model, batch: Batch) -> torch.Tensor:
        logits = self.forward_forget(model, batch.forget)  # [B, T, V]
        dev = logits.device
        return shred_loss(logits, self.topk_idx[batch.index].to(dev), self.target_logp[batch.index].to(dev),
                          batch.forget.span)
