"""Knowledge distillation: train a student to match the teacher's next-token distributions."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from stages.config import DeriveStudent, DistillConfig, ModelsConfig, RuntimeConfig
from stages.data import load_tokens
from stages.distill.trainer import TrainSpec, evaluate_loss, save_history, train
from stages.errors import InputError
from stages.modeling import (check_same_vocab, count_parameters, load_causal_lm, resolve_device,
                             save_pretrained_atomic_into)
from stages.result import StageResult


def _decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InputError(f"cannot derive a student from {type(model).__name__}: expected a decoder with "
                         "model.layers (Llama, Mistral, Qwen2 layouts)")
    return layers


def derive_student(teacher, spec: DeriveStudent, seed: int = 0):
    """A shallower copy of the teacher: keep some decoder layers, optionally with their weights."""
    from transformers import AutoModelForCausalLM

    n = len(_decoder_layers(teacher))
    keep = list(range(0, n, 2)) if spec.layers == "every_other" else list(spec.layers)
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep or len(set(keep)) != len(keep):
        raise InputError(f"distill.student.layers: {spec.layers} must be distinct indices in [0, {n}) "
                         f"(the teacher has {n} layers)")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(keep)
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


def run(cfg: DistillConfig, models: ModelsConfig, runtime: RuntimeConfig, *, teacher_ref: str,
        student_ref: str, tokenizer, train_path: Path, eval_path: Path, out_dir: Path,
        checkpoint_dir: Path | None = None) -> StageResult:
    device = resolve_device(runtime.device)
    teacher = load_causal_lm(teacher_ref, dtype=models.dtype, device=device,
                             trust_remote_code=models.trust_remote_code, revision=models.revision, what="teacher")
    if student_ref == "derive":
        student, keep = derive_student(teacher, cfg.student, runtime.seed)
        origin = {"derived_from_teacher_layers": keep, "init": cfg.student.init}
    else:
        student = load_causal_lm(student_ref, dtype=models.dtype, device=device,
                                 trust_remote_code=models.trust_remote_code, revision=models.revision,
                                 what="student")
        origin = {"checkpoint": student_ref}
    check_same_vocab(teacher, student)
    train_ids, eval_ids = load_tokens(train_path), load_tokens(eval_path)
    if int(train_ids.max()) >= student.get_output_embeddings().weight.shape[0]:
        raise InputError("training tokens exceed the model's vocabulary: data tokenized with another tokenizer?")
    spec = TrainSpec(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, grad_accum=cfg.grad_accum,
                     weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                     max_grad_norm=cfg.max_grad_norm, eval_every=cfg.eval_every, divergence=cfg.divergence,
                     divergence_params=dict(cfg.divergence_params), chunk=cfg.chunk, temperature=cfg.temperature,
                     ce_weight=cfg.ce_weight, seed=runtime.seed,
                     progress=runtime.progress, desc=f"distill ({cfg.divergence})",
                     checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                     checkpoint_every=cfg.checkpoint_every)
    student.to(device)
    before = evaluate_loss(student, eval_ids[: spec.eval_rows], cfg.batch_size, device, teacher, cfg.divergence,
                           cfg.temperature, dict(cfg.divergence_params))
    history = train(student, train_ids, eval_ids, spec, teacher=teacher, device=device)
    model_dir = out_dir / "model"
    save_pretrained_atomic_into(student.cpu(), tokenizer, model_dir)
    resumed_from = next((r["resumed_from"] for r in history if "resumed_from" in r), None)
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the finished model supersedes it
    outputs = {"model": "model", **save_history(history, out_dir, f"distill: {cfg.divergence}")}
    last = history[-1]
    metrics = {
        "student": origin, "student_params": count_parameters(student), "teacher_params": count_parameters(teacher),
        "steps": cfg.steps, "tokens_seen": cfg.steps * cfg.batch_size * cfg.grad_accum * train_ids.shape[1],
        "tokens_per_s": round(last["tokens_per_s"], 1), "resumed_from_step": resumed_from,
        "eval_kd_before": round(before.get("eval_kd", float("nan")), 5), "eval_kd_after": round(last["eval_kd"], 5),
        "eval_ppl_before": round(before["eval_ppl"], 3), "eval_ppl_after": round(last["eval_ppl"], 3),
    }
    return StageResult(outputs=outputs, metrics=metrics)
