"""Teacher -> student divergences for knowledge distillation, one shared signature.

Every divergence is a pure function

    fn(student_logits, teacher_logits, mask=None, temperature=1.0, scale_by_t2=False, **params) -> scalar

Conventions (tests and users rely on them):
- p = teacher, q = student, both ``softmax(logits / temperature)``; temperature 1 by default.
- ``logits`` are [..., V] (any leading shape, usually [B, T, V]); ``mask`` (optional) is [...] with 1 for
  tokens that count and 0 for tokens that do not (other values act as per-token weights).
- The loss is the mean over unmasked tokens of the per-token divergence summed over the vocabulary
  (a scalar): ``sum_i m_i D(p_i, q_i) / max(sum_i m_i, 1)``. With every token masked it is 0.
- No T^2 scaling (Hinton et al.'s gradient-magnitude correction) unless ``scale_by_t2=True``.
- All arithmetic is in float32 (or float64 for float64 inputs) whatever the logits' dtype: bf16
  log-softmax over 100k+ classes loses too much precision.
- Student logits must be finite. Teacher logits may be -inf (a top-k/top-p filtered teacher): the
  teacher's log-probabilities are floored at ``LOG_FLOOR`` = -1e4, so p = 0 there exactly and every
  divergence stays finite (terms that would be +inf, e.g. reverse KL where q > 0 = p, become large
  but finite: q * (log q + 1e4)).

The family (KL(a || b) = sum_v a_v (log a_v - log b_v)):

=================  =====================================================  ==========================
name               per-token divergence                                   parameters
=================  =====================================================  ==========================
forward_kl         KL(p || q)            (mode covering)                  -
reverse_kl         KL(q || p)            (mode seeking)                   -
js                 (KL(p || m) + KL(q || m)) / 2,  m = (p + q) / 2        -
gjsd               b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1-b) q  beta
tvd                sum_v |p_v - q_v| / 2                                  -
skew_kl            KL(p || a p + (1 - a) q)                               alpha
skew_reverse_kl    KL(q || a q + (1 - a) p)                               alpha
akl                w_head KL(p || q) + w_tail KL(q || p)                  mu
alpha_divergence   (1 - sum_v p_v^a q_v^(1-a)) / (a (1 - a))              alpha
bdkd               (1 - w) KL(p || q) + w KL(q || p),                     tau
                   w = sigmoid((H(q) - H(p)) / tau)
sinkhorn           batch-wise entropic optimal transport (SinKD)          epsilon, iterations,
                   between the batch's student and teacher tokens         debias, reduction
=================  =====================================================  ==========================

Each divergence's parameters, their ranges and defaults are defined once, by its model in
:mod:`llm_compress.distill.config` (``DIVERGENCE_MODELS``, which the recipe uses too); ``SPECS`` at the end of this
module registers, per name, that model with the functions that compute it. Parameters are keywords, checked and
completed by the model on every call.

All but ``sinkhorn`` are token-wise (a sum over tokens of a per-token term), so they can be computed
over chunks of tokens: see ``llm_compress.distill.chunked`` for the memory-bounded versions and for the
top-k + tail-bucket teacher; ``llm_compress.distill.chunked.get_divergence(name, chunked=True, **params)`` returns the
chunked one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError

from llm_compress.distill.config import (AKL, BDKD, DIVERGENCE_MODELS, GJSD, JS, TVD, AlphaDivergence, ForwardKL,
                                         ReverseKL, Sinkhorn, SkewKL, SkewReverseKL, divergence_params)
from llm_compress.errors import TrainingError

LOG_FLOOR = -1e4  # teacher log-probabilities are clamped here: exp(-1e4) == 0 in float32 and float64


# ------------------------------------------------------------------ input checks and shared pieces

def _check_inputs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
                  temperature: float) -> None:
    """Raise ``TrainingError`` for inputs no divergence can use (shapes, dtypes, mask, temperature)."""
    if student_logits.shape != teacher_logits.shape:
        raise TrainingError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ in shape (same tokenizer?)")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise TrainingError(f"logits must be [..., V] with V >= 1, got shape {tuple(student_logits.shape)}")
    for what, x in (("student", student_logits), ("teacher", teacher_logits)):
        if not x.is_floating_point():
            raise TrainingError(f"{what} logits must be floating point, got {x.dtype}")
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise TrainingError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
                            f"{tuple(student_logits.shape[:-1])} (one entry per token)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0 and math.isfinite(temperature)):
        raise TrainingError(f"temperature must be > 0 and finite, got {temperature!r}")


def _prep(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """(log q, log p), both [..., V] in float32 (float64 for float64 inputs); log p floored at LOG_FLOOR."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if temperature != 1:  # skip a full [..., V] copy in the common T = 1 case
        s, t = s / temperature, t / temperature
    log_q = F.log_softmax(s, dim=-1)  # [..., V]
    log_p = F.log_softmax(t, dim=-1)  # [..., V]
    # -inf teacher logits give log p = -inf and 0 * -inf = nan in the sums below; the floor keeps p = 0 exactly.
    # In place when nothing differentiates through the teacher (the usual case): no extra [..., V] copy.
    log_p = log_p.clamp_min(LOG_FLOOR) if log_p.requires_grad else log_p.clamp_min_(LOG_FLOOR)
    return log_q, log_p


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, temperature: float, scale_by_t2: bool):
    """Mean of per_token [...] over the tokens that count (mask weights), times T^2 if asked."""
    if mask is None:
        loss = per_token.mean()
    else:
        m = mask.to(per_token.dtype)
        loss = (per_token * m).sum() / m.sum().clamp_min(1.0)
    return loss * temperature**2 if scale_by_t2 else loss


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last dim: [..., V] -> [...]."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) for 0 < w < 1, mixing probabilities (not logits), stably in log space."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


# ------------------------------------------------------------------ per-token divergences
# Each takes (log_q, log_p), both [n, V] (or [..., V]) log-probabilities, and returns [n]: the divergence of
# every token summed over the vocabulary. The chunked and top-k versions reuse them unchanged.

def _forward_kl_tok(log_q, log_p):
    return _kl(log_p, log_q)


def _reverse_kl_tok(log_q, log_p):
    return _kl(log_q, log_p)


def _gjsd_tok(log_q, log_p, beta: float):
    if beta == 0.0:  # the interior tends to 0 here; GKD defines the endpoint as forward KL (see gjsd)
        return _kl(log_p, log_q)
    if beta == 1.0:  # ... and this one as reverse KL
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)  # m = beta p + (1 - beta) q
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _js_tok(log_q, log_p):
    return _gjsd_tok(log_q, log_p, 0.5)


def _tvd_tok(log_q, log_p):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _skew_kl_tok(log_q, log_p, alpha: float):
    if alpha == 0.0:
        return _kl(log_p, log_q)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))  # KL(p || alpha p + (1 - alpha) q)


def _skew_reverse_kl_tok(log_q, log_p, alpha: float):
    if alpha == 0.0:
        return _kl(log_q, log_p)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))  # KL(q || alpha q + (1 - alpha) p)


def _akl_tok(log_q, log_p, mu: float):
    with torch.no_grad():  # the weights are constants for the gradient, as in the AKL paper's code
        p_sorted, order = log_p.detach().exp().sort(dim=-1, descending=True)  # [n, V], [n, V]
        gap = (p_sorted - log_q.detach().exp().gather(-1, order)).abs()  # |p - q| in the teacher's order
        del order
        head = p_sorted.cumsum(-1) <= mu  # [n, V] the teacher's top tokens holding mass <= mu ...
        head[..., 0] = True  # ... and always its argmax
        g_head = (gap * head).sum(-1)  # [n]
        g_all = gap.sum(-1)  # [n]
        # w_head = g_head / (g_head + g_tail); when p == q both gaps are 0 and so is the loss: any weight works
        w_head = torch.where(g_all > 0, g_head / g_all.clamp_min(torch.finfo(g_all.dtype).tiny), 0.5)
    return w_head * _kl(log_p, log_q) + (1.0 - w_head) * _kl(log_q, log_p)


def _alpha_divergence_tok(log_q, log_p, alpha: float):
    if alpha == 1.0:  # the limit alpha -> 1
        return _kl(log_p, log_q)
    if alpha == 0.0:  # the limit alpha -> 0
        return _kl(log_q, log_p)
    log_bc = torch.logsumexp(alpha * log_p + (1.0 - alpha) * log_q, dim=-1)  # log sum_v p^a q^(1-a) <= 0, [n]
    return -torch.expm1(log_bc) / (alpha * (1.0 - alpha))  # expm1: no cancellation when p ~ q


def _bdkd_tok(log_q, log_p, tau: float):
    with torch.no_grad():  # sample-wise weights are constants for the gradient
        h_p = -(log_p.exp() * log_p).sum(-1)  # teacher entropy, [n]
        h_q = -(log_q.exp() * log_q).sum(-1)  # student entropy, [n]
        w_rev = torch.sigmoid((h_q - h_p) / tau)  # student flatter than teacher -> more reverse (mode-seeking) KL
    return (1.0 - w_rev) * _kl(log_p, log_q) + w_rev * _kl(log_q, log_p)


# ------------------------------------------------------------------ lookups in the registry (``SPECS``, at the end)

def spec_of(name: str) -> Spec:
    """The registry entry for ``name``; ``TrainingError`` listing the available names if unknown."""
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise TrainingError(f"unknown divergence '{name}'; available: {', '.join(SPECS)}") from None


def resolve_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with defaults filled in, checked by the divergence's config model (strictly: no strings for
    numbers); ``TrainingError`` naming the parameter for unknown or bad ones."""
    model = spec_of(name).model
    known = [k for k in model.model_fields if k != "name"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TrainingError(f"divergence '{name}' has no parameter {', '.join(map(repr, unknown))}; "
                            f"its parameters: {', '.join(known) or 'none'}")
    try:
        return divergence_params(model.model_validate({"name": name, **params}, strict=True))
    except ValidationError as e:
        err = e.errors()[0]
        raise TrainingError(f"divergence '{name}': {'.'.join(map(str, err['loc']))}: {err['msg']}, "
                            f"got {err.get('input')!r}") from None


def _tokenwise(name: str, student_logits, teacher_logits, mask, temperature, scale_by_t2, params):
    """The plain (full-vocabulary, all tokens at once) evaluation of a token-wise divergence."""
    params = resolve_params(name, params)
    _check_inputs(student_logits, teacher_logits, mask, temperature)
    log_q, log_p = _prep(student_logits, teacher_logits, temperature)  # [..., V] each
    per_token = SPECS[name].per_token(log_q, log_p, **params)  # [...]
    return _reduce(per_token, mask, temperature, scale_by_t2)


# ------------------------------------------------------------------ the public functions

def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
               **params):
    """Forward KL, KL(p || q) = sum_v p_v (log p_v - log q_v): mode covering.

    Args:
        student_logits: [..., V] student logits (q = softmax(student_logits / temperature)).
        teacher_logits: [..., V] teacher logits (p = softmax(teacher_logits / temperature)).
        mask: optional [...] token mask, 1 = counts.
        temperature: softmax temperature (> 0) for both distributions.
        scale_by_t2: multiply the loss by temperature**2 (Hinton et al.), off by default.

    Returns:
        Scalar: the mean over unmasked tokens of KL(p || q).
    """
    return _tokenwise("forward_kl", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
               **params):
    """Reverse KL, KL(q || p) = sum_v q_v (log q_v - log p_v): mode seeking.

    Args and Returns as ``forward_kl``; the scalar is the mean over unmasked tokens of KL(q || p).
    """
    return _tokenwise("reverse_kl", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def js(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
       **params):
    """Jensen-Shannon divergence, (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2.

    Symmetric in p and q, bounded by log 2 per token. Equals ``gjsd`` with beta = 0.5.
    Args and Returns as ``forward_kl``.
    """
    return _tokenwise("js", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def gjsd(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
         **params):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024; TRL ``generalized_jsd_loss``).

        JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

    The mixture is taken over probabilities (``log m = logaddexp(log p + log beta, log q + log(1 - beta))``),
    not over logits or log-probabilities (the bug TRL fixed in #2204).

    Endpoints, precisely: for 0 < beta < 1 the value tends to 0 at both ends, JSD_beta = beta KL(p || q) + O(beta^2)
    as beta -> 0 and JSD_beta = (1 - beta) KL(q || p) + O((1 - beta)^2) as beta -> 1, so
    JSD_beta / beta -> KL(p || q) and JSD_beta / (1 - beta) -> KL(q || p). As in GKD, beta = 0 exactly is
    defined as forward KL(p || q) and beta = 1 exactly as reverse KL(q || p): the loss jumps at the ends
    (near them beta mostly rescales the loss).

    Args:
        beta (keyword): mixing weight in [0, 1] (0.5 is ``js``). Others as ``forward_kl``.

    Returns:
        Scalar: the mean over unmasked tokens of JSD_beta(p, q).
    """
    return _tokenwise("gjsd", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def tvd(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
        **params):
    """Total variation distance, sum_v |p_v - q_v| / 2 (symmetric, in [0, 1] per token).

    Args and Returns as ``forward_kl``.
    """
    return _tokenwise("tvd", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def skew_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
            **params):
    """Skew forward KL of DistiLLM (Ko et al. 2024): KL(p || alpha p + (1 - alpha) q).

    DistiLLM's code returns -sum p log m, which differs from this by the constant H(p) (same gradient); this
    is the divergence itself, so it is 0 when q == p. alpha = 0 is forward KL; it is bounded by log(1 / alpha).

    Args:
        alpha (keyword): skew in [0, 1) (the default is DistiLLM's ``skew_alpha``). Others as ``forward_kl``.

    Returns:
        Scalar: the mean over unmasked tokens of the skew KL.
    """
    return _tokenwise("skew_kl", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def skew_reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
                    **params):
    """Skew reverse KL of DistiLLM: KL(q || alpha q + (1 - alpha) p).

    alpha = 0 is reverse KL. Args and Returns as ``skew_kl``.
    """
    return _tokenwise("skew_reverse_kl", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def akl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
        **params):
    """Adaptive KL (Wu et al. 2024, arXiv 2404.02657): head/tail-gap weighted forward and reverse KL.

    Per token, sort the teacher's vocabulary by p (descending). The head is the prefix whose cumulative
    teacher probability is <= mu (the teacher's argmax is always in it); the tail is the rest. With the gaps
    g_head = sum_{v in head} |p_v - q_v| and g_tail = sum_{v in tail} |p_v - q_v| (computed without gradient):

        AKL = g_head / (g_head + g_tail) KL(p || q) + g_tail / (g_head + g_tail) KL(q || p)

    Forward KL (which fits the head first) is weighted by the head gap, reverse KL (which fits the tail first)
    by the tail gap. Costs a full-vocabulary sort per token (O(V log V) and an int64 [..., V] index).

    Args:
        mu (keyword): head mass threshold in [0, 1]. Others as ``forward_kl``.

    Returns:
        Scalar: the mean over unmasked tokens of AKL.
    """
    return _tokenwise("akl", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def alpha_divergence(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
                     **params):
    """Amari alpha-divergence, the alpha family of f-DPG (Go et al. 2023), between normalised p and q:

        D_alpha(p || q) = (1 - sum_v p_v^alpha q_v^(1 - alpha)) / (alpha (1 - alpha)),   0 < alpha < 1

    It interpolates between the KLs: alpha -> 1 gives KL(p || q) (forward) and alpha -> 0 gives KL(q || p)
    (reverse); the endpoints are defined as those limits (continuous, unlike ``gjsd``). alpha = 0.5 is
    4 (1 - Bhattacharyya coefficient) = 2 sum_v (sqrt p_v - sqrt q_v)^2, symmetric.

    Args:
        alpha (keyword): in [0, 1]. Others as ``forward_kl``.

    Returns:
        Scalar: the mean over unmasked tokens of D_alpha(p || q).
    """
    return _tokenwise("alpha_divergence", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def bdkd(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
         **params):
    """Balanced-divergence KD, the student loss of BD-KD (Amara et al. 2022, arXiv 2212.12965).

    A per-token (per-sample) mix of forward and reverse KL steered by the entropy gap between the student and
    the teacher (weights computed without gradient):

        w = sigmoid((H(q) - H(p)) / tau),   BDKD = (1 - w) KL(p || q) + w KL(q || p)

    A student flatter than the teacher (H(q) > H(p)) leans on mode-seeking reverse KL, which sharpens it; an
    over-confident student (H(q) < H(p)) leans on mode-covering forward KL, which spreads it. The paper
    describes sample-wise weighting by this entropy gap; the sigmoid form and ``tau`` are this project's
    choice (the paper's exact weighting function was not checked). BD-KD's teacher-side loss (online KD)
    is not part of this function.

    Args:
        tau (keyword): entropy-gap scale in nats, > 0; small tau approaches a hard switch. Others as
            ``forward_kl``.

    Returns:
        Scalar: the mean over unmasked tokens of BDKD.
    """
    return _tokenwise("bdkd", student_logits, teacher_logits, mask, temperature, scale_by_t2, params)


def _sinkhorn_cost(a: torch.Tensor, b: torch.Tensor, epsilon: float, iterations: int, entropic: bool) -> torch.Tensor:
    """OT cost between the uniform empirical measures on the rows of a [N, V] and b [M, V].

    Cost matrix C_ij = ||a_i - b_j||_1 [N, M]. The plan comes from SinKD's Sinkhorn loop (alternately making
    the rows and then the columns of exp(-C / epsilon) sum to 1), run in log space so small epsilon cannot
    underflow; it is then scaled to total mass 1. Returns <plan, C>, plus epsilon KL(plan || 1/(N M)) if entropic.
    """
    n, m = a.shape[0], b.shape[0]
    cost = torch.cdist(a, b, p=1)  # [N, M], each entry in [0, 2]
    log_k = -cost / epsilon  # [N, M]
    for _ in range(iterations):
        log_k = log_k - log_k.logsumexp(dim=1, keepdim=True)  # rows sum to 1
        log_k = log_k - log_k.logsumexp(dim=0, keepdim=True)  # columns sum to 1
    log_plan = log_k - math.log(m)  # [N, M], total mass 1 (each column exactly 1/M)
    plan = log_plan.exp()
    out = (plan * cost).sum()
    if entropic:
        out = out + epsilon * (plan * (log_plan + math.log(n * m))).sum()
    return out


def sinkhorn(student_logits, teacher_logits, mask=None, temperature: float = 1.0, scale_by_t2: bool = False,
             **params):
    """Sinkhorn distillation (SinKD, Cui et al. 2024): optimal transport between the samples of a batch.

    Batch-wise, not token-wise. The samples are the unmasked token positions of the whole call (all leading
    dims flattened, rows with mask != 0 kept): N student distributions q_i and N teacher distributions p_j
    over the vocabulary. The cost matrix is C_ij = ||q_i - p_j||_1 = 2 TVD(q_i, p_j), [N, N]. Starting from
    K = exp(-C / epsilon), ``iterations`` rounds of "rows to sum 1, then columns to sum 1" (SinKD's loop, done
    in log space) give a transport plan pi = K / N between the uniform measures on the two sets of samples.

    - ``debias=False``: the loss is SinKD's <pi, C> (the mean transport cost per sample). It is not 0 when
      q == p, because the entropic plan leaks mass off the diagonal.
    - ``debias=True``: the Sinkhorn divergence of Feydy et al. (2019),
      S = OT(q, p) - (OT(q, q) + OT(p, p)) / 2 with OT = <pi, C> + epsilon KL(pi || 1/N^2), which is 0 when
      q == p and >= 0 (at convergence) because exp(-||x - y||_1 / epsilon) is a positive-definite kernel.
    - ``reduction="sum"`` multiplies by N: SinKD's sum(K * W) scale. SinKD's extra loss weights (e.g. 0.0008)
      and its T = 2 are the caller's to choose.

    Cost: O(N^2 V) time for the L1 cost matrices (O(N^2) memory) and three of them when debiasing; use it on
    batches of at most a few thousand tokens or on top-k-reduced vocabularies.

    Args (the keywords' defaults: ``Sinkhorn`` in :mod:`llm_compress.distill.config`; epsilon's is SinKD's, and
    iterations' that of SinKD's ``sinkhorn_loss``):
        epsilon: entropic regularisation (> 0).
        iterations: Sinkhorn rounds (>= 1).
        debias: subtract the self-transport terms (False is SinKD's loss).
        reduction: "mean" (per-sample cost) or "sum" (times N).
        Others as ``forward_kl``; mask selects the samples (nonzero = kept, values are not weights).

    Returns:
        Scalar transport loss.
    """
    params = resolve_params("sinkhorn", params)
    _check_inputs(student_logits, teacher_logits, mask, temperature)
    vocab = student_logits.shape[-1]
    log_q, log_p = _prep(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), temperature)
    if mask is not None:
        keep = mask.reshape(-1) != 0  # [N_all] -> the N samples
        log_q, log_p = log_q[keep], log_p[keep]
    n = log_q.shape[0]
    if n == 0:
        return (log_q.sum() + log_p.sum()) * 0.0  # nothing to transport; keeps the graph connected
    q, p = log_q.exp(), log_p.exp()  # [N, V]
    eps, iters = params["epsilon"], params["iterations"]
    if params["debias"]:
        loss = _sinkhorn_cost(q, p, eps, iters, True) - 0.5 * (_sinkhorn_cost(q, q, eps, iters, True)
                                                             + _sinkhorn_cost(p, p, eps, iters, True))
    else:
        loss = _sinkhorn_cost(q, p, eps, iters, False)
    if params["reduction"] == "sum":
        loss = loss * n
    return loss * temperature**2 if scale_by_t2 else loss


# ------------------------------------------------------------------ registry

@dataclass(frozen=True)
class Spec:
    """One divergence: its parameters (the model in :mod:`llm_compress.distill.config`, also the recipe's), the
    public function, and the per-token part the plain, chunked and top-k versions share (None: batch-wise)."""

    model: type[BaseModel]
    fn: Callable[..., torch.Tensor]
    per_token: Callable[..., torch.Tensor] | None

    @property
    def tokenwise(self) -> bool:
        return self.per_token is not None


SPECS: dict[str, Spec] = {m.model_fields["name"].default: Spec(m, fn, per_token) for m, fn, per_token in (
    (ForwardKL, forward_kl, _forward_kl_tok), (ReverseKL, reverse_kl, _reverse_kl_tok), (JS, js, _js_tok),
    (GJSD, gjsd, _gjsd_tok), (TVD, tvd, _tvd_tok), (SkewKL, skew_kl, _skew_kl_tok),
    (SkewReverseKL, skew_reverse_kl, _skew_reverse_kl_tok), (AKL, akl, _akl_tok),
    (AlphaDivergence, alpha_divergence, _alpha_divergence_tok), (BDKD, bdkd, _bdkd_tok), (Sinkhorn, sinkhorn, None))}
assert list(SPECS) == list(DIVERGENCE_MODELS)  # the recipe's models (torch-free) are exactly these, in this order
Divergence = Callable[..., torch.Tensor]
DIVERGENCES: dict[str, Divergence] = {name: spec.fn for name, spec in SPECS.items()}
TOKENWISE: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.tokenwise)
