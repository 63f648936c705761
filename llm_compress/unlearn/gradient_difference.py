"""Gradient difference (GD): gradient ascent on the forget answers, descent on a retain set (general rows).

    loss = -NLL_forget + retain_weight * NLL_retain

NLL_forget: mean NLL of the batch's span tokens (as gradient ascent); NLL_retain: mean next-token NLL of as many
general training rows (Liu et al. 2022; the TOFU baseline).
"""

from __future__ import annotations

import torch

from llm_compress.unlearn.base import Batch
from llm_compress.unlearn.loop import LossUnlearner, mean_span_nll, retain_nll


class GradientDifference(LossUnlearner):
    needs_retain = True

    def loss(self, model, batch: Batch) -> torch.Tensor:
        forget = mean_span_nll(self.forward_forget(model, batch.forget), batch.forget)
        return -forget + self.cfg.retain_weight * retain_nll(model, batch.retain)
