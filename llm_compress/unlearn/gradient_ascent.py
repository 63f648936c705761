"""Gradient ascent (GA): maximise the forget answers' NLL.

    loss = -(1 / |S|) sum_{(n, t) in S} -log p_theta(ids[n, t] | ids[n, <t])      S = span tokens of the batch

The simplest baseline (e.g. TOFU, Maini et al. 2024); unbounded, so it eventually wrecks the whole model: keep
steps and lr small.
"""

from __future__ import annotations

import torch

from llm_compress.unlearn.base import Batch
from llm_compress.unlearn.loop import LossUnlearner, mean_span_nll


class GradientAscent(LossUnlearner):
    def loss(self, model, batch: Batch) -> torch.Tensor:
        return -mean_span_nll(self.forward_forget(model, batch.forget), batch.forget)
