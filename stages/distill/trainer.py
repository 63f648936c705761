"""A plain training loop for causal LMs: cross-entropy pretraining and teacher->student distillation.

One loop serves both: with ``teacher=None`` it is next-token cross-entropy (the embedded teacher's
pretraining); with a teacher the loss is ``(1 - ce_weight) * divergence + ce_weight * CE``.
Batches are drawn from packed token rows [rows, seq_len] in a seeded order, so a run is repeatable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stages.distill.divergences import get_divergence
from stages.errors import TrainingError


@dataclass
class TrainSpec:
    steps: int
    batch_size: int
    lr: float
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant, after a linear warmup
    max_grad_norm: float = 1.0
    eval_every: int = 100
    eval_rows: int = 64
    divergence: str | None = None  # None: cross-entropy only
    divergence_params: dict = field(default_factory=dict)
    chunk: str = "auto"  # auto | always | never: token-chunked loss (bounded memory)
    temperature: float = 1.0
    ce_weight: float = 0.0
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    checkpoint_dir: str | None = None  # where to save/resume training state (None: no checkpoints)
    checkpoint_every: int = 0  # optimiser steps between checkpoints (0: none)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Learning rate for optimiser step ``step`` (0-based)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    if spec.schedule == "linear":
        return spec.lr * (1.0 - frac)
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine to 0


def _batches(rows: int, batch_size: int, seed: int):
    """Endless seeded stream of row-index batches: a fresh permutation per epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(rows, generator=g)
        for i in range(0, rows - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]
        if rows < batch_size:  # tiny data: sample with replacement
            yield torch.randint(0, rows, (batch_size,), generator=g)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _kd_fn(spec: TrainSpec, vocab: int):
    """The training divergence: chunked over tokens for large vocabularies (memory bounded by the chunk)."""
    batchwise = spec.divergence == "sinkhorn"
    chunked = not batchwise and (spec.chunk == "always" or (spec.chunk == "auto" and vocab >= 32_768))
    return get_divergence(spec.divergence, chunked=chunked, **spec.divergence_params)


def _losses(student, teacher, ids: torch.Tensor, spec: TrainSpec, device: torch.device):
    """(total, kd, ce) for a batch of token ids [B, T]."""
    with _autocast(device):
        logits = student(input_ids=ids).logits  # [B, T, V]
    # next-token cross-entropy: position t predicts token t+1
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if teacher is None or spec.divergence is None:
        return ce, None, ce
    with torch.no_grad(), _autocast(device):
        t_logits = teacher(input_ids=ids).logits  # [B, T, V]
    kd = _kd_fn(spec, logits.shape[-1])(logits, t_logits, temperature=spec.temperature)
    del t_logits  # free before backward: the student's activations dominate peak memory
    total = (1.0 - spec.ce_weight) * kd + spec.ce_weight * ce
    return total, kd, ce


@torch.no_grad()
def evaluate_loss(model, eval_ids: torch.Tensor, batch_size: int, device: torch.device, teacher=None,
                  divergence: str | None = None, temperature: float = 1.0,
                  divergence_params: dict | None = None) -> dict:
    """Mean held-out CE (and KD divergence to the teacher if given) over ``eval_ids`` [rows, T]."""
    was_training = model.training
    model.eval()
    ce_sum, kd_sum, n = 0.0, 0.0, 0
    for i in range(0, len(eval_ids), batch_size):
        ids = eval_ids[i:i + batch_size].to(device).long()
        with _autocast(device):
            logits = model(input_ids=ids).logits
        ce_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
        if teacher is not None and divergence is not None:
            with _autocast(device):
                t_logits = teacher(input_ids=ids).logits
            kd = get_divergence(divergence, **(divergence_params or {}))(logits, t_logits, temperature=temperature)
            kd_sum += kd.item() * ids.numel()
        n += ids[:, 1:].numel()
    model.train(was_training)
    out = {"eval_ce": ce_sum / n, "eval_ppl": math.exp(min(ce_sum / n, 50.0))}
    if teacher is not None and divergence is not None:
        out["eval_kd"] = kd_sum / (n + len(eval_ids))  # KD counted over all T positions
    return out


def train(student, train_ids: torch.Tensor, eval_ids: torch.Tensor, spec: TrainSpec, *, teacher=None,
          device: torch.device = torch.device("cpu")) -> list[dict]:
    """Train ``student`` in place; return the history (one dict per step, evals included)."""
    if spec.divergence is not None:
        get_divergence(spec.divergence, **spec.divergence_params)  # bad name/parameters fail before any work
    torch.manual_seed(spec.seed)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    batches = _batches(len(train_ids), spec.batch_size, spec.seed)
    eval_sub = eval_ids[: spec.eval_rows]
    history: list[dict] = []
    start = _resume(student, opt, spec, history)
    for _ in range(start * spec.grad_accum):  # replay the seeded data order up to the checkpoint
        next(batches)
    tokens_per_step = spec.batch_size * spec.grad_accum * train_ids.shape[1]
    bar = tqdm(range(start, spec.steps), desc=spec.desc, disable=not spec.progress, unit="step", dynamic_ncols=True,
               initial=start, total=spec.steps)
    t0 = time.perf_counter()
    for step in bar:
        lr = lr_at(step, spec)
        for group in opt.param_groups:
            group["lr"] = lr
        rec = {"step": step + 1, "lr": lr, "loss": 0.0, "ce": 0.0}
        if step == start and start > 0:
            rec["resumed_from"] = start  # the steps before came from a checkpoint
        if teacher is not None:
            rec["kd"] = 0.0
        for _ in range(spec.grad_accum):
            ids = train_ids[next(batches)].to(device).long()  # [B, T]
            total, kd, ce = _losses(student, teacher, ids, spec, device)
            if not torch.isfinite(total):
                raise TrainingError(f"{spec.desc}: loss is {total.item()} at step {step + 1} "
                                    f"(lr {lr:.3g}); training diverged - lower the learning rate")
            (total / spec.grad_accum).backward()
            rec["loss"] += total.item() / spec.grad_accum
            rec["ce"] += ce.item() / spec.grad_accum
            if kd is not None:
                rec["kd"] += kd.item() / spec.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), spec.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"{spec.desc}: gradient norm is {grad_norm.item()} at step {step + 1}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        rec["tokens_per_s"] = tokens_per_step * (step + 1 - start) / elapsed
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
            rec.update(evaluate_loss(student, eval_sub, spec.batch_size, device, teacher, spec.divergence,
                                     spec.temperature, spec.divergence_params))
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if spec.checkpoint_dir and spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 \
                and step + 1 < spec.steps:
            _save_checkpoint(student, opt, step + 1, history, Path(spec.checkpoint_dir))
    student.eval()
    return history


def _save_checkpoint(model, opt, step: int, history: list[dict], ckpt_dir: Path) -> None:
    """Model weights (safetensors), optimiser state, step and history; replaced atomically."""
    from safetensors.torch import save_model

    from stages.io import atomic_dir

    with atomic_dir(ckpt_dir) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # stores tied weights (lm_head = embeddings) once
        torch.save(opt.state_dict(), tmp / "optimizer.pt")  # only tensors/numbers: loads with weights_only=True
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))


def _resume(model, opt, spec: TrainSpec, history: list[dict]) -> int:
    """Load the checkpoint in ``spec.checkpoint_dir`` if there is one; return the step to start from."""
    if not spec.checkpoint_dir or not (Path(spec.checkpoint_dir) / "state.json").is_file():
        return 0
    from safetensors.torch import load_model

    ckpt = Path(spec.checkpoint_dir)
    state = json.loads((ckpt / "state.json").read_text())
    try:
        load_model(model, str(ckpt / "model.safetensors"), strict=True)
    except RuntimeError as e:
        raise TrainingError(f"checkpoint {ckpt} does not match the model ({str(e).strip()[:200]}); "
                            "delete it to start over") from None
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    history.extend(state["history"])
    return int(state["step"])


def save_history(history: list[dict], out_dir: Path, title: str) -> dict[str, str]:
    """Write ``history.jsonl`` and ``curves.png`` (train loss and held-out CE vs step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss", lw=1)
    ev = [r for r in history if "eval_ce" in r]
    ax.plot([r["step"] for r in ev], [r["eval_ce"] for r in ev], "o-", label="held-out CE")
    if ev and "eval_kd" in ev[0]:
        ax.plot([r["step"] for r in ev], [r["eval_kd"] for r in ev], "s-", label="held-out KD")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)
    return {"history": "history.jsonl", "curves": "curves.png"}


def spec_dict(spec: TrainSpec) -> dict:
    return asdict(spec)
