"""GPTQ weight quantization (Frantar et al. 2022), for single Linear weights and for Llama-family decoders.

Conventions:
- A Linear weight W is [out, in] (rows, columns); its inputs X are [n, in]. The Hessian proxy of the layer-wise loss
  ||X Wᵀ - X Qᵀ||² is H = 2/n Σ x xᵀ, [in, in]. Columns are quantized one at a time; the rounding error of column j
  is spread over the not-yet-quantized columns through the upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), in blocks of
  ``block_size`` columns with lazy updates of the columns after the block.
- Grids are those of ``quantizers.py`` (symmetric by default, per output channel or per group of ``group_size``
  consecutive *original* input columns). The (scale, zero) of a row-group is fixed the first time one of its
  columns is about to be quantized, from the weights as updated by the errors of all columns quantized so far
  (optionally with a per-row clip-ratio search); every column of the group then uses those params.
- Dead columns (H_jj = 0: the input is always zero) are set to zero and get H_jj = 1. Damping adds
  percdamp * mean(diag H) to the diagonal.
- act_order: columns are processed by descending diag(H) and unpermuted at the end. Groups stay contiguous in the
  original column order (what packed group-wise kernels expect, no g_idx), so the params of a group are fixed when
  its first column in the processing order comes up; its other columns, possibly in later blocks, are read with all
  error updates applied so far.
- ``gptq_quantize_model`` quantizes decoder layers one after another; the Hessians of layer i come from the
  outputs of the already quantized layers < i. With true_sequential (QuaRot's default) the sub-layers of a decoder
  layer are done in the order [q, k, v], [o], [gate, up], [down], each from inputs through the quantized earlier ones.
The outputs are fake-quantized (dequantized) weights of the input dtype, plus the (scale, zero) to pack them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llm_compress.errors import InputError
from llm_compress.progress import report as report_progress
from llm_compress.quantize.quantizers import _check_bits, _codes, _group_count, search_clip_ratio, weight_qparams


@dataclass
class GPTQResult:
    weight: torch.Tensor  # [out, in], dequantized, dtype of the input weight
    scale: torch.Tensor  # [out, groups, 1] float32, groups in original column order
    zero: torch.Tensor  # [out, groups, 1] float32 (0 when symmetric)
    loss: float  # GPTQ's estimate Σ (w - q)² / (2 [H⁻¹]_jj) of the added layer-wise loss
    codes: torch.Tensor | None = None  # [out, in] int8 (symmetric) / uint8: weight = (codes - zero) * scale


def _upper_cholesky_of_inverse(H: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """U with H⁻¹ = Uᵀ U for a damped, positive definite H [in, in] (float32); clear error if it is not."""
    hint = (f"GPTQ: the Hessian of {name} is not positive definite even after damping (percdamp={percdamp}); "
            "use more or more varied calibration samples, or a larger percdamp")
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise InputError(hint)
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0 or not torch.isfinite(U).all():
        raise InputError(hint)
    return U


@torch.no_grad()
def gptq_solve(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
               act_order: bool = False, percdamp: float = 0.01, block_size: int = 128, clip_search: bool = False,
               *, name: str = "a layer") -> GPTQResult:
    """GPTQ of one weight [out, in] with Hessian proxy H [in, in]; returns weight, scale, zero and loss."""
    _check_bits(bits, "weight")
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise InputError(f"GPTQ of {name}: need W [out, in] and H [in, in], got {tuple(W.shape)} and "
                         f"{tuple(H.shape)}")
    if percdamp < 0 or block_size < 1:
        raise InputError(f"GPTQ: percdamp must be >= 0 and block_size >= 1, got {percdamp}, {block_size}")
    rows, cols = W.shape
    n_groups = _group_count(cols, group_size, "weight")
    g = cols // n_groups
    dev = W.device

    Wq = W.detach().float().clone()  # [rows, cols], updated in place as errors are spread
    Hf = H.detach().to(device=dev, dtype=torch.float32).clone()  # [cols, cols]
    if not torch.isfinite(Hf).all():
        raise InputError(f"GPTQ: the Hessian of {name} has non-finite entries (overflow in the calibration pass?)")
    dead = torch.diag(Hf) == 0
    Hf[dead, dead] = 1.0
    Wq[:, dead] = 0.0

    perm = torch.argsort(torch.diag(Hf), descending=True) if act_order else torch.arange(cols, device=dev)
    invperm = torch.argsort(perm)
    Wq, Hf = Wq[:, perm], Hf[perm][:, perm]  # processing order from here on
    Hf.diagonal().add_(percdamp * torch.diag(Hf).mean())
    U = _upper_cholesky_of_inverse(Hf, percdamp, name)  # [cols, cols] upper triangular
    del Hf

    group_of = (perm // g).tolist()  # group (original order) of each processing position
    members = invperm.view(n_groups, g)  # [groups, g] processing positions of each group's columns
    members_max = members.amax(dim=1).tolist()
    scale = torch.zeros(rows, n_groups, 1, device=dev)
    zero = torch.zeros(rows, n_groups, 1, device=dev)
    ready = [False] * n_groups
    Q = torch.zeros_like(Wq)
    C = torch.zeros_like(Wq)  # the integer codes of Q
    loss = torch.zeros((), device=dev)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wq[:, i1:i2].clone()  # [rows, n] block, kept up to date within the block
        Err1 = torch.zeros_like(W1)  # [rows, n] scaled errors (w - q) / U_jj
        U1 = U[i1:i2, i1:i2]  # [n, n]
        for i in range(i2 - i1):
            k = group_of[i1 + i]
            if not ready[k]:
                # Current values of group k's columns: all unquantized; those past the block still lack the lazy
                # update of this block, which is applied here to exactly the columns needed.
                pos = members[k]  # [g] processing positions, all >= i1 + i
                if members_max[k] < i2:
                    cur = W1[:, pos - i1]  # [rows, g]
                else:
                    inb = pos < i2
                    cur = torch.empty(rows, g, device=dev)
                    cur[:, inb] = W1[:, pos[inb] - i1]
                    out = pos[~inb]
                    cur[:, ~inb] = Wq[:, out] - Err1[:, :i] @ U[i1:i1 + i][:, out]
                clip = search_clip_ratio(cur, bits, None, symmetric) if clip_search else 1.0  # [rows, 1, 1]
                s, z = weight_qparams(cur, bits, None, symmetric, clip)  # [rows, 1, 1] each
                scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
                ready[k] = True
            w = W1[:, i]  # [rows]
            d = U1[i, i]
            c = _codes(w, scale[:, k, 0], zero[:, k, 0], bits, symmetric)  # [rows] integers (float32)
            q = (c - zero[:, k, 0]) * scale[:, k, 0]  # [rows] fake-quantized
            Q[:, i1 + i], C[:, i1 + i] = q, c
            err = (w - q) / d  # [rows]
            loss += err.square().sum() / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # rank-1 update of the rest of the block
            Err1[:, i] = err
        Wq[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update of the columns after the block

    Q, C = Q[:, invperm], C[:, invperm]
    if not torch.isfinite(Q).all():
        raise InputError(f"GPTQ of {name} produced non-finite weights")
    return GPTQResult(Q.to(W.dtype), scale, zero, float(loss), C.to(torch.int8 if symmetric else torch.uint8))


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None,
                         symmetric: bool = True, act_order: bool = False, percdamp: float = 0.01,
                         block_size: int = 128, clip_search: bool = False) -> torch.Tensor:
    """GPTQ fake quantization of W [out, in] given H = 2/n Σ x xᵀ [in, in]; same shape and dtype back."""
    return gptq_solve(W, H, bits, group_size, symmetric, act_order, percdamp, block_size, clip_search).weight


# ----------------------------------------------------------------------------------------------------------------
# whole model

_TRUE_SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


class _HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over the inputs x [.., in] of one Linear, float32 on the weight's device."""

    def __init__(self, linear: nn.Linear):
        self.H = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        self.n = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # noqa: ARG002
        x = args[0].detach()
        online = getattr(module, "online_hadamard", None)
        if online is not None:  # a down_proj with an online Hadamard: its weight multiplies x @ H, not x
            x = online(x)
        x = x.reshape(-1, self.H.shape[0]).float()  # [m, in]
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H.addmm_(x.t(), x)

    def all_reduce(self) -> None:
        """The Hessian over every rank's inputs: the ranks' 2/n_r Σ x xᵀ weighted by their n_r, summed, over Σ n_r."""
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.H.device)
        self.H *= self.n
        torch.distributed.all_reduce(self.H)
        torch.distributed.all_reduce(n)
        self.n = int(n.item())
        self.H /= max(self.n, 1)


class _StopForward(Exception):
    pass


def _calibration_batches(calib_input_ids, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """[N, L] ids (or a sequence of [L] / [b, L] tensors, one batch each) -> list of [b, L] on device."""
    if isinstance(calib_input_ids, torch.Tensor):
        if calib_input_ids.dim() != 2 or calib_input_ids.shape[0] == 0:
            raise InputError(f"GPTQ calibration ids must be [n_samples, seq_len], got {tuple(calib_input_ids.shape)}")
        batches = list(calib_input_ids.split(batch_size))
    else:
        batches = [b if b.dim() == 2 else b.unsqueeze(0) for b in calib_input_ids]
    if not batches:
        raise InputError("GPTQ needs at least one calibration sample")
    return [b.to(device=device, dtype=torch.long) for b in batches]


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]):
    """Hidden states entering layer 0 and the other (args, kwargs) of every layer, per batch, from one fp pass."""
    inputs: list[torch.Tensor] = []
    extra: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def make_hook(idx: int):
        def hook(module, args, kwargs):  # noqa: ARG001
            hs = args[0] if args else kwargs["hidden_states"]
            rest = args[1:] if args else ()
            extra[idx].append((rest, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if idx == 0:
                inputs.append(hs)
            if idx == len(layers) - 1:
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return inputs, extra


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calib_input_ids, bits: int, group_size: int | None = None,
                        symmetric: bool = True, act_order: bool = False, percdamp: float = 0.01,
                        clip_search: bool = False, skip: Sequence[str] = ("lm_head",), batch_size: int = 8, *,
                        block_size: int = 128, true_sequential: bool = True,
                        log: Callable[[str], None] | None = None, codes: dict | None = None, rank=None) -> dict:
    """GPTQ every nn.Linear of the decoder layers of a Llama-family model in place, layer by layer.

    calib_input_ids: [N, L] token ids (split into batches of batch_size) or a sequence of [L] / [b, L] tensors.
    Linears whose full name ends with an entry of ``skip`` stay in floating point (lm_head is never touched).
    Returns {"layers": {name: relative error ||W - Q|| / ||W||}, "gptq_loss": {name: loss}, "quantized_params",
    "mean_rel_error"}, the first and last two as in ``rtn.quantize_model``; ``codes`` (if given) is filled as
    there.
    rank: one of several processes (``llm_compress.distributed.Rank``): it runs its share of the calibration batches
    (batch i on rank i % world), the Hessians are summed over the ranks (each weighted by its token count) before
    every solve, so each solve sees all the rows, and rank 0's solution is sent to every rank.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise InputError("GPTQ needs a Llama-family decoder (model.model.layers); "
                         f"got {type(model).__name__}")
    if batch_size < 1:
        raise InputError(f"GPTQ batch_size must be >= 1, got {batch_size}")
    device = model.get_input_embeddings().weight.device
    batches = _calibration_batches(calib_input_ids, batch_size, device)
    if rank is not None and rank.world > 1:
        batches = [batches[i] for i in rank.shard(len(batches))]
    was_training = model.training
    model.eval()
    try:
        inps, extra = _capture_layer_inputs(model, layers, batches)
        rel_errors: dict[str, float] = {}
        losses: dict[str, float] = {}
        n_params = 0
        prefix = next(n for n, m in model.named_modules() if m is layers)
        for i, layer in enumerate(layers):
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)
                       and not any(f"{prefix}.{i}.{n}".endswith(s) for s in skip)}
            steps = [[n for n in names if n in linears] for names in _TRUE_SEQUENTIAL] if true_sequential else []
            steps.append([n for n in linears if not any(n in s for s in steps)])  # everything else
            for names in (s for s in steps if s):
                acc = {n: _HessianAccumulator(linears[n]) for n in names}
                handles = [linears[n].register_forward_hook(acc[n]) for n in names]
                try:
                    for hs, (rest, kw) in zip(inps, extra[i]):
                        layer(hs, *rest, **kw)
                finally:
                    for h in handles:
                        h.remove()
                for n in names:
                    full = f"{prefix}.{i}.{n}"
                    w = linears[n].weight
                    if rank is not None and rank.world > 1:
                        acc[n].all_reduce()
                    res = gptq_solve(w.data, acc[n].H, bits, group_size, symmetric, act_order, percdamp, block_size,
                                     clip_search, name=full)
                    acc[n].H = None  # free before the next solve
                    if rank is not None and rank.world > 1:  # one solution everywhere: rank 0's
                        torch.distributed.broadcast(res.weight, src=0)
                    rel = (w.data.float() - res.weight.float()).norm() / w.data.float().norm().clamp_min(1e-12)
                    w.data.copy_(res.weight)
                    rel_errors[full] = round(rel.item(), 6)
                    losses[full] = res.loss
                    if codes is not None:
                        codes[full] = (res.codes, res.scale, res.zero)
                    n_params += w.numel()
                    if log is not None:
                        log(f"gptq {full}: rel_error={rel_errors[full]:.4g} loss={res.loss:.4g}")
            inps = [_layer_output(layer(hs, *rest, **kw)) for hs, (rest, kw) in zip(inps, extra[i])]
            report_progress((i + 1) / len(layers), f"gptq: layer {i + 1}/{len(layers)} solved")
    finally:
        model.train(was_training)
    if not rel_errors:
        raise InputError("GPTQ: no Linear layers to quantize (all skipped?)")
    return {"layers": rel_errors, "gptq_loss": losses, "quantized_params": n_params,
            "mean_rel_error": round(sum(rel_errors.values()) / len(rel_errors), 6)}
