"""NPO, Negative Preference Optimization (Zhang, Lin, Bai, Mei; arXiv 2404.05868, 2024).

DPO with the forget answer as the only (dispreferred) response and the frozen original model as reference:

    loss = -(2 / beta) mean_n log sigmoid(-beta (log pi_theta(y_n | x_n) - log pi_ref(y_n | x_n)))
           + retain_weight * NLL_retain                                          (NPO+RT when retain_weight > 0)

log pi(y | x) sums the log-probs of record n's span tokens. At the start the ratio is 1, so the loss is
(2 / beta) log 2; as pi_theta(y) -> 0 it tends to 0, so unlike gradient ascent it is bounded below and slows
down by itself. The reference log-probs are computed once, in ``prepare``, from the original model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_compress.unlearn.base import Batch, UnlearnData, span_logp_sum
from llm_compress.unlearn.loop import LossUnlearner, retain_nll


class NPO(LossUnlearner):
    @property
    def needs_retain(self) -> bool:
        return self.cfg.retain_weight > 0

    @torch.no_grad()
    def prepare(self, model, data: UnlearnData) -> None:
        device, fs, bs = next(model.parameters()).device, data.forget, self.cfg.batch_size
        ref = []
        for i in range(0, len(fs), bs):
            b = fs.rows(slice(i, i + bs)).to(device)
            ref.append(span_logp_sum(model(b.ids, attention_mask=b.attn).logits, b).cpu())
        self.ref_logp = torch.cat(ref)  # [N] log pi_ref(y_n | x_n)

    def loss(self, model, batch: Batch) -> torch.Tensor:
        logp = span_logp_sum(self.forward_forget(model, batch.forget), batch.forget)  # [B]
        log_ratio = logp - self.ref_logp[batch.index].to(logp.device)
        loss = -(2 / self.cfg.beta) * F.logsigmoid(-self.cfg.beta * log_ratio).mean()
        if self.cfg.retain_weight > 0:
            loss = loss + self.cfg.retain_weight * retain_nll(model, batch.retain)
        return loss
