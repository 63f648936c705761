"""The plain loop every gradient unlearning method runs (SHRED and the baselines), and the token log-likelihoods
they share.

A method is a :class:`LossUnlearner`: one loss signature, ``loss(model, batch) -> scalar``, and an optional hook
``prepare(model, data)`` that sees the frozen original model once before training (to precompute targets or
reference log-probs). The loop, nanoGPT-plain:

    for step in 1..steps:   batch = the next batch_size forget records (+ batch_size general rows if needs_retain)
                            loss = method.loss(model, batch); backward; clip to max_grad_norm; AdamW step

AdamW (weight decay 0) at a constant ``lr``. Records are drawn by cycling through one permutation of the forget set
(retain rows: one permutation of ``data.general``), both from a ``torch.Generator`` seeded with ``seed``.

Precision: a bfloat16 / float16 model trains the way the distillation trainer does: its trainable parameters become
float32 master weights (``llm_compress.distill.trainer.master_weights``; at lr 1e-4 most AdamW updates of a bf16 weight
would round to zero), the forward passes autocast to its dtype (float16 with a gradient scaler), and the weights are
cast back at the end. Log-probs and losses are fp32.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm_compress.distill.trainer import master_weights
from llm_compress.errors import TrainingError
from llm_compress.progress import report as report_progress
from llm_compress.unlearn.base import Batch, UnlearnData, Unlearner, token_logp
from llm_compress.unlearn.data import ForgetSet


def mean_span_nll(logits: torch.Tensor, fs: ForgetSet) -> torch.Tensor:
    """Mean NLL over all span tokens of the batch (each token weighs the same) -> scalar."""
    return -torch.where(fs.span, token_logp(logits, fs.ids), 0.0).sum() / fs.span.sum().clamp_min(1)


def retain_nll(model, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of general rows [B, T] (no padding) -> scalar."""
    logits = model(rows, attention_mask=torch.ones_like(rows)).logits  # [B, T, V]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), rows[:, 1:].flatten())


def _cycle(n: int, b: int, gen: torch.Generator):
    """Index batches [b] cycling through one seeded permutation of range(n)."""
    perm = torch.randperm(n, generator=gen)
    return (perm[(s * b + torch.arange(b)) % n] for s in itertools.count())


class LossUnlearner(Unlearner):
    """A gradient method: ``loss(model, batch)`` minimised by the shared loop (module docstring). ``cfg`` has steps,
    batch_size, lr and max_grad_norm. Losses should get their forget logits from :meth:`forward_forget`, which keeps
    the batch's span NLL for the history (otherwise the loop runs one more no-grad forward for it)."""

    needs_retain: ClassVar[bool] = False  # draw general rows into Batch.retain

    def prepare(self, model, data: UnlearnData) -> None:
        """Hook: one look at the frozen original model (eval mode, before any step). Default: nothing."""

    def loss(self, model, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def forward_forget(self, model, fs: ForgetSet) -> torch.Tensor:
        """The model's logits [B, T, V] on forget records; records their mean span NLL for the step's history."""
        logits = model(fs.ids, attention_mask=fs.attn).logits
        self._forget_nll = mean_span_nll(logits.detach(), fs).item()
        return logits

    def __call__(self, model, data: UnlearnData, *, seed: int = 0, progress: bool = False) -> list[dict]:
        cfg, name = self.cfg, self.name
        if len(data.forget) == 0:
            raise TrainingError(f"unlearn {name}: the forget set is empty")
        if self.needs_retain and len(data.general) == 0:
            raise TrainingError(f"unlearn {name}: needs retain rows (general data) and got none")
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        forget_batches = _cycle(len(data.forget), cfg.batch_size, gen)
        retain_batches = _cycle(len(data.general), cfg.batch_size, gen) if self.needs_retain else None
        model.eval()
        self.prepare(model, data)
        amp, upcast = master_weights(model)  # bf16/fp16 trainable weights -> float32 masters (cast back below)
        autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
        scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        history = []
        model.train()
        try:
            bar = tqdm(range(cfg.steps), desc=f"unlearn {name}", disable=not progress, unit="step")
            for step in bar:
                idx = next(forget_batches)
                retain = data.general[next(retain_batches)].to(device) if retain_batches is not None else None
                batch = Batch(data.forget.rows(idx).to(device), idx, retain)
                self._forget_nll = None
                with autocast():
                    loss = self.loss(model, batch)
                if not torch.isfinite(loss):
                    raise TrainingError(f"unlearn {name}: loss is {loss.item()} at step {step + 1} (lr {cfg.lr:.3g});"
                                        f" training diverged - lower unlearn.method.lr")
                if self._forget_nll is None:  # the method did not use forward_forget
                    with torch.no_grad(), autocast():
                        self.forward_forget(model, batch.forget)
                (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.unscale_(opt)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler:  # an inf gradient is the scaler's to skip and back off from
                    scaler.step(opt)
                    scaler.update()
                else:
                    if not torch.isfinite(grad_norm):
                        raise TrainingError(f"unlearn {name}: gradient norm is {grad_norm.item()} at step {step + 1}")
                    opt.step()
                opt.zero_grad(set_to_none=True)
                history.append({"step": step + 1, "loss": loss.item(), "forget_nll": self._forget_nll})
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", nll=f"{self._forget_nll:.3f}")
                report_progress((step + 1) / cfg.steps, f"unlearn {name}: step {step + 1}/{cfg.steps}, forget NLL "
                                f"{self._forget_nll:.3f}")
        finally:
            model.eval()
            for p in upcast:
                p.data = p.data.to(amp)
        return history
