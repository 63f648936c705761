"""One batch's loss for training and held-out evaluation: KD + next-token cross-entropy, three ways.

``StepLoss(cfg, student, teacher)(ids)`` gives (total, kd, ce) for token ids [B, T], with
total = (1 - ce_weight) KD + ce_weight CE, by one of three paths that agree up to float32 summation order:

- plain: the student's logits [B, T, V] and the teacher's, the divergence over all tokens at once
  (``llm_compress.distill.divergences``) and ``F.cross_entropy``. For small vocabularies, ``distill.chunk: never``,
  and the batch-wise sinkhorn (its loss couples all the batch's tokens).
- chunked: the model still makes the student's logits [B, T, V], but the divergence and the CE are computed
  together over chunks of tokens, each chunk differentiated at once (``chunked.chunked_sums``): the only
  [tokens, V] tensors are the logits and their gradient buffer, no float32 copies.
- fused: the student's lm_head is fused into the chunked loss, as Liger-Kernel's fused linear losses do. The
  decoder gives hidden states [B, T, H]; per chunk of n tokens the logits [n, V] = h W^T (+ b) are made, the
  loss and its gradients for h, W and b taken, and the chunk's logits freed, so no [tokens, V] tensor ever
  exists. The teacher's lm_head is fused the same way when it allows it (else its logits are made whole).

Why: at V = 128k and 4k tokens one float32 [tokens, V] tensor is 2 GiB, and the plain step holds the logits,
their gradient, the teacher's logits, a float32 copy for the CE and several divergence intermediates; the
loss, not the model, sets the step's peak memory (bench/RESULTS.md, "Distillation step memory").

The fused path needs model(ids).logits == lm_head(decoder(ids).last_hidden_state): ``fused_head`` checks the
structure (a Linear lm_head, no logit soft-capping or scaling, a transformers-style forward that takes
``logits_to_keep``) and then compares both on a 16-token probe. A student that fails gets the chunked path,
with a warning naming the reason.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F

from llm_compress.distill.chunked import (CompressedTeacher, _rows_and_scale, _weighted_sum, auto_chunk_tokens,
                                          check_chunk_tokens, chunked_sums, log_probs, topk_divergence, topk_per_token)
from llm_compress.distill.config import DistillConfig, divergence_params
from llm_compress.distill.divergences import DIVERGENCES, LOG_FLOOR, spec_of
from llm_compress.errors import TrainingError

CHUNK_MIN_VOCAB = 32_768  # distill.chunk: auto chunks the loss from this vocabulary size up
PATHS = ("plain", "chunked", "fused")


def _autocast(device: torch.device, dtype: torch.dtype | None = None):
    """Autocast to ``dtype`` (mixed precision over float32 master weights); None: bfloat16 on a CUDA device that
    supports it (Ampere and later), else off: float16 without a gradient scaler could underflow, so a float32
    model on an older GPU trains in float32."""
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def vocab_size(model) -> int:
    """The number of logits the model makes per token (its lm_head's rows)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


@torch.no_grad()
def fused_head(model):
    """(decoder, lm_head weight [V, H], lm_head bias [V] or None) if ``model(input_ids=ids).logits`` is
    ``lm_head(decoder(input_ids=ids).last_hidden_state)``; otherwise a string saying why not.

    Checked from the structure (a Linear lm_head; no Gemma-2 style logit soft-capping, no Cohere/Granite style
    logit scaling; a forward taking ``logits_to_keep``, i.e. one that projects the decoder's last hidden state,
    final norm included, and nothing else) and then numerically on a 16-token probe in eval mode.
    """
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return "its logits are soft-capped (config.final_logit_softcapping)"
    for key in ("logit_scale", "logits_scaling"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            return f"its logits are scaled (config.{key} = {getattr(cfg, key)})"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return f"its output embeddings are {type(head).__name__}, not a Linear lm_head"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "its forward takes no logits_to_keep (not a transformers causal LM projecting its last hidden state)"
    try:
        decoder = model.get_decoder()
    except Exception as e:  # transformers raises for models without a known decoder attribute
        return f"no decoder to take hidden states from ({type(e).__name__})"
    if decoder is None or decoder is model:
        return "no decoder separate from the lm_head (get_decoder)"
    was_training = model.training
    model.eval()  # no dropout: both passes must see the same network
    try:
        device = head.weight.device
        probe = (torch.arange(16, device=device) % head.weight.shape[0])[None]  # [1, 16]
        with _autocast(device):
            full = model(input_ids=probe).logits.float()  # [1, 16, V]
            hidden = decoder(input_ids=probe).last_hidden_state  # [1, 16, H]
            fused = F.linear(hidden, head.weight, head.bias).float()
    except Exception as e:
        return f"the decoder's hidden states could not be taken ({type(e).__name__}: {str(e)[:120]})"
    finally:
        model.train(was_training)
    scale = 1.0 + float(full.abs().max())
    if fused.shape != full.shape or not torch.allclose(fused, full, rtol=1e-4, atol=1e-5 * scale):
        return "its logits are not lm_head(decoder(ids).last_hidden_state) (checked on a probe)"
    return decoder, head.weight, head.bias


def _wanted_path(cfg: DistillConfig, vocab: int) -> str:
    """plain or fused, from the config and the vocabulary alone (fused may still be refused by the model)."""
    chunk = cfg.chunk == "always" or (cfg.chunk == "auto" and vocab >= CHUNK_MIN_VOCAB)
    return "fused" if chunk and spec_of(cfg.divergence.name).tokenwise else "plain"


def loss_path(cfg: DistillConfig, student) -> tuple[str, str]:
    """(path, note): the path ``StepLoss`` takes for this config and student, and why fused was refused ("" if not)."""
    path = _wanted_path(cfg, vocab_size(student))
    reason = fused_head(student) if path == "fused" else None
    return ("chunked", reason) if isinstance(reason, str) else (path, "")


class StepLoss:
    """(total, kd, ce) of a batch for one student, teacher and config, by the plain, chunked or fused path.

    Args:
        cfg: the divergence and its parameters, temperature, ce_weight and chunk (auto | always | never).
        student: a causal LM (``model(input_ids=ids).logits``), on ``device``.
        teacher: a causal LM, or None: then only a cached top-k teacher passed per call, or CE alone.
        device: where batches live (bf16 autocast on CUDA).
        amp_dtype: autocast to this dtype on any device (a low-precision run over float32 master weights,
            see ``trainer.train``); None: bf16 autocast on CUDA only.
        compile: ``torch.compile`` the student's forward (its decoder on the fused path).
        path: force "plain", "chunked" or "fused" (tests, benchmarks); None chooses: plain when the vocabulary
            is under CHUNK_MIN_VOCAB with chunk auto, with chunk never, or for sinkhorn; else fused when
            ``fused_head`` allows it, chunked (with a warning) when it does not.
        chunk_tokens: tokens per chunk; None: ``auto_chunk_tokens`` for the vocabulary and device.

    Attributes: ``path`` (the one taken) and ``note`` (why fused was refused, else "").
    """

    def __init__(self, cfg: DistillConfig, student, teacher=None, *, device: torch.device,
                 compile: bool = False, path: str | None = None, chunk_tokens: int | None = None,
                 amp_dtype: torch.dtype | None = None):
        if path is not None and path not in PATHS:
            raise TrainingError(f"loss path must be one of {', '.join(PATHS)}, got {path!r}")
        self.cfg, self.teacher, self.device, self.amp_dtype = cfg, teacher, device, amp_dtype
        self.name, self.params = cfg.divergence.name, divergence_params(cfg.divergence)
        self.vocab = vocab_size(student)
        self.path, self.note = path or _wanted_path(cfg, self.vocab), ""
        # the fused lm_heads, as modules: their weight and bias are read at each call, because FSDP swaps a module's
        # parameters (sharded between forwards, whole inside one) and a tensor kept from here would go stale
        self._head = self._t_head = None
        forward, self.t_forward = student, teacher
        if self.path == "fused":
            fused = fused_head(student)
            if isinstance(fused, str):
                if path == "fused":
                    raise TrainingError(f"the fused loss cannot be used for {type(student).__name__}: {fused}")
                warnings.warn(f"distill: no fused lm_head loss for {type(student).__name__} ({fused}); the loss is "
                              "chunked over the model's logits instead", stacklevel=2)
                self.path, self.note = "chunked", fused
            else:
                forward = fused[0]
                self._head = student.get_output_embeddings()
        if self.path != "plain" and teacher is not None:
            fused = fused_head(teacher)
            if not isinstance(fused, str):  # else the teacher's logits are made whole, without gradient
                self.t_forward = fused[0]
                self._t_head = teacher.get_output_embeddings()
        self.forward = torch.compile(forward) if compile else forward  # shares the parameters
        check_chunk_tokens(chunk_tokens)
        self.chunk_tokens = chunk_tokens or auto_chunk_tokens(self.vocab, device)

    @property
    def head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight [V, H], bias [V] or None) of the student's fused lm_head, or None off the fused path."""
        return (self._head.weight, self._head.bias) if self._head is not None else None

    @property
    def t_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of the teacher's fused lm_head, or None when its logits are made whole."""
        return (self._t_head.weight, self._t_head.bias) if self._t_head is not None else None

    def __call__(self, ids: torch.Tensor, *, topk: CompressedTeacher | None = None, mask: torch.Tensor | None = None,
                 ce_reduction: str = "mean"):
        """(total, kd, ce) for token ids [B, T].

        The teacher signal is ``topk`` (cached top-k rows [B, T, k] of this batch) if given, else the teacher
        run on ``ids``, else none: then total = ce and kd is None. ``mask`` [B, T] marks the positions the
        divergence covers (on-policy batches); there the CE is not computed (ce None: its targets are the
        student's own samples) and total = (1 - ce_weight) kd. Otherwise total = (1 - ce_weight) kd +
        ce_weight ce. kd: mean over the (masked) positions; ce: mean over the B (T - 1) next-token targets,
        or their sum with ce_reduction="sum". A term with weight 0 is computed (and reported) without gradient.
        """
        has_kd = topk is not None or self.teacher is not None
        w = self.cfg.ce_weight
        if self.path == "plain":
            return self._plain(ids, topk, mask, has_kd, w, ce_reduction)
        kd_coef = 1.0 - w if has_kd else 0.0
        ce_coef = 0.0 if mask is not None and has_kd else (w if has_kd else 1.0)
        with _autocast(self.device, self.amp_dtype):
            total, parts = self._chunked(ids, topk, mask, has_kd, kd_coef, ce_coef, ce_reduction)
        kd = parts[0] if has_kd else None
        ce = parts[1] if mask is None or not has_kd else None
        return total, kd, ce

    def _plain(self, ids, topk, mask, has_kd, w, ce_reduction):
        with _autocast(self.device, self.amp_dtype):
            logits = self.forward(input_ids=ids).logits  # [B, T, V]
        ce = None
        if mask is None or not has_kd:
            # next-token cross-entropy: position t predicts token t+1; no graph when it has no weight
            with torch.set_grad_enabled(torch.is_grad_enabled() and (not has_kd or w > 0)):
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=ce_reduction)
        if not has_kd:
            return ce, None, ce
        if topk is not None:
            kd = topk_divergence(self.name, logits, topk, mask=mask, temperature=self.cfg.temperature, **self.params)
        else:
            with torch.no_grad(), _autocast(self.device, self.amp_dtype):
                t_logits = self.teacher(input_ids=ids).logits  # [B, T, V]
            kd = DIVERGENCES[self.name](logits, t_logits, mask, self.cfg.temperature, **self.params)
            del t_logits  # free before backward: the student's activations dominate peak memory
        if mask is not None:
            return (1.0 - w) * kd, kd, None
        return (1.0 - w) * kd + w * ce, kd, ce

    def _chunked(self, ids, topk, mask, has_kd, kd_coef, ce_coef, ce_reduction):
        """(total, parts = [kd, ce]) over token chunks; the student's logits only per chunk on the fused path."""
        n_rows = ids.numel()
        out = self.forward(input_ids=ids, use_cache=False)
        x = (out.last_hidden_state if self.head else out.logits).reshape(n_rows, -1)  # [N, H] or [N, V]
        del out
        teacher_rows: tuple = ()
        if topk is not None:
            k = topk.topk_ids.shape[-1]
            teacher_rows = (topk.topk_ids.reshape(n_rows, k), topk.topk_logprobs.reshape(n_rows, k),
                            topk.tail_logprob.reshape(n_rows))
        elif self.teacher is not None:
            with torch.no_grad():
                t_out = self.t_forward(input_ids=ids, use_cache=False)
                teacher_rows = ((t_out.last_hidden_state if self.t_head else t_out.logits).reshape(n_rows, -1),)
            del t_out
        rows, weights, kd_scale = _rows_and_scale(mask if has_kd else None, n_rows, self.cfg.temperature, False)
        row_inputs: list[torch.Tensor] = []
        with_ce = ce_coef != 0 or mask is None or not has_kd
        if with_ce:
            # next-token targets [N]: position t of a row predicts token t+1; its last position predicts nothing
            targets = torch.full_like(ids, -100)
            targets[:, :-1] = ids[:, 1:]
            row_inputs.append(targets.reshape(n_rows))
        if weights is not None:
            row_inputs.append(weights)
        ce_scale = 1.0 / max(n_rows - len(ids), 1) if ce_reduction == "mean" else 1.0
        grad = torch.is_grad_enabled()
        temperature = self.cfg.temperature

        def per_chunk(s_c, *rest):  # student logits [n, V], then the row inputs' chunks -> (kd share, ce share)
            rest = list(rest)
            tgt_c = rest.pop(0) if with_ce else None
            w_c = [rest.pop(0)] if weights is not None else []
            zero = s_c.new_zeros((), dtype=torch.promote_types(s_c.dtype, torch.float32))
            kd_part, ce_part, log_q = zero, zero, None
            if has_kd:
                with torch.set_grad_enabled(grad and kd_coef != 0):
                    log_q = log_probs(s_c, temperature)  # [n, V]
                    kd_part = _weighted_sum(self._kd_per_token(log_q, rest), kd_scale, *w_c)
            if with_ce:
                ce_grad = grad and ce_coef != 0
                with torch.set_grad_enabled(ce_grad):
                    reuse = log_q is not None and temperature == 1 and (log_q.requires_grad or not ce_grad)
                    log_q1 = log_q if reuse else log_probs(s_c, 1.0)  # [n, V] at T = 1
                    valid = tgt_c >= 0  # [n]
                    nll = -log_q1.gather(-1, tgt_c.clamp_min(0)[:, None]).squeeze(1)  # [n]
                    ce_part = torch.where(valid, nll, 0.0).sum() * ce_scale
            return kd_part, ce_part

        return chunked_sums(per_chunk, (kd_coef, ce_coef), x, *row_inputs, *teacher_rows, head=self.head, rows=rows,
                            chunk_tokens=self.chunk_tokens)

    def _kd_per_token(self, log_q: torch.Tensor, teacher_c: list[torch.Tensor]) -> torch.Tensor:
        """The divergence [n] between the student's log-probs log_q [n, V] and this chunk's teacher signal."""
        spec = spec_of(self.name)
        if len(teacher_c) == 3:  # cached top-k ids, log-probs and tail
            return topk_per_token(spec, log_q, *teacher_c, self.params)
        t = teacher_c[0]  # [n, V] logits, or [n, H] hidden states for the fused teacher head
        with torch.no_grad():
            if self.t_head:
                t = F.linear(t, *self.t_head)  # [n, V]
            log_p = log_probs(t, self.cfg.temperature).clamp_min_(LOG_FLOOR)  # floored as in _prep
        return spec.per_token(log_q, log_p, **self.params)
