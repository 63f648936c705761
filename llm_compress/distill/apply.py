"""Knowledge distillation: train a student to match the teacher's next-token distributions."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from llm_compress.data import load_tokens
from llm_compress.distill.chunked import CompressedTeacher
from llm_compress.distill.config import DeriveStudent, DistillConfig
from llm_compress.distill.step import loss_path
from llm_compress.distill.trainer import decoder_layers, gather, precompute_topk, save_history, train
from llm_compress.distributed import Rank, devices, launch, world_of
from llm_compress.errors import InputError
from llm_compress.modeling import (check_same_vocab, count_parameters, load_causal_lm, load_tokenizer, resolve_device,
                                   save_pretrained_atomic_into)
from llm_compress.result import StageResult
from llm_compress.schema import ModelsConfig, RuntimeConfig

EVAL_ROWS = 64  # held-out rows scored before training and every distill.eval_every steps


def derive_student(teacher, spec: DeriveStudent, seed: int = 0):
    """A shallower copy of the teacher: keep some decoder layers, optionally with their weights."""
    from transformers import AutoModelForCausalLM

    try:
        n = len(decoder_layers(teacher))
    except InputError as e:
        raise InputError(f"cannot derive a student: {e}") from None
    keep = list(range(0, n, 2)) if spec.layers == "every_other" else list(spec.layers)
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep or len(set(keep)) != len(keep):
        raise InputError(f"distill.student.layers: {spec.layers} must be distinct indices in [0, {n}) "
                         f"(the teacher has {n} layers)")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(keep)
    for key, value in spec.config.items():  # a smaller architecture (validated: only with init random)
        setattr(cfg, key, value)
    if spec.config:
        heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) if "head_dim" in spec.config else None
        if heads % kv or (head_dim is None and cfg.hidden_size % heads):
            raise InputError(f"distill.student.config: num_attention_heads {heads} must be divisible by "
                             f"num_key_value_heads {kv}, and hidden_size {cfg.hidden_size} by the heads")
        if head_dim is None and hasattr(cfg, "head_dim"):
            cfg.head_dim = cfg.hidden_size // heads  # the teacher's head_dim no longer applies
    if getattr(cfg, "layer_types", None):  # per-layer attention types (sliding/full) follow the kept layers
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
    if spec.init == "teacher":
        src = teacher.state_dict()
        dst = {}
        for name in student.state_dict():
            if ".layers." in name:
                prefix, rest = name.split(".layers.", 1)
                j, tail = rest.split(".", 1)
                dst[name] = src[f"{prefix}.layers.{keep[int(j)]}.{tail}"]
            else:
                dst[name] = src[name]
        student.load_state_dict(dst)
    return student, keep


def cached_teacher_topk(teacher, ids: torch.Tensor, k: int, temperature: float, cache_dir: Path, name: str,
                        batch_size: int, device: torch.device, progress: bool,
                        rank: Rank | None = None) -> tuple[CompressedTeacher, bool]:
    """The teacher's top-k over ``ids``, loaded from ``cache_dir/name.safetensors`` or computed and saved there.

    The caller names ``cache_dir`` by what the values depend on (teacher, tokens, k, temperature, device,
    dtype), so any run with the same ones reuses it. Returns (values, reused).
    rank: with several processes each computes its share of the batches (``Rank.shard``: the single process's
    batches, so the values are the same) into a part file, rank 0 puts them in order into the cache file, and
    every rank loads that.
    """
    path = cache_dir / f"{name}.safetensors"
    cached = _load_topk(path, ids)
    if cached is not None:
        return cached, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    if rank is None or rank.world == 1:
        c = precompute_topk(teacher, ids, k, temperature, batch_size, device, progress)
        _save_topk(c, path)
        return c, False
    n_batches = -(-len(ids) // batch_size)
    mine = precompute_topk(teacher, ids, k, temperature, batch_size, device, progress, batches=rank.shard(n_batches))
    part = cache_dir / f"{name}.part{rank.rank}of{rank.world}.safetensors"
    _save_topk(mine, part)
    rank.barrier()  # every part is written
    if rank.main:
        parts = [_load_topk(cache_dir / f"{name}.part{r}of{rank.world}.safetensors") for r in range(rank.world)]
        # batch b is rank b % world's (b // world)-th batch of batch_size rows (the last one may be shorter)
        pieces = []
        for b in range(n_batches):
            r, j = b % rank.world, b // rank.world
            rows = slice(j * batch_size, j * batch_size + min(batch_size, len(ids) - b * batch_size))
            pieces.append([t[rows] for t in parts[r]])
        _save_topk(CompressedTeacher(*(torch.cat([p[i] for p in pieces]) for i in range(3))), path)
        for r in range(rank.world):
            (cache_dir / f"{name}.part{r}of{rank.world}.safetensors").unlink(missing_ok=True)
    rank.barrier()  # the cache file is in place
    return _load_topk(path, ids), False


def _load_topk(path: Path, ids: torch.Tensor | None = None) -> CompressedTeacher | None:
    """Cached top-k values from ``path``, or None if missing, unreadable or not for tokens shaped like ``ids``."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        c = CompressedTeacher(t["topk_ids"], t["topk_logprobs"], t["tail_logprob"])
    except Exception:  # a corrupt cache file is recomputed, never trusted
        return None
    return c if ids is None or tuple(c.tail_logprob.shape) == tuple(ids.shape) else None


def _save_topk(c: CompressedTeacher, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"topk_ids": c.topk_ids.contiguous(), "topk_logprobs": c.topk_logprobs.contiguous(),
               "tail_logprob": c.tail_logprob.contiguous()}, str(tmp))
    os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache


def _whole(student, models: ModelsConfig):
    """An FSDP-sharded student as a plain model on rank 0's CPU, in ``models.dtype`` (None on the other ranks; every
    rank must call it): its gathered weights loaded into a fresh model of its config."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    from llm_compress.modeling import DTYPES

    weights, _ = gather(student, None, [])
    if not weights:
        return None
    with no_init_weights():  # the weights come next: no random initialisation of a large model
        plain = AutoModelForCausalLM.from_config(student.config, dtype=torch.float32,
                                                 trust_remote_code=models.trust_remote_code)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    tied = {n for n, _ in plain.named_parameters(remove_duplicate=False)} - {n for n, _ in plain.named_parameters()}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"the gathered student does not fit its config: missing {missing}, unexpected {unexpected}")
    return plain.to(DTYPES[models.dtype]).eval()


def run(cfg: DistillConfig, models: ModelsConfig, runtime: RuntimeConfig, *, teacher_ref: str,
        student_ref: str, tokenizer_ref: str, train_path: Path, eval_path: Path, out_dir: Path,
        checkpoint_dir: Path | None = None, teacher_cache_dir: Path | None = None) -> StageResult:
    """Distil the teacher into the student; ``teacher_cache_dir`` holds cached top-k (teacher.source cached_topk).

    With ``runtime.distributed`` asking for more than one process, the distillation runs data-parallel in
    processes that torchrun starts (``llm_compress.worker`` running ``rank_main``, one per GPU or CPU process), and this
    process waits for them, passing on rank 0's progress; the result is the same as one process's within float
    tolerance.
    """
    args = dict(teacher_ref=teacher_ref, student_ref=student_ref, tokenizer_ref=tokenizer_ref,
                train_path=str(train_path), eval_path=str(eval_path), out_dir=str(out_dir),
                checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                teacher_cache_dir=str(teacher_cache_dir) if teacher_cache_dir else None)
    if world_of(runtime) == 1:
        return run_rank(cfg, models, runtime, rank=None, **args)
    shared = [p for p in (teacher_ref, student_ref, tokenizer_ref) if Path(p).exists()]
    return launch("llm_compress.distill.apply:rank_main", runtime, out_dir, {"cfg": cfg, "models": models}, args,
                  [str(train_path), str(eval_path), str(out_dir), *shared])


def rank_main(spec: dict, rank: Rank) -> StageResult | None:
    """A rank of ``llm_compress.worker``: ``run_rank`` with the spec ``run`` wrote."""
    return run_rank(DistillConfig.model_validate(spec["cfg"]), ModelsConfig.model_validate(spec["models"]),
                    RuntimeConfig.model_validate(spec["runtime"]), rank=rank, **spec["args"])


def run_rank(cfg: DistillConfig, models: ModelsConfig, runtime: RuntimeConfig, *, rank: Rank | None,
             teacher_ref: str, student_ref: str, tokenizer_ref: str, train_path: str, eval_path: str, out_dir: str,
             checkpoint_dir: str | None = None, teacher_cache_dir: str | None = None) -> StageResult | None:
    """The distillation in this process: all of it (``rank`` None), or one rank's part of a data-parallel run, of
    which rank 0 writes the model, history and curves and returns the result (the other ranks return None)."""
    out_dir, train_path, eval_path = Path(out_dir), Path(train_path), Path(eval_path)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    teacher_cache_dir = Path(teacher_cache_dir) if teacher_cache_dir else None
    main = rank is None or rank.main
    progress = runtime.progress and main
    device = torch.device(rank.device) if rank else resolve_device(runtime.device)
    sharded = rank is not None and rank.world > 1 and runtime.distributed.strategy == "fsdp"
    load_to = torch.device("cpu") if sharded else device  # FSDP shards from the CPU and moves only the shards
    teacher = load_causal_lm(teacher_ref, dtype=models.dtype, device=load_to,
                             trust_remote_code=models.trust_remote_code, revision=models.revision, what="teacher")
    if student_ref == "derive":
        student, keep = derive_student(teacher, cfg.student, runtime.seed)
        origin = {"derived_from_teacher_layers": keep, "init": cfg.student.init}
    else:
        student = load_causal_lm(student_ref, dtype=models.dtype, device=load_to,
                                 trust_remote_code=models.trust_remote_code, revision=models.revision,
                                 what="student")
        origin = {"checkpoint": student_ref}
    check_same_vocab(teacher, student)
    teacher_params = count_parameters(teacher)
    train_ids, eval_ids = load_tokens(train_path), load_tokens(eval_path)
    if int(train_ids.max()) >= student.get_output_embeddings().weight.shape[0]:
        raise InputError("training tokens exceed the model's vocabulary: data tokenized with another tokenizer?")
    compile_ = (cfg.compile == "always" or (cfg.compile == "auto" and device.type == "cuda")) and not sharded
    train_topk = eval_topk = None
    topk_info = {}
    eval_rows = eval_ids[:EVAL_ROWS]  # what every held-out evaluation during training scores
    if cfg.teacher.source == "cached_topk":
        if teacher_cache_dir is None:
            raise InputError("distill.teacher.source cached_topk needs a cache folder (run it through the pipeline)")
        args = (cfg.teacher.topk, cfg.temperature, teacher_cache_dir)
        train_topk, reused_t = cached_teacher_topk(teacher, train_ids, *args, "train", cfg.batch_size, device,
                                                   progress, rank)
        eval_topk, reused_e = cached_teacher_topk(teacher, eval_rows, *args, "eval", cfg.batch_size, device, False,
                                                  rank)
        topk_info = {"teacher_topk": int(train_topk.topk_ids.shape[-1]), "teacher_topk_reused": reused_t and reused_e,
                     "teacher_topk_bytes": sum(t.numel() * t.element_size() for t in (*train_topk, *eval_topk))}
        if cfg.on_policy.share == 0:  # nothing needs the teacher any more: free its memory for the student
            del teacher
            teacher = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not sharded:
        student.to(device)
    path, why = loss_path(cfg, student)  # plain, chunked or fused (llm_compress/distill/step.py), for the metrics
    student_params = count_parameters(student)
    before: dict = {}  # the held-out figures of the starting weights, filled in by train
    history = train(student, train_ids, eval_ids, cfg, teacher=teacher, device=device, train_topk=train_topk,
                    eval_topk=eval_topk, seed=runtime.seed, progress=progress,
                    desc=f"distill ({cfg.divergence.name})", checkpoint_dir=checkpoint_dir, eval_rows=EVAL_ROWS,
                    compile=compile_, rank=rank, strategy=runtime.distributed.strategy, eval_before=before)
    compute = {"processes": rank.world if rank else 1, "devices": devices(rank) if rank else [str(device)],
               **({"strategy": runtime.distributed.strategy} if rank else {})}
    final = _whole(student, models) if sharded else student.cpu()  # FSDP: every rank gathers, rank 0 keeps it
    if not main:
        return None
    model_dir = out_dir / "model"
    save_pretrained_atomic_into(final, load_tokenizer(tokenizer_ref, trust_remote_code=models.trust_remote_code,
                                                      revision=models.revision), model_dir)
    resumed_from = next((r["resumed_from"] for r in history if "resumed_from" in r), None)
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the finished model supersedes it
    outputs = {"model": "model", **save_history(history, out_dir, f"distill: {cfg.divergence.name}")}
    last = history[-1]
    metrics = {
        "student": origin, "student_params": student_params, "teacher_params": teacher_params,
        "teacher_signal": cfg.teacher.source, **topk_info, "on_policy_share": cfg.on_policy.share,
        "on_policy_batches": sum(r.get("on_policy", 0) for r in history), "compiled": compile_,
        "loss_path": path, **({"loss_path_note": why} if why else {}),
        "steps": cfg.steps, "tokens_seen": cfg.steps * cfg.batch_size * cfg.grad_accum * train_ids.shape[1],
        "tokens_per_s": round(last["tokens_per_s"], 1), "resumed_from_step": resumed_from,
        "eval_kd_before": round(before.get("eval_kd", float("nan")), 5), "eval_kd_after": round(last["eval_kd"], 5),
        "eval_ppl_before": round(before["eval_ppl"], 3), "eval_ppl_after": round(last["eval_ppl"], 3),
    }
    return StageResult(outputs=outputs, metrics=metrics, compute=compute)
