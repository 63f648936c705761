"""The interface every unlearning method implements, and the data it gets.

A method is a subclass of :class:`Unlearner` in its own module (kvpress-style), built from its recipe section
(``unlearn.method``: one of the models registered, with the class, in :mod:`llm_compress.unlearn.config`).
``__call__`` changes ``model`` in place and returns its history. The gradient methods (SHRED and the baselines) share
one plain loop and one loss signature (:class:`LossUnlearner`); K-FADE takes Gauss-Newton steps instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_compress.unlearn.data import ForgetSet


def token_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, <t]) from logits [B, T, V] -> [B, T] fp32, span's convention (logits at t - 1 predict
    token t); position 0, which nothing predicts, is 0."""
    z = logits[:, :-1].float()  # [B, T-1, V] predicts ids[:, 1:]
    lp = z.gather(-1, ids[:, 1:, None]).squeeze(-1) - z.logsumexp(-1)  # [B, T-1]
    return F.pad(lp, (1, 0))


def span_logp_sum(logits: torch.Tensor, fs: ForgetSet) -> torch.Tensor:
    """log p(answer | prompt) per record: sum_t span[:, t] * log p(ids[:, t] | ids[:, <t]) -> [B]."""
    return torch.where(fs.span, token_logp(logits, fs.ids), 0.0).sum(1)


def span_nll(logits: torch.Tensor, fs: ForgetSet) -> torch.Tensor:
    """Per-record mean NLL of the span tokens -> [B]."""
    return -span_logp_sum(logits, fs) / fs.span.sum(1).clamp_min(1)


@dataclass
class UnlearnData:
    forget: ForgetSet  # what to remove
    general: torch.Tensor  # [R, T] int64 general training rows: retain set, K-FAC data (never the forget set)


@dataclass
class Batch:
    """One step's rows: forget records (with ``index`` into the forget set, for precomputed targets) and, for
    methods with a retain term, general rows."""

    forget: ForgetSet
    index: torch.Tensor  # [B] int64 positions of these records in the whole forget set
    retain: torch.Tensor | None = None  # [B, T] int64


class Unlearner:
    """Base of every method: ``cfg`` is its recipe section (a pydantic model with a ``method`` field)."""

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def name(self) -> str:
        """The method's registered name (``UNLEARN_METHODS`` in :mod:`llm_compress.unlearn.config`)."""
        return self.cfg.method

    def __call__(self, model: torch.nn.Module, data: UnlearnData, *, seed: int = 0,
                 progress: bool = False) -> list[dict]:
        """Unlearn ``data.forget`` from ``model`` (in place, on its device); returns per-step records
        (``{"step", "loss", ...}``)."""
        raise NotImplementedError

    def report(self) -> dict:
        """Figures of the finished run the stage adds to its metrics (e.g. how many positions SHRED demoted)."""
        return {}
