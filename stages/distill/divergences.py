"""Token-level divergences between a teacher and a student, one shared signature.

Conventions (tests and users rely on them):
- p = teacher, q = student, both ``softmax(logits / temperature)``; temperature 1 by default.
- ``logits`` are [..., V]; ``mask`` (optional) is [...] with 1 for tokens that count.
- The returned loss is the mean over unmasked tokens of the per-token divergence summed over the
  vocabulary (a scalar). No T^2 scaling unless ``scale_by_t2=True``.
- ``forward_kl`` = KL(p || q) (mode covering); ``reverse_kl`` = KL(q || p) (mode seeking).
All arithmetic is in float32 (or higher) whatever the logits' dtype: bf16 log-softmax over 100k+
classes loses too much precision.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from stages.errors import TrainingError


def _prep(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    if student_logits.shape != teacher_logits.shape:
        raise TrainingError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ in shape (same tokenizer?)")
    if not temperature > 0:
        raise TrainingError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # log q, [..., V]
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # log p, [..., V]
    return s, t


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, temperature: float, scale_by_t2: bool):
    # per_token: [...]; mean over the tokens that count
    if mask is None:
        loss = per_token.mean()
    else:
        m = mask.to(per_token.dtype)
        loss = (per_token * m).sum() / m.sum().clamp_min(1.0)
    return loss * temperature**2 if scale_by_t2 else loss


def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False):
    """KL(p || q) = sum_v p_v (log p_v - log q_v), mean over unmasked tokens."""
    log_q, log_p = _prep(student_logits, teacher_logits, temperature)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _reduce(per_token, mask, temperature, scale_by_t2)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False):
    """KL(q || p) = sum_v q_v (log q_v - log p_v), mean over unmasked tokens."""
    log_q, log_p = _prep(student_logits, teacher_logits, temperature)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    return _reduce(per_token, mask, temperature, scale_by_t2)


Divergence = Callable[..., torch.Tensor]
DIVERGENCES: dict[str, Divergence] = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}


def get_divergence(name: str) -> Divergence:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise TrainingError(f"unknown divergence '{name}'; available: {', '.join(DIVERGENCES)}") from None
