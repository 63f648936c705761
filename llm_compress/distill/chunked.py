"""Memory-bounded distillation losses: token chunking, and a top-k + tail-bucket teacher.

Why: at V = 128k a [tokens, V] float32 tensor is 0.5 GB per 1k tokens, and the plain divergences in
``llm_compress.distill.divergences`` keep several of them alive (log q, log p, p, the products autograd saves) on
top of the logits themselves. Here the loss and its gradient are computed over chunks of ``chunk_tokens``
tokens: while the forward pass runs, each chunk's per-token divergence is evaluated under autograd and
differentiated at once with respect to that chunk's logits, the chunk's gradient is written into one
[tokens, V] buffer (in the logits' dtype) and the chunk's intermediates are freed. The backward pass only
hands that buffer back (scaled by the incoming gradient). Extra memory is therefore the gradient buffer
(which autograd materialises for the logits anyway) plus the intermediates of one chunk, instead of
several full [tokens, V] float32 copies. There is no second forward pass, so the time is that of the plain
version. Values and gradients equal the plain ones up to float32 summation order.

The engine, ``chunked_sums``, sums any number of loss parts over the chunks (the training step uses it for the
divergence and the cross-entropy together, ``llm_compress.distill.step``) and can take hidden states and the lm_head's
weight instead of logits: then each chunk's logits are made, used and freed inside the loop (the lm_head fused
into the loss), and the weight's gradient is accumulated chunk by chunk.

Limits: the backward runs once (no ``retain_graph`` double use) and is not itself differentiable (no
double backward); with gradients disabled (evaluation) no buffer is allocated.

Cached teachers: ``compress_teacher`` turns teacher logits into (top-k ids, top-k log-probs, tail log-prob)
and ``topk_divergence`` computes any token-wise divergence against that compressed teacher; see there for
the approximation.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from llm_compress.distill.divergences import (DIVERGENCES, LOG_FLOOR, TOKENWISE, Divergence, _check_inputs, _prep,
                                              resolve_params, spec_of)
from llm_compress.errors import TrainingError

# chunk_tokens=None picks the chunk from a budget of float32 elements per [chunk, V] intermediate:
# - CPU: 2^22 (16 MiB). glibc serves blocks of up to 32 MiB from its reusable heap once a block that size has
#   been freed, while bigger ones are fresh mmaps whose page faults cost more than the arithmetic; measured at
#   V = 128k, 1k tokens, 2 cores: 32-token chunks ran fwd+bwd in ~0.6x the time of the plain loss, 128-token
#   chunks in ~1.4x.
# - CUDA and others: 2^26 (256 MiB): the caching allocator reuses blocks, so larger chunks mean fewer launches.
CPU_CHUNK_ELEMENTS = 2**22
GPU_CHUNK_ELEMENTS = 2**26


def check_chunk_tokens(chunk_tokens) -> None:
    if chunk_tokens is None:
        return
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise TrainingError(f"chunk_tokens must be None (automatic) or an integer >= 1, got {chunk_tokens!r}")


def auto_chunk_tokens(vocab: int, device: torch.device) -> int:
    """Tokens per chunk so that one [chunk, V] float32 intermediate stays within the device's budget."""
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, budget // max(vocab, 1))


def _tokenwise_spec(name: str):
    spec = spec_of(name)  # unknown name -> TrainingError listing all names
    if not spec.tokenwise:
        raise TrainingError(f"divergence '{name}' is batch-wise and cannot be chunked over tokens; "
                            f"chunkable: {', '.join(TOKENWISE)}")
    return spec


def _rows_and_scale(mask: torch.Tensor | None, n_rows: int, temperature: float, scale_by_t2: bool):
    """(rows, weights, scale) such that loss = scale * sum_{i in rows} weights_i * d_i.

    rows: None (all rows) or int64 [R] indices of the rows with a nonzero mask (the others cannot contribute,
    so they are never computed and get a zero gradient); weights: None or float32 [N]; scale: 1 / (number of
    tokens or sum of the mask, at least 1), times T^2 if asked.
    """
    t2 = temperature**2 if scale_by_t2 else 1.0
    if mask is None:
        return None, None, t2 / max(n_rows, 1)
    weights = mask.reshape(-1).to(torch.float32)  # [N]
    rows = weights.nonzero().squeeze(1)  # [R]
    denom = max(float(weights.sum()), 1.0)
    if rows.numel() == n_rows:
        rows = None  # every row counts: slice instead of gather
    return rows, weights, t2 / denom


class _ChunkedSums(torch.autograd.Function):
    """Loss parts summed over chunks of rows, each chunk's gradient taken in the forward pass (see chunked_sums)."""

    @staticmethod
    def forward(ctx, fn, coefs, rows, chunk_tokens, x, weight, bias, *row_inputs):
        inputs = (x, weight, bias, *row_inputs)
        grads = []
        for i, (t, need) in enumerate(zip(inputs, ctx.needs_input_grad[4:])):
            if not need:
                grads.append(None)
            elif i in (1, 2):  # the lm_head's weight and bias: every chunk adds to them, in float32 at least
                grads.append(torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)))
            else:  # row inputs: each chunk writes its rows; masked-out rows are never written, so they start at zero
                grads.append(torch.zeros_like(t) if rows is not None else torch.empty_like(t))
        total, parts = _loop(fn, coefs, rows, chunk_tokens, inputs, grads)
        ctx.grads = [g if g is None or g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, inputs)]
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, grad_parts):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("a chunked loss's backward can run only once (it hands over its gradient buffers); "
                               "recompute the loss instead of using retain_graph")
        ctx.grads = None  # drop our reference: autograd may then take the buffers over without a copy
        if not bool(grad_total == 1):
            for g in grads:
                if g is not None:
                    g.mul_(grad_total.to(g.dtype))  # in place: no second [N, V] buffer
        return (None, None, None, None, *grads)


def _put(buf: torch.Tensor | None, where, g: torch.Tensor | None) -> None:
    """Write a chunk's gradient g into rows ``where`` (a slice or int64 indices) of buf; None = zero gradient."""
    if buf is None:
        return
    if isinstance(where, slice):
        if g is None:
            buf[where].zero_()
        else:
            buf[where] = g
    elif g is not None:  # gathered rows: the buffer started at zero
        buf.index_copy_(0, where, g.to(buf.dtype))


def _loop(fn, coefs, rows, chunk_tokens, inputs, grads):
    """Run fn over the chunks; fill ``grads`` (where not None); return (total, parts), both detached."""
    x, weight, bias, *others = inputs
    gx, gw, gb, *g_others = grads
    want_logits = any(g is not None for g in (gx, gw, gb))
    want_others = [g is not None for g in g_others]
    n = x.shape[0] if rows is None else rows.numel()
    sums = torch.zeros(len(coefs), dtype=torch.float64, device=x.device)  # [parts]
    for start in range(0, n, chunk_tokens):
        if rows is None:
            where = slice(start, start + chunk_tokens)
            x_c, *o_c = [t[where].detach() for t in (x, *others)]  # views, [n, ...]
        else:
            where = rows[start:start + chunk_tokens]  # [n]
            x_c, *o_c = [t.detach().index_select(0, where) for t in (x, *others)]  # copies of this chunk only
        if weight is None:
            logits = x_c  # [n, V]
        else:  # the lm_head, fused: only this chunk's logits ever exist
            with torch.no_grad():
                logits = F.linear(x_c, weight.detach(), None if bias is None else bias.detach())  # [n, V]
        if not (want_logits or any(want_others)):
            with torch.no_grad():
                parts = fn(logits, *o_c)
        else:
            logits = logits.requires_grad_() if want_logits else logits
            o_c = [o.requires_grad_() if want else o for o, want in zip(o_c, want_others)]
            with torch.enable_grad():
                parts = fn(logits, *o_c)
                terms = [c * p for c, p in zip(coefs, parts) if c != 0 and p.requires_grad]
                objective = sum(terms) if terms else None  # sum_j coef_j part_j of this chunk
            diff = ([logits] if want_logits else []) + [o for o, want in zip(o_c, want_others) if want]
            got = iter(torch.autograd.grad(objective, diff, allow_unused=True) if terms else [None] * len(diff))
            if want_logits:
                g = next(got)  # [n, V] d(sum_j coef_j part_j) / d logits
                if weight is None:
                    _put(gx, where, g)
                elif g is None:
                    _put(gx, where, None)
                else:  # the lm_head's backward by hand: logits = x W^T + b
                    _put(gx, where, g.to(weight.dtype) @ weight.detach())  # [n, D]
                    if gw is not None:
                        gw.addmm_(g.t().to(gw.dtype), x_c.to(gw.dtype))  # [V, D] += [V, n] @ [n, D]
                    if gb is not None:
                        gb.add_(g.sum(0).to(gb.dtype))  # [V]
            for buf, want in zip(g_others, want_others):
                if want:
                    _put(buf, where, next(got))
        sums += torch.stack([p.detach().double() for p in parts])
        del parts, logits, x_c, o_c  # free this chunk's graph before the next one
    dtype = torch.promote_types(x.dtype, torch.float32)
    total = sum(float(c) * s for c, s in zip(coefs, sums))
    return torch.as_tensor(total, dtype=torch.float64, device=x.device).to(dtype), sums.to(dtype)


def chunked_sums(fn: Callable[..., tuple[torch.Tensor, ...]], coefs: tuple[float, ...], x: torch.Tensor,
                 *row_inputs: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 rows: torch.Tensor | None = None, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss parts that are sums over rows (tokens), computed ``chunk_tokens`` rows at a time with bounded memory.

    For each chunk of rows, ``fn(logits_c, *row_chunks)`` returns one scalar per part (that chunk's share, already
    weighted and scaled); part j is the sum of its shares over the chunks and the loss is sum_j coefs[j] part_j.
    While the forward pass runs, each chunk's loss is differentiated at once and its gradient kept in buffers,
    so the backward pass only hands them over (scaled by the incoming gradient).

    Args:
        fn: (logits_c [n, V], *row_chunks) -> tuple of scalar tensors, one per part. A part whose coefficient
            is 0 is only reported: fn should compute it without gradient.
        coefs: the parts' weights in the loss.
        x: [N, D]: the logits (``head`` None, D = V), or hidden states with ``head`` = (weight [V, D], bias [V]
            or None): then each chunk's logits are x_c @ weight^T + bias, made and freed chunk by chunk (the
            lm_head fused into the loss), and the gradients for x, weight and bias follow by the chain rule.
        row_inputs: tensors [N, ...] sliced like x (targets, weights, teacher logits, ...); they may require grad.
        rows: None (every row) or int64 [R]: the only rows computed (the others get a zero gradient).
        chunk_tokens: rows per chunk (>= 1).

    Returns:
        (loss, parts): the loss (differentiable with respect to every input that requires grad) and the
        parts [len(coefs)] (detached), in x's dtype promoted to float32.

    Extra memory: a gradient buffer per differentiable input (the weight's and bias's in float32 at least)
    plus one chunk's intermediates. Limits: the backward runs once (no ``retain_graph`` reuse) and is not
    itself differentiable; with gradients disabled (evaluation) no buffer is allocated.
    """
    weight, bias = head if head is not None else (None, None)
    inputs = (x, weight, bias, *row_inputs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _ChunkedSums.apply(fn, tuple(coefs), rows, chunk_tokens, *inputs)
    return _loop(fn, tuple(coefs), rows, chunk_tokens, inputs, [None] * len(inputs))


def _weighted_sum(per_token: torch.Tensor, scale: float, *weights: torch.Tensor) -> torch.Tensor:
    """scale * sum_i w_i per_token_i over a chunk [n]; ``weights`` is () (all 1) or one [n] tensor."""
    return (per_token * weights[0] if weights else per_token).sum() * scale


def chunked_divergence(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       mask: torch.Tensor | None = None, temperature: float = 1.0, scale_by_t2: bool = False, *,
                       chunk_tokens: int | None = None, **params) -> torch.Tensor:
    """A token-wise divergence computed over chunks of tokens, with bounded extra memory.

    Same value and gradient (up to float32 summation order) as ``DIVERGENCES[name](student_logits,
    teacher_logits, mask, temperature, scale_by_t2, **params)``; gradients flow to the student logits and, if
    they require grad, to the teacher logits. Peak extra memory: one gradient buffer per differentiable input
    (shape and dtype of the logits) plus the float32 intermediates of ``chunk_tokens`` tokens
    (about 6-10 x chunk x V x 4 bytes, more for akl's sort).

    Args:
        name: a token-wise divergence (every registered one except sinkhorn).
        student_logits: [..., V]; teacher_logits: [..., V]; mask: optional [...] (1 = counts).
        temperature, scale_by_t2, params: as for the plain divergence.
        chunk_tokens: tokens per chunk (>= 1); None picks it from the vocabulary and device
            (``auto_chunk_tokens``: 32 tokens at V = 128k on CPU, 524 on GPU).

    Returns:
        Scalar loss.
    """
    spec = _tokenwise_spec(name)
    params = resolve_params(name, params)
    check_chunk_tokens(chunk_tokens)
    _check_inputs(student_logits, teacher_logits, mask, temperature)
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)  # [N, V], a view for contiguous logits
    t = teacher_logits.reshape(-1, vocab)  # [N, V]
    rows, weights, scale = _rows_and_scale(mask, s.shape[0], temperature, scale_by_t2)
    chunk = auto_chunk_tokens(vocab, s.device) if chunk_tokens is None else chunk_tokens

    def per_chunk(s_c, t_c, *w_c):  # [n, V], [n, V], optional weights [n] -> (scalar,)
        log_q, log_p = _prep(s_c, t_c, temperature)
        return (_weighted_sum(spec.per_token(log_q, log_p, **params), scale, *w_c),)

    extra = () if weights is None else (weights,)
    return chunked_sums(per_chunk, (1.0,), s, t, *extra, rows=rows, chunk_tokens=chunk)[0]


def get_divergence(name: str, *, chunked: bool = False, chunk_tokens: int | None = None, **params) -> Divergence:
    """The divergence ``name`` as ``fn(student_logits, teacher_logits, mask=None, temperature=1.0, scale_by_t2=False)``.

    With no keywords this is the registered function itself, ``DIVERGENCES[name]`` (its parameters can still be
    passed per call). ``params`` (e.g. ``beta=0.9``) are checked now and bound. ``chunked=True`` (or an explicit
    ``chunk_tokens``) returns the memory-bounded ``chunked_divergence`` with ``chunk_tokens`` tokens per chunk
    (None: chosen from the vocabulary size and device).

    Raises:
        TrainingError: unknown name (the message lists the available ones), unknown or out-of-range
            parameter, bad chunk_tokens, or chunking asked for the batch-wise sinkhorn.
    """
    spec_of(name)  # unknown name -> TrainingError listing all names
    fn = DIVERGENCES[name]
    chunked = chunked or chunk_tokens is not None
    if not chunked and not params:
        return fn
    bound = resolve_params(name, params)
    if not chunked:
        def with_params(student_logits, teacher_logits, mask=None, temperature=1.0, scale_by_t2=False):
            return fn(student_logits, teacher_logits, mask, temperature, scale_by_t2, **bound)
        return with_params
    check_chunk_tokens(chunk_tokens)
    _tokenwise_spec(name)

    def chunked_fn(student_logits, teacher_logits, mask=None, temperature=1.0, scale_by_t2=False):
        return chunked_divergence(name, student_logits, teacher_logits, mask, temperature, scale_by_t2,
                                  chunk_tokens=chunk_tokens, **bound)
    return chunked_fn


# ------------------------------------------------------------------ top-k + tail-bucket teacher

class CompressedTeacher(NamedTuple):
    """A teacher distribution kept as its top k tokens plus one bucket for the rest.

    topk_ids: int64 [..., k] the teacher's k most likely token ids (descending probability).
    topk_logprobs: float32 [..., k] their log-probabilities log p_v under the full softmax (not renormalised).
    tail_logprob: float32 [...] log of the remaining mass, log sum_{v not in top-k} p_v (-inf when k = V).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logprob: torch.Tensor


def compress_teacher(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                     chunk_tokens: int | None = None) -> CompressedTeacher:
    """Compress teacher logits [..., V] to (top-k ids, top-k log-probs, tail log-prob) for caching.

    p = softmax(teacher_logits / temperature); the temperature is baked in, so pass the same one to
    ``topk_divergence``. Storage per token: k x (8 + 4) + 4 bytes instead of V x 2 (bf16) bytes. Computed in
    chunks of ``chunk_tokens`` tokens without gradient. The tail mass is a log-sum-exp over the tokens outside
    the top k, not log(1 - sum top-k), so it keeps its precision when the tail is tiny.

    Returns:
        CompressedTeacher with shapes [..., k], [..., k], [...].
    """
    if teacher_logits.dim() < 1 or not teacher_logits.is_floating_point():
        raise TrainingError(f"teacher logits must be a floating [..., V] tensor, got {teacher_logits.dtype} "
                            f"{tuple(teacher_logits.shape)}")
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise TrainingError(f"top-k: k must be an integer in [1, V = {vocab}], got {k!r}")
    _check_inputs(teacher_logits, teacher_logits, None, temperature)
    check_chunk_tokens(chunk_tokens)
    lead = teacher_logits.shape[:-1]
    t = teacher_logits.reshape(-1, vocab)  # [N, V]
    chunk = auto_chunk_tokens(vocab, t.device) if chunk_tokens is None else chunk_tokens
    ids = torch.empty(t.shape[0], k, dtype=torch.int64, device=t.device)  # [N, k]
    logprobs = torch.empty(t.shape[0], k, dtype=torch.float32, device=t.device)  # [N, k]
    tail = torch.empty(t.shape[0], dtype=torch.float32, device=t.device)  # [N]
    with torch.no_grad():
        for start in range(0, t.shape[0], chunk):
            sel = slice(start, start + chunk)
            x = t[sel].float()
            log_p = F.log_softmax(x / temperature if temperature != 1 else x, dim=-1)  # [n, V]
            vals, idx = log_p.topk(k, dim=-1)  # [n, k] each, descending
            ids[sel], logprobs[sel] = idx, vals
            tail[sel] = log_p.scatter_(-1, idx, float("-inf")).logsumexp(-1)  # mass outside the top k, [n]
    return CompressedTeacher(ids.reshape(*lead, k), logprobs.reshape(*lead, k), tail.reshape(lead))


def _check_compressed(student_logits: torch.Tensor, teacher: CompressedTeacher) -> CompressedTeacher:
    if not isinstance(teacher, tuple) or len(teacher) != 3 or not all(isinstance(x, torch.Tensor) for x in teacher):
        raise TrainingError("the compressed teacher must be (topk_ids, topk_logprobs, tail_logprob) tensors, "
                            "as returned by compress_teacher")
    ids, logprobs, tail = teacher
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if ids.dim() < 1 or tuple(ids.shape[:-1]) != lead:
        raise TrainingError(f"topk_ids {tuple(ids.shape)} must be [..., k] with the student logits' leading shape "
                            f"{lead}")
    if tuple(logprobs.shape) != tuple(ids.shape) or tuple(tail.shape) != lead:
        raise TrainingError(f"topk_logprobs {tuple(logprobs.shape)} must match topk_ids {tuple(ids.shape)} and "
                            f"tail_logprob {tuple(tail.shape)} must be {lead}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TrainingError(f"topk_ids must be an integer tensor, got {ids.dtype}")
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise TrainingError(f"top-k: k = {k} must be in [1, V = {vocab}]")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise TrainingError(f"topk_ids hold ids outside [0, {vocab}): teacher and student vocabularies differ?")
    return CompressedTeacher(ids.long(), logprobs, tail)


def topk_divergence(name: str, student_logits: torch.Tensor, teacher: CompressedTeacher,
                    mask: torch.Tensor | None = None, temperature: float = 1.0, scale_by_t2: bool = False, *,
                    chunk_tokens: int | None = None, **params) -> torch.Tensor:
    """A token-wise divergence against a compressed (top-k + tail bucket) teacher, in token chunks.

    The approximation: both distributions are coarse-grained onto the same k + 1 classes, the teacher's
    top-k tokens S plus one bucket for everything else,

        P = (p_v for v in S, p_tail = sum_{v not in S} p_v),   Q = (q_v for v in S, q_tail = sum_{v not in S} q_v),

    and the divergence is computed exactly between P and Q (q is the student's full softmax, so q_tail is
    the student's true mass outside S). Nothing is renormalised, so both are proper distributions.

    - k = V: P = p and Q = q, the exact loss.
    - forward_kl: KL(P || Q) = KL(p || q) - p_tail KL(p(. | tail) || q(. | tail)), i.e. it drops only the
      mismatch of the shapes inside the tail, weighted by the tail mass; the error is <= p_tail times that.
    - every f-divergence here (forward/reverse KL, js, gjsd, tvd, skew KLs, alpha_divergence) can only shrink
      under this merging (data processing), so the approximation is a lower bound, exact when q is
      proportional to p inside the tail.
    - akl and bdkd are computed from P and Q too (head/tail gaps and entropies of the bucketed distributions):
      a heuristic approximation, without the bound.

    Args:
        name: a token-wise divergence.
        student_logits: [..., V] student logits (differentiable).
        teacher: ``CompressedTeacher`` (or a 3-tuple) from ``compress_teacher`` at the same temperature.
        mask, temperature, scale_by_t2, params: as for the plain divergence (temperature applies to the
            student; the teacher's was fixed when it was compressed).
        chunk_tokens: tokens per chunk (>= 1, None = ``auto_chunk_tokens``); each chunk holds a few
            [chunk, V] float32 student tensors.

    Returns:
        Scalar loss.
    """
    spec = _tokenwise_spec(name)
    params = resolve_params(name, params)
    check_chunk_tokens(chunk_tokens)
    _check_inputs(student_logits, student_logits, mask, temperature)
    ids, logprobs, tail = _check_compressed(student_logits, teacher)
    vocab, k = student_logits.shape[-1], ids.shape[-1]
    s = student_logits.reshape(-1, vocab)  # [N, V]
    ids, logprobs, tail = ids.reshape(-1, k), logprobs.reshape(-1, k), tail.reshape(-1)  # [N, k], [N, k], [N]
    rows, weights, scale = _rows_and_scale(mask, s.shape[0], temperature, scale_by_t2)
    chunk = auto_chunk_tokens(vocab, s.device) if chunk_tokens is None else chunk_tokens

    def per_chunk(s_c, ids_c, lp_c, tail_c, *w_c):  # [n, V], [n, k], [n, k], [n], optional [n] -> (scalar,)
        log_q = log_probs(s_c, temperature)  # [n, V]
        return (_weighted_sum(topk_per_token(spec, log_q, ids_c, lp_c, tail_c, params), scale, *w_c),)

    extra = () if weights is None else (weights,)
    return chunked_sums(per_chunk, (1.0,), s, ids, logprobs, tail, *extra, rows=rows, chunk_tokens=chunk)[0]


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) over the last dim, in float32 at least: [n, V] -> [n, V]."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(x / temperature if temperature != 1 else x, dim=-1)


def topk_per_token(spec, log_q: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
                   params: dict) -> torch.Tensor:
    """Per-token divergence [n] between the student's log-probs log_q [n, V] and a compressed teacher chunk
    (ids [n, k], log-probs [n, k], tail [n]), both coarse-grained to the teacher's top k + one tail bucket."""
    k, vocab = ids.shape[-1], log_q.shape[-1]
    log_q_top = log_q.gather(-1, ids)  # [n, k]
    log_p_top = logprobs.to(log_q.dtype)
    if k == vocab:  # no tail: the exact distributions (in the teacher's order)
        return spec.per_token(log_q_top, log_p_top.clamp_min(LOG_FLOOR), **params)
    log_q_tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # [n, 1]
    log_q_b = torch.cat([log_q_top, log_q_tail], dim=-1)  # [n, k + 1]
    log_p_b = torch.cat([log_p_top, tail.to(log_q.dtype)[:, None]], dim=-1).clamp_min(LOG_FLOOR)  # [n, k + 1]
    return spec.per_token(log_q_b, log_p_b, **params)


__all__ = ["auto_chunk_tokens", "CompressedTeacher", "check_chunk_tokens", "chunked_divergence",
           "compress_teacher", "get_divergence", "topk_divergence"]
