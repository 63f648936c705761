"""The interface every unlearning method implements, and the data it gets.

A method is a subclass of :class:`Unlearner` in its own module (kvpress-style), built from its recipe section
(:class:`stages.config.UnlearnConfig.method`). ``__call__`` changes ``model`` in place and returns its history.
The gradient methods (SHRED and the baselines) share one plain loop and one loss signature
(:class:`LossUnlearner`); K-FADE takes Gauss-Newton steps instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from stages.unlearn.data import ForgetSet


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

    name: ClassVar[str]

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, model: torch.nn.Module, data: UnlearnData, *, seed: int = 0,
                 progress: bool = False) -> list[dict]:
        """Unlearn ``data.forget`` from ``model`` (in place, on its device); returns per-step records
        (``{"step", "loss", ...}``)."""
        raise NotImplementedError

    def report(self) -> dict:
        """Figures of the finished run the stage adds to its metrics (e.g. how many positions SHRED demoted)."""
        return {}
