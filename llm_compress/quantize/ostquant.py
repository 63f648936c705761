"""OSTQuant calibration: learn orthogonal + scaling transforms against the full-precision model, then fuse them.

Hu et al., "OstQuant: Refining Large Language Model Quantization with Orthogonal and Scaling Transformations for
Better Distribution Fitting" (ICLR 2025). The steps, on a Llama-family model (``transforms.check_supported``):

1. fold the RMSNorm weights into the following linears (exact);
2. install the online Hadamard on every down_proj input (exact: W_down absorbs its transpose);
3. learn the transforms (``transforms.OSTParams``: global residual rotation, per-head v/o rotations, smoothing
   scales) with the quantizers switched on: activations and KV fake-quantized per token with straight-through
   gradients, weights too when ``train_weight_quant`` (round-to-nearest with STE). Rotations are optimised on
   the orthogonal group (``CayleyAdam``), log-scales with Adam. The loss compares the quantized model's next-token
   distributions with the full-precision model's on calibration rows (``calibration_loss``);
4. fuse the transforms into the weights (float64), after which the model is a standard transformers model plus
   the online Hadamard, and computes the original function until its weights are quantized.

The teacher is the same model with its original weights, computed per batch without gradient, so no
full-precision copy of the model is kept.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from llm_compress.errors import TrainingError
from llm_compress.progress import report as report_progress
from llm_compress.quantize.fakequant import attach_fake_quant
from llm_compress.quantize.hadamard import random_rotation
from llm_compress.quantize.quantizers import QuantSetting, _weight_groups, fake_quant_round_ste
from llm_compress.quantize.transforms import (OSTParams, build_optimizers, check_supported, fold_rmsnorm,
                                              fuse_transforms_, install_online_hadamard, transformed_weights)

if TYPE_CHECKING:
    from llm_compress.quantize.config import OSTQuantConfig

LOSSES = ("kl_top", "kl", "mse")


def kl_top(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 1000) -> torch.Tensor:
    """KL-Top: forward KL restricted to the full-precision model's top-k tokens, mean over tokens.

        loss = (1 / N) sum_tokens sum_{i in TopK(teacher)} p_T(i) (log p_T(i) - log p_S(i))

    with p_T and p_S softmaxes over the whole vocabulary (not renormalised on the top k), as in the
    reference trainer's ``post_attn`` branch. k is clipped to the vocabulary. Logits [..., V]; returns a scalar.
    Only [N, k] slices and one logsumexp per model are formed besides the logits themselves.
    """
    vocab = teacher_logits.shape[-1]
    if student_logits.shape != teacher_logits.shape:
        raise TrainingError(f"kl_top: student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ")
    k = max(1, min(int(k), vocab))
    t = teacher_logits.reshape(-1, vocab).float()  # [N, V]
    s = student_logits.reshape(-1, vocab).float()  # [N, V]
    top_t, idx = t.topk(k, dim=-1)  # [N, k]
    log_p = top_t - t.logsumexp(-1, keepdim=True)  # [N, k] log p_T on its top k
    log_q = s.gather(-1, idx) - s.logsumexp(-1, keepdim=True)  # [N, k] log p_S there
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def calibration_loss(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     k: int = 1000) -> torch.Tensor:
    """kl_top (the paper's), kl (full forward KL(teacher || quantized)) or mse (of the logits), mean over tokens."""
    if name == "kl_top":
        return kl_top(student_logits, teacher_logits, k)
    if name == "kl":
        return kl_top(student_logits, teacher_logits, teacher_logits.shape[-1])
    if name == "mse":
        return F.mse_loss(student_logits.float(), teacher_logits.float(), reduction="none").sum(-1).mean() \
            / teacher_logits.shape[-1]
    raise TrainingError(f"unknown calibration loss {name!r}; choose one of {', '.join(LOSSES)}")


def _ste_weight_quant(weights: dict[str, torch.Tensor], setting: QuantSetting) -> dict[str, torch.Tensor]:
    """Round-to-nearest fake quantization of the decoder linears' weights, rounding passed straight through.

    Per output row (or row group), scales differentiable: the gradient sees how a transform changes the weights'
    ranges and so their rounding error (a whole-quantizer straight-through gradient would not).
    """
    out = dict(weights)
    for name, w in weights.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            x = _weight_groups(w, setting.w_group_size)  # [out, groups, g] float32
            out[name] = fake_quant_round_ste(x, setting.w_bits, setting.w_symmetric).reshape(w.shape).to(w.dtype)
    return out


def calibrate(model: torch.nn.Module, calib_ids: torch.Tensor, cfg: OSTQuantConfig, *, seed: int = 0,
              progress: bool = False, qsur_ids: torch.Tensor | None = None) -> dict:
    """Learn and fuse OSTQuant transforms into ``model`` in place; returns the history and the online Hadamard.

    cfg: the recipe's ``quantize.scheme`` (method ostquant); its weight quantizer is not run here.
    calib_ids: [rows, T] token ids. The model must be in float32 or float64 (the transforms are learnt in float32).
    Returns {"history": [...], "train_weight_quant": bool, "online_hadamard": {"size", "seed"} | None,
    "qsur_after": {site: QSUR of what the quantizer sees with the learnt transforms} (if ``qsur_ids`` given)}.
    """
    setting = cfg.quant_setting()
    dims = check_supported(model)
    device = model.lm_head.weight.device
    fold_rmsnorm(model)
    H = None
    if cfg.online_hadamard:
        H = random_rotation(dims.intermediate, seed + 7).to(torch.float32)  # [I, I]
        install_online_hadamard(model, H)
    model.requires_grad_(False)
    params = OSTParams(model, init=cfg.init, seed=seed, **cfg.transforms.model_dump())
    opts = build_optimizers(params, rotate_lr=cfg.rotate_lr, smooth_lr=cfg.smooth_lr)
    wquant = cfg.train_weight_quant
    if wquant is None:
        wquant = setting.a_bits >= 16 and setting.w_bits < 16
    named = dict(model.named_parameters())
    teacher_weights = transformed_weights(model, None, H) if H is not None else {}  # the original function
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    bar = tqdm(range(cfg.steps), desc="ostquant", disable=not progress, unit="step")
    handle = attach_fake_quant(model, QuantSetting(a_bits=setting.a_bits, kv_bits=setting.kv_bits,
                                                   a_symmetric=setting.a_symmetric,
                                                   kv_symmetric=setting.kv_symmetric),
                               a_clip_ratio=cfg.a_clip_ratio, kv_group_size=cfg.kv_group_size)
    try:
        for step in bar:
            rows = torch.randint(0, len(calib_ids), (cfg.batch_size,), generator=gen)
            ids = calib_ids[rows].to(device).long()  # [B, T]
            with torch.no_grad(), handle.paused():  # the full-precision model is the teacher
                t_logits = functional_call(model, {**named, **teacher_weights}, (ids,)).logits  # [B, T, V]
            w = transformed_weights(model, params, H)
            if wquant:
                w = _ste_weight_quant(w, setting)
            s_logits = functional_call(model, {**named, **w}, (ids,)).logits  # [B, T, V]
            loss = calibration_loss(cfg.loss, s_logits, t_logits, cfg.topk)
            if not torch.isfinite(loss):
                raise TrainingError(f"ostquant: calibration loss is {loss.item()} at step {step + 1}; lower "
                                    "quantize.scheme.rotate_lr / smooth_lr")
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            history.append({"step": step + 1, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            report_progress((step + 1) / cfg.steps, f"ostquant: step {step + 1}/{cfg.steps}, loss {loss.item():.4f}")
    finally:
        handle.remove()
    qsur_after = {}
    if qsur_ids is not None:
        from llm_compress.quantize.qsur import layer_qsur

        with torch.no_grad():  # measured before fusing: the "/ost" pass applies the learnt transforms
            q = layer_qsur(model, qsur_ids.to(device), params)
        qsur_after = {k[: -len("/ost")]: v for k, v in q.items() if k.endswith("/ost")}
    with torch.no_grad():
        fuse_transforms_(model, params, H)
    return {"history": history, "train_weight_quant": wquant, "qsur_after": qsur_after,
            "online_hadamard": None if H is None else {"size": dims.intermediate, "seed": seed + 7}}


def loss_summary(history: list[dict], window: int = 10) -> dict:
    """First and last (mean of ``window`` steps) calibration losses."""
    if not history:
        return {}
    window = max(1, min(window, len(history) // 2))  # the two windows never overlap (unless one step)
    first = sum(r["loss"] for r in history[:window]) / window
    last = sum(r["loss"] for r in history[-window:]) / window
    return {"loss_first": round(first, 6), "loss_last": round(last, 6),
            "loss_reduction": round(1 - last / first, 4) if first > 0 and math.isfinite(first) else None}
