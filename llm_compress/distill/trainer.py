"""A plain training loop for causal LMs: cross-entropy pretraining and teacher->student distillation.

One loop serves both: with ``teacher=None`` it is next-token cross-entropy (the embedded teacher's
pretraining); with a teacher the loss is ``(1 - ce_weight) * divergence + ce_weight * CE``, computed by
``llm_compress.distill.step.StepLoss`` (plain for small vocabularies; for large ones over token chunks with the
student's lm_head fused in, so a step never holds a [tokens, V] tensor). The settings are the recipe's
validated ``DistillConfig``. Batches are drawn from packed token rows [rows, seq_len] in a seeded order, so a
run is repeatable.

The teacher signal is either the teacher itself, run on every batch, or its top-k log-probs computed once
(``precompute_topk``) and indexed by row, in which case training needs no teacher at all. With
``on_policy.share > 0`` that share of micro-batches is replaced, as in GKD, by the student's own samples: the
first ``on_policy.prompt_tokens`` tokens of each row are kept as a prompt, the student samples the rest, and the
divergence to the (online) teacher covers only the sampled tokens. Which micro-batches are on-policy, and the
sampled tokens, are functions of (seed, micro-batch index), so a resumed run draws the same ones.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from llm_compress.distill.chunked import CompressedTeacher, compress_teacher, get_divergence
from llm_compress.distill.config import DistillConfig, divergence_params
from llm_compress.distill.step import StepLoss, _autocast
from llm_compress.errors import InputError, TrainingError
from llm_compress.progress import report as report_progress

if TYPE_CHECKING:
    from llm_compress.distributed import Rank


LOW_PRECISION = (torch.bfloat16, torch.float16)


def master_weights(model) -> tuple[torch.dtype | None, list[torch.nn.Parameter]]:
    """Upcast ``model``'s trainable bfloat16/float16 parameters to float32 in place: the weights the optimiser
    updates (at a small lr most AdamW updates of a bf16 weight round to zero). Returns (their former dtype, the
    forward's autocast dtype; the upcast parameters, to cast back after training), or (None, []) if none were.
    """
    low = [p for p in model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION]
    dtypes = {p.dtype for p in low}
    if len(dtypes) > 1:
        raise TrainingError(f"the student's trainable parameters mix {sorted(map(str, dtypes))}: load it in one dtype")
    for p in low:
        p.data = p.data.float()
    return (dtypes.pop() if dtypes else None), low


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warmup, then cfg.schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine to 0


def _batches(rows: int, batch_size: int, seed: int):
    """Endless seeded stream of row-index batches: a fresh permutation per epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(rows, generator=g)
        for i in range(0, rows - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]
        if rows < batch_size:  # tiny data: sample with replacement
            yield torch.randint(0, rows, (batch_size,), generator=g)


def _mix(seed: int, index: int) -> int:
    """A seed for micro-batch ``index`` of a run seeded ``seed`` (stateless, so resuming replays it)."""
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63)


def is_on_policy(share: float, seed: int, micro_index: int) -> bool:
    """Whether micro-batch ``micro_index`` of a run seeded ``seed`` is on-policy (drawn with probability share)."""
    return share > 0 and random.Random(_mix(seed, micro_index)).random() < share


@torch.no_grad()
def sample_continuations(model, prompt: torch.Tensor, total_len: int, temperature: float,
                         generator: torch.Generator) -> torch.Tensor:
    """Extend ``prompt`` [B, P] to [B, total_len] with tokens sampled from the model (full vocabulary).

    Plain ancestral sampling with the KV cache, softmax(logits / temperature) in float32, no top-k/top-p and
    no stop at EOS (rows are packed text, not chat turns), drawn from ``generator`` so it is reproducible.
    """
    was_training = model.training
    model.eval()
    out = model(input_ids=prompt, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]  # [B, V]
    pieces = [prompt]
    for i in range(total_len - prompt.shape[1]):
        probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
        nxt = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
        pieces.append(nxt)
        if i + 1 < total_len - prompt.shape[1]:
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    model.train(was_training)
    return torch.cat(pieces, dim=1)  # [B, total_len]


def _losses(step: StepLoss, ids: torch.Tensor, *, topk: CompressedTeacher | None = None,
            mask: torch.Tensor | None = None):
    """(total, kd, ce) of one training micro-batch [B, T]: ``step`` (see ``StepLoss.__call__``).

    The loop's single call per micro-batch, so tests can watch the batches or stop a run at a given one.
    """
    return step(ids, topk=topk, mask=mask)


@torch.no_grad()
def precompute_topk(teacher, ids: torch.Tensor, k: int, temperature: float, batch_size: int,
                    device: torch.device, progress: bool = False, batches: range | None = None) -> CompressedTeacher:
    """The teacher's top-k log-probs + tail bucket for every position of ``ids`` [rows, T].

    Returns CompressedTeacher with ids int32 [rows, T, k], log-probs float32 [rows, T, k], tail [rows, T],
    on the CPU: 8 k + 4 bytes per token instead of the full V-entry distribution.
    batches: only these batches of ``batch_size`` rows (a rank's share, ``Rank.shard``), their rows concatenated.
    """
    k = min(k, teacher.get_output_embeddings().weight.shape[0])
    parts: list[CompressedTeacher] = []
    teacher.to(device).eval()
    starts = [b * batch_size for b in (batches if batches is not None else range(-(-len(ids) // batch_size)))]
    for i in tqdm(starts, desc="teacher top-k", disable=not progress, unit="batch"):
        with _autocast(device):
            logits = teacher(input_ids=ids[i:i + batch_size].to(device).long()).logits  # [b, T, V]
        c = compress_teacher(logits.float(), k, temperature)
        parts.append(CompressedTeacher(c.topk_ids.int().cpu(), c.topk_logprobs.cpu(), c.tail_logprob.cpu()))
    if not parts:  # a rank with no batch (fewer batches than ranks)
        return CompressedTeacher(torch.zeros(0, ids.shape[1], k, dtype=torch.int32), torch.zeros(0, ids.shape[1], k),
                                 torch.zeros(0, ids.shape[1]))
    return CompressedTeacher(*(torch.cat([p[j] for p in parts]) for j in range(3)))


def _rows(topk: CompressedTeacher | None, idx: torch.Tensor, device: torch.device) -> CompressedTeacher | None:
    if topk is None:
        return None
    return CompressedTeacher(topk.topk_ids[idx].to(device).long(), topk.topk_logprobs[idx].to(device),
                             topk.tail_logprob[idx].to(device))


@torch.no_grad()
def evaluate_loss(model, eval_ids: torch.Tensor, batch_size: int, device: torch.device, teacher=None,
                  cfg: DistillConfig | None = None, teacher_topk: CompressedTeacher | None = None,
                  amp_dtype: torch.dtype | None = None, rank: Rank | None = None, loss=None) -> dict:
    """Mean held-out CE (and KD divergence to the teacher if given) over ``eval_ids`` [rows, T].

    cfg: the divergence, its parameters, temperature and chunking (default: forward KL at T = 1, chunk auto):
        the loss is computed as in training (plain, chunked or fused; see ``StepLoss``).
    The teacher signal is ``teacher_topk`` (cached top-k rows aligned with ``eval_ids``) if given, else
    ``teacher``; with cached top-k the reported KD is the top-k + tail-bucket value. amp_dtype: autocast dtype
    (see ``StepLoss``). rank: with several processes each scores its share of the batches (``Rank.shard``) and
    the sums are added up over the process group, so every rank returns the same figures.
    loss: the FSDP root to score through (``shard``) instead of a StepLoss over ``model``; then every rank makes
    the same number of forwards (each gathers the layers' weights from all ranks), repeating its last batch
    uncounted where it has fewer.
    """
    step = loss or StepLoss(cfg if cfg is not None else DistillConfig(), model, teacher, device=device,
                            amp_dtype=amp_dtype)
    was_training = model.training
    model.eval()
    score_kd = teacher is not None or teacher_topk is not None
    ce_sum, kd_sum, n = 0.0, 0.0, 0
    n_batches = -(-len(eval_ids) // batch_size)
    mine = list(rank.shard(n_batches) if rank else range(n_batches))
    rounds = -(-n_batches // rank.world) if rank and loss is not None else len(mine)
    for j in range(rounds):
        i = mine[min(j, len(mine) - 1)] * batch_size if mine else 0
        ids = eval_ids[i:i + batch_size].to(device).long()
        rows = _rows(teacher_topk, torch.arange(i, i + len(ids)), device)
        _, kd, ce = step(ids, topk=rows, ce_reduction="sum")
        if j >= len(mine):  # a collective's partner only
            continue
        ce_sum += ce.item()
        if score_kd:
            kd_sum += kd.item() * ids.numel()
        n += ids[:, 1:].numel()
    if loss is not None:  # the FSDP root stays gathered after a forward without backward: shard it again
        loss.reshard()
    if rank is not None and rank.world > 1:
        sums = torch.tensor([ce_sum, kd_sum, float(n)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)  # [3]: the sums over every rank's batches
        ce_sum, kd_sum, n = sums[0].item(), sums[1].item(), int(sums[2].item())
    model.train(was_training)
    out = {"eval_ce": ce_sum / n, "eval_ppl": math.exp(min(ce_sum / n, 50.0))}
    if score_kd:
        out["eval_kd"] = kd_sum / (n + len(eval_ids))  # KD counted over all T positions
    return out


def train(student, train_ids: torch.Tensor, eval_ids: torch.Tensor, cfg: DistillConfig, *, teacher=None,
          device: torch.device = torch.device("cpu"), train_topk: CompressedTeacher | None = None,
          eval_topk: CompressedTeacher | None = None, seed: int = 0, progress: bool = True, desc: str = "train",
          checkpoint_dir: str | Path | None = None, eval_rows: int = 64, compile: bool = False,
          rank: Rank | None = None, strategy: str = "ddp", eval_before: dict | None = None) -> list[dict]:
    """Train ``student`` in place on packed token rows [rows, T]; return the history (a dict per step, evals included).

    cfg: the validated distillation settings (optimiser, schedule, divergence, temperature, ce_weight, chunking,
        on-policy share, checkpoint_every). Without a teacher signal (``teacher`` and ``train_topk`` both None)
        the loss is next-token cross-entropy alone, whatever cfg.divergence and cfg.ce_weight say.
    train_topk / eval_topk: cached teacher top-k aligned with the rows of train_ids / eval_ids[:eval_rows]
        (from ``precompute_topk``); when given they replace the online teacher for off-policy batches and evaluation.
    seed: data order, on-policy draws and sampling; progress / desc: the progress bar.
    checkpoint_dir: where the state is saved every cfg.checkpoint_every steps and resumed from (None: no checkpoints).
    eval_rows: held-out rows scored every cfg.eval_every steps; compile: ``torch.compile`` the student's training
        forward (already resolved from cfg.compile and the device by the caller).

    rank: this process's place among several (``llm_compress.distributed``): each rank takes its equal slice of every
        global batch of cfg.batch_size rows, the gradients are averaged over the ranks (so a step equals the single
        process's on the whole batch), logged losses and evaluations are averaged over the ranks, and only rank 0
        writes checkpoints. A checkpoint holds whole weights and optimiser state and no world size or strategy: a
        run resumes from it with any. Every rank returns the same history.
    strategy: with several ranks, "ddp" (the student with its loss in DistributedDataParallel) or "fsdp" (sharded
        by ``shard``; the student, and an online teacher, may then be on the CPU: only the shards go to ``device``).
    eval_before: a dict to fill with the held-out figures of the starting weights (scored once the student is
        placed or sharded, as every later evaluation is).

    A student in bfloat16 or float16 is trained in mixed precision: its trainable parameters become float32 master
    weights (``master_weights``; checkpoints hold them), the forward passes autocast to its dtype (float16 with a
    gradient scaler), and it is cast back to its dtype at the end. The teacher stays as it is.
    """
    get_divergence(cfg.divergence.name, **divergence_params(cfg.divergence))  # bad name/parameters fail before any work
    share, prompt = cfg.on_policy.share, cfg.on_policy.prompt_tokens
    if share > 0 and teacher is None:
        raise TrainingError("on-policy distillation needs the teacher itself (it scores the student's samples)")
    if share > 0 and not 1 <= prompt < train_ids.shape[1] - 1:
        raise TrainingError(f"on-policy prompt of {prompt} tokens leaves nothing to sample in rows "
                            f"of {train_ids.shape[1]} tokens")
    for name, cache, ids_ in (("train", train_topk, train_ids), ("eval", eval_topk, eval_ids[:eval_rows])):
        if cache is not None and tuple(cache.tail_logprob.shape) != tuple(ids_.shape):
            raise TrainingError(f"cached teacher top-k for {name} has shape {tuple(cache.tail_logprob.shape)}, "
                                f"the {name} tokens {tuple(ids_.shape)}: stale cache?")
    world, me = (rank.world, rank.rank) if rank else (1, 0)
    if cfg.batch_size % world:
        raise TrainingError(f"distill.batch_size {cfg.batch_size} cannot be split over {world} processes")
    local = cfg.batch_size // world  # rows of every global batch this rank takes
    sharded = world > 1 and strategy == "fsdp"
    if sharded and share > 0:
        raise TrainingError("on-policy sampling runs the student outside its sharded forward: not with FSDP")
    torch.manual_seed(seed)
    if not sharded:  # FSDP moves only each rank's shards to the device
        student.to(device)
    student.train()
    amp, upcast = master_weights(student)  # before sharding: FSDP shards the float32 master weights
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    if teacher is not None:
        if not sharded:
            teacher.to(device)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    step_loss = StepLoss(cfg, student, teacher, device=device, compile=compile and not sharded, amp_dtype=amp)
    model = shard(student, step_loss, teacher, device, world) if sharded else None  # the FSDP root, or None
    # the optimiser before any forward: FSDP swaps the registered parameters for whole ones while a unit is gathered
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]  # FSDP's sharded ones if sharded
    groups = [[(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]]
    opt = torch.optim.AdamW([{"params": [p for _, p in groups[0]], "weight_decay": cfg.weight_decay},
                             {"params": [p for _, p in groups[1]], "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    names = [n for g in groups for n, _ in g]  # the optimiser's parameter order (its state's integer keys)
    eval_sub = eval_ids[:eval_rows]
    if eval_before is not None:  # the starting weights, scored as every later evaluation is
        eval_before.update(evaluate_loss(student, eval_sub, cfg.batch_size, device, teacher, cfg,
                                         teacher_topk=eval_topk, amp_dtype=amp, rank=rank, loss=model))
    batches = _batches(len(train_ids), cfg.batch_size, seed)
    history: list[dict] = []
    start = _resume(student, opt, checkpoint_dir, history, scaler, names if sharded else None)
    if world > 1 and not sharded:  # after _resume: DDP starts from the (identical) weights every rank loaded
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(_WithLoss(student, step_loss),
                                        device_ids=[device.index] if device.type == "cuda" else None)
    for _ in range(start * cfg.grad_accum):  # replay the seeded data order up to the checkpoint
        next(batches)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * train_ids.shape[1]
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True,
               initial=start, total=cfg.steps)
    t0 = time.perf_counter()
    for step in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        rec = {"step": step + 1, "lr": lr, "loss": 0.0, "ce": 0.0}
        if step == start and start > 0:
            rec["resumed_from"] = start  # the steps before came from a checkpoint
        if teacher is not None or train_topk is not None:
            rec["kd"] = 0.0
        if share > 0:
            rec["on_policy"] = 0
        for micro in range(cfg.grad_accum):
            idx = next(batches)[me * local:(me + 1) * local]  # [B / world]: this rank's slice of the global batch
            ids = train_ids[idx].to(device).long()  # [B / world, T]
            micro_index = step * cfg.grad_accum + micro
            # DDP / FSDP average the gradients over the ranks on the last micro-batch's backward only
            if sharded:
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            sync = model.no_sync() if model is not None and not sharded and micro < cfg.grad_accum - 1 \
                else contextlib.nullcontext()
            with sync:
                if is_on_policy(share, seed, micro_index):  # the same micro-batches on every rank
                    gen = torch.Generator(device=device).manual_seed(_mix(seed, micro_index) + me)
                    with _autocast(device, amp):
                        ids = sample_continuations(student, ids[:, :prompt], ids.shape[1], cfg.on_policy.temperature,
                                                   gen)
                    mask = torch.zeros_like(ids, dtype=torch.bool)
                    mask[:, prompt - 1:-1] = True  # positions whose next token was sampled
                    total, kd, _ = _losses(model or step_loss, ids, mask=mask)
                    ce = torch.zeros(())  # CE against the student's own samples means nothing: not logged
                    rec["on_policy"] += 1
                else:
                    total, kd, ce = _losses(model or step_loss, ids, topk=_rows(train_topk, idx, device))
                if not torch.isfinite(total):
                    raise TrainingError(f"{desc}: loss is {total.item()} at step {step + 1} "
                                        f"(lr {lr:.3g}); training diverged - lower the learning rate")
                share_of_step = total / cfg.grad_accum
                (scaler.scale(share_of_step) if scaler else share_of_step).backward()
            rec["loss"] += total.item() / cfg.grad_accum
            rec["ce"] += ce.item()  # averaged over the off-policy micro-batches below
            if kd is not None:
                rec["kd"] += kd.item() / cfg.grad_accum
        if world > 1:  # the logged losses are the whole batch's: the mean of the ranks' (equal-sized) shares
            logged = [k for k in ("loss", "ce", "kd") if k in rec]
            sums = torch.tensor([rec[k] for k in logged], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(sums)
            rec.update({k: v / world for k, v in zip(logged, sums.tolist())})
        off_policy = cfg.grad_accum - rec.get("on_policy", 0)
        rec["ce"] = rec["ce"] / off_policy if off_policy else None
        if scaler:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the shards
            grad_norm = grad_norm.full_tensor()
        if scaler:  # float16: a non-finite gradient skips the step and lowers the loss scale
            scaler.step(opt)
            scaler.update()
        elif not torch.isfinite(grad_norm):
            raise TrainingError(f"{desc}: gradient norm is {grad_norm.item()} at step {step + 1}")
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        rec["tokens_per_s"] = tokens_per_step * (step + 1 - start) / elapsed
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            rec.update(evaluate_loss(student, eval_sub, cfg.batch_size, device, teacher, cfg, teacher_topk=eval_topk,
                                     amp_dtype=amp, rank=rank, loss=model if sharded else None))
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        report_progress((step + 1) / cfg.steps, f"{desc}: step {step + 1}/{cfg.steps}, loss {rec['loss']:.3f}, "
                        f"{rec['tokens_per_s']:.0f} tokens/s")
        if checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                and step + 1 < cfg.steps:
            if sharded:  # every rank takes part in gathering the whole state; rank 0 writes it
                _save_checkpoint(*gather(student, opt, names), step + 1, history, Path(checkpoint_dir), scaler,
                                 write=me == 0)
            elif me == 0:  # the ranks' weights and optimiser states are identical
                _save_checkpoint(student, opt.state_dict(), step + 1, history, Path(checkpoint_dir), scaler)
    for p in upcast if not sharded else ():  # back to the dtype the student came in (and is saved in)
        p.data = p.data.to(amp)
    student.eval()
    return history


class _WithLoss(torch.nn.Module):
    """The student and its loss as one module, what DDP wraps and FSDP's root unit is: the chunked and fused loss
    paths run the decoder and the lm_head outside the student's own forward, so the wrapper's forward (which readies
    DDP's gradient averaging, or gathers FSDP's root weights) must cover the whole loss."""

    def __init__(self, student, step: StepLoss, teacher=None):
        super().__init__()
        self.student = student  # registers the parameters DDP averages / FSDP shards
        if teacher is not None:  # FSDP only: the online teacher's weights are sharded too
            self.teacher = teacher
        self.step = step  # not a module: the plain, chunked or fused loss over ``student``

    def forward(self, ids: torch.Tensor, topk: CompressedTeacher | None = None, mask: torch.Tensor | None = None,
                ce_reduction: str = "mean"):
        return self.step(ids, topk=topk, mask=mask, ce_reduction=ce_reduction)  # (total, kd, ce): StepLoss.__call__


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Llama / Mistral / Qwen2-style causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InputError(f"expected a decoder with model.layers (Llama, Mistral, Qwen2 layouts), not "
                         f"{type(model).__name__}")
    return layers


def shard(student, step: StepLoss, teacher, device: torch.device, world: int) -> _WithLoss:
    """FSDP2 (``fully_shard``) over ``world`` ranks: every decoder layer of the student, and of an online teacher,
    is a unit of its own, gathered for its forward and backward only; the root, the student with its loss, holds
    the rest (embeddings, final norm, lm_head), gathered for the whole loss, so the fused lm_head sees its whole
    weight. Parameters are sharded where they are (the CPU) and the shards moved to ``device``.
    Returns the root, called as ``StepLoss``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    root = _WithLoss(student, step, teacher)
    for model in (student, teacher) if teacher is not None else (student,):
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def _tied_names(model) -> tuple[str, str] | None:
    """(input embedding weight, lm_head weight) names when the two are one tensor, else None."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or out.weight is not inp.weight:
        return None
    where = {m: n for n, m in model.named_modules()}
    return f"{where[inp]}.weight", f"{where[out]}.weight"


def gather(student, opt, names: list[str]) -> tuple[dict, dict]:
    """The whole (weights, optimiser state) of an FSDP-sharded student, on rank 0's CPU (empty on the others; every
    rank must call it): weights by name, a tied lm_head left out as ``save_model`` leaves it; the optimiser state
    keyed by parameter index as ``torch.optim``'s own ``state_dict`` (``names``: the optimiser's parameter order),
    so any world size and either strategy resumes from it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(student, options=whole)
    tied = _tied_names(student)
    if tied:
        weights.pop(tied[1], None)
    if opt is None:
        return weights, {}
    by_name = get_optimizer_state_dict(student, opt, options=whole)
    index = {n: i for i, n in enumerate(names)}
    optim = {"state": {index[n]: v for n, v in by_name.get("state", {}).items()},
             "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                              for g in by_name.get("param_groups", [])]}
    return weights, optim


def _save_checkpoint(model, optim: dict, step: int, history: list[dict], ckpt_dir: Path, scaler=None,
                     write: bool = True) -> None:
    """Model weights (safetensors: of ``model``, or a ``gather``-ed state dict), optimiser state (``optim``, torch's
    own layout), step and history (and the float16 loss scaler's state); replaced atomically. ``write`` False: a
    rank that only took part in gathering."""
    from safetensors.torch import save_file, save_model

    from llm_compress.io import atomic_dir

    if not write:
        return
    with atomic_dir(ckpt_dir) as tmp:
        if isinstance(model, dict):
            save_file(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            save_model(model, str(tmp / "model.safetensors"))  # stores tied weights (lm_head = embeddings) once
        torch.save(optim, tmp / "optimizer.pt")  # only tensors/numbers: loads with weights_only=True
        if scaler:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))


def _resume(model, opt, checkpoint_dir: str | Path | None, history: list[dict], scaler=None,
            sharded_names: list[str] | None = None) -> int:
    """Load the checkpoint in ``checkpoint_dir`` if there is one; return the step to start from.

    sharded_names: the optimiser's parameter names when ``model`` is FSDP-sharded: every rank reads the whole state
    and keeps its shards (a checkpoint holds no world size or strategy)."""
    if not checkpoint_dir or not (Path(checkpoint_dir) / "state.json").is_file():
        return 0
    from safetensors.torch import load_file, load_model

    ckpt = Path(checkpoint_dir)
    state = json.loads((ckpt / "state.json").read_text())
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    try:
        if sharded_names is None:
            load_model(model, str(ckpt / "model.safetensors"), strict=True)
        else:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            weights = load_file(str(ckpt / "model.safetensors"))
            tied = _tied_names(model)
            if tied:  # save_model keeps one name of a tied pair
                a, b = tied
                weights.setdefault(a, weights.get(b))
                weights.setdefault(b, weights.get(a))
            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, weights, options=whole)
            optim = {"state": {sharded_names[i]: v for i, v in optim["state"].items()},
                     "param_groups": [{**g, "params": [sharded_names[i] for i in g["params"]]}
                                      for g in optim["param_groups"]]}
            set_optimizer_state_dict(model, opt, optim, options=whole)
    except (RuntimeError, KeyError, IndexError) as e:
        raise TrainingError(f"checkpoint {ckpt} does not match the model ({type(e).__name__}: {str(e).strip()[:200]})"
                            "; delete it to start over") from None
    if sharded_names is None:
        opt.load_state_dict(optim)
    if scaler and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
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

