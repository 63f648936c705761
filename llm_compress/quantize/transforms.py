"""OSTQuant-style equivalent transforms (learnable rotations + smoothing scales) for Llama-family decoders.

Supported: transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (``check_supported``). Layout:
``model.model.embed_tokens``, ``model.model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.model.norm``, ``model.lm_head``.

Conventions:
- A Linear computes y = x @ W.T + b with W [out, in]; activations are row vectors [tokens, features].
- D = hidden size, I = intermediate size, Hq / Hkv = query / KV heads, d = head_dim, n_rep = Hq // Hkv. Query head h
  reads KV head h // n_rep (HF ``repeat_kv``).
- RMSNorm(h) = w * h / rms(h). After ``fold_rmsnorm`` every norm weight is 1, so a rotation R of the residual stream
  commutes with the norm (rms(h R) = rms(h)).
- Transforms, for one layer (notes section 2.1; all applied by ``transformed_weights``):
    residual stream h -> h R_res:    W_embed <- W_embed R, W_{q,k,v,gate,up,lm_head} <- W R,
                                     W_{o,down} <- R^T W,  b_{o,down} <- R^T b
    S_norm_qkv (in rotated space):   input_layernorm.weight <- 1 / S,  W_{q,k,v}[:, j] <- W[:, j] S_j
    S_norm_upgate:                   post_attention_layernorm.weight <- 1 / S,  W_{gate,up}[:, j] <- W[:, j] S_j
    S_qk (per k channel, [Hkv, d]):  W_k rows * S, W_q rows / S (expanded over the n_rep query heads of a KV head)
    S_ov (per v channel):            W_v rows / S, W_o columns * S
    R_ov (per KV head, [d, d]):      v_g <- v_g R_g:  W_v[g] <- R_g^T W_v[g],
                                     W_o[:, head h] <- W_o[:, head h] R_g  (g = h // n_rep)
    S_up_down (per I channel):       W_up rows / S, W_down columns * S
    online Hadamard H [I, I]:        down_proj computes (x @ H) W_down'^T, so W_down' <- W_down H
  Biases on the output side of a transformed row follow their rows (Qwen2 q/k/v biases, Llama attention/mlp bias).
  Order within one weight: S_up_down / S_qk / S_ov, then R_res, then R_ov, then S_norm (the notes' fusion order).
- S_qk scales q and k *before* RoPE. It is stored as [Hkv, d/2] and repeated on both halves, so the scale is equal on
  each rotary pair (i, i + d/2) and commutes with RoPE: the transform is exact, not only in training.
- Scales are stored as log-scales (``log_s_*``, init 0) so S = exp(log_s) stays positive under any optimiser; the
  reference implementation stores raw scales.
- ``transformed_weights`` is differentiable (for ``torch.func.functional_call``); ``fuse_transforms_`` writes the
  same weights in float64 math into the model. Both need a folded model (``fold_rmsnorm``) when params are given.

Online Hadamard installation: ``install_online_hadamard`` swaps each ``mlp.down_proj`` for a
``HadamardInputLinear`` (an ``nn.Linear`` subclass computing F.linear(x @ H, W, b)). Parameter names stay
``...mlp.down_proj.weight``/``bias``, so state_dicts, ``functional_call`` and RTN (``isinstance(m, nn.Linear)``) keep
working, and it exports to ONNX as an extra MatMul. H is a non-persistent buffer shared by all layers: it is NOT
saved by ``save_pretrained`` and a stock ``from_pretrained`` gives a plain Linear, i.e. a wrong model. After loading,
call ``install_online_hadamard(model, random_rotation(I, seed))`` with the same (I, seed), recorded next to the
weights. Forward hooks on down_proj see the input *before* H (use ``.online_hadamard`` for the matmul's input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_compress.errors import InputError
from llm_compress.quantize.hadamard import OnlineHadamard, random_rotation
from llm_compress.quantize.support import SUPPORTED_MODEL_TYPES


# ------------------------------------------------------------------ model checks

@dataclass(frozen=True)
class ModelDims:
    hidden: int          # D
    intermediate: int    # I
    n_layers: int        # L
    n_heads: int         # Hq
    n_kv_heads: int      # Hkv
    head_dim: int        # d

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


def check_supported(model: nn.Module) -> ModelDims:
    """Raise InputError unless ``model`` is a Llama/Mistral/Qwen2 causal LM with RMSNorms; returns its dimensions."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"OST transforms support model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"got model_type={mt!r} ({type(model).__name__})")
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or len(layers) == 0 or not hasattr(model, "lm_head"):
        raise InputError(f"{type(model).__name__}: expected model.model.layers and model.lm_head")
    hidden = base.embed_tokens.weight.shape[1]
    norms = [("model.norm", base.norm)]
    for i, layer in enumerate(layers):
        norms += [(f"model.layers.{i}.input_layernorm", layer.input_layernorm),
                  (f"model.layers.{i}.post_attention_layernorm", layer.post_attention_layernorm)]
    for name, norm in norms:
        w = getattr(norm, "weight", None)
        if (not type(norm).__name__.endswith("RMSNorm") or getattr(norm, "bias", None) is not None
                or w is None or tuple(w.shape) != (hidden,)):
            raise InputError(f"{name} is {type(norm).__name__}, not an RMSNorm with a [{hidden}] weight and no bias; "
                             "OST transforms need RMSNorm (a mean-subtracting LayerNorm does not commute with "
                             "rotations)")
    attn = layers[0].self_attn
    n_heads = attn.q_proj.out_features // attn.head_dim
    n_kv = attn.k_proj.out_features // attn.head_dim
    if attn.head_dim % 2 or n_heads % n_kv:
        raise InputError(f"unsupported attention shape: head_dim {attn.head_dim}, {n_heads} heads, {n_kv} KV heads")
    return ModelDims(hidden, layers[0].mlp.down_proj.in_features, len(layers), n_heads, n_kv, attn.head_dim)


def _norms(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(norm, linears reading it): input_layernorm -> q,k,v; post_attention -> gate,up; model.norm -> lm_head."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
                (layer.post_attention_layernorm, [m.gate_proj, m.up_proj])]
    out.append((model.model.norm, [model.lm_head]))
    return out


def _is_tied(model: nn.Module) -> bool:
    e, h = model.model.embed_tokens.weight, model.lm_head.weight
    return e is h or e.data_ptr() == h.data_ptr()


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embeddings, set config.tie_word_embeddings=False; True if it was tied."""
    if not _is_tied(model):
        return False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(),
                                        requires_grad=model.lm_head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_cfg is not None:
        text_cfg.tie_word_embeddings = False
    return True


@torch.no_grad()
def fold_rmsnorm(model: nn.Module) -> None:
    """Fold every RMSNorm weight into the linears reading it (W[:, j] *= w_j, float64 math) and set the norms to 1.

    input_layernorm -> q, k, v; post_attention_layernorm -> gate, up; model.norm -> lm_head (untied first). Exact:
    (h / rms(h) * w) W^T = (h / rms(h)) (W diag(w))^T. Idempotent.
    """
    check_supported(model)
    untie_lm_head(model)
    for norm, linears in _norms(model):
        w = norm.weight.double()  # [D]
        for lin in linears:
            lin.weight.copy_(lin.weight.double() * w[None, :])  # [out, D]
        norm.weight.fill_(1.0)


def _check_folded(model: nn.Module) -> None:
    if _is_tied(model):
        raise InputError("lm_head is tied to embed_tokens: call fold_rmsnorm(model) before applying OST transforms")
    for norm, _ in _norms(model):
        if not bool(torch.all(norm.weight == 1)):
            raise InputError("RMSNorm weights are not 1: call fold_rmsnorm(model) first (or transforms were already "
                             "fused into this model)")


# ------------------------------------------------------------------ online Hadamard on down_proj

class HadamardInputLinear(nn.Linear):
    """nn.Linear whose input first goes through a fixed orthogonal matrix: y = (x @ H) W^T + b, x [..., in].

    Keeps the wrapped Linear's ``weight``/``bias`` Parameters (same names in the state_dict); H lives in the child
    module ``online_hadamard`` (non-persistent buffer, shared by all layers).
    """

    def __init__(self, linear: nn.Linear, online_hadamard: OnlineHadamard):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        if online_hadamard.size != linear.in_features:
            raise InputError(f"online Hadamard of size {online_hadamard.size} does not match down_proj input "
                             f"size {linear.in_features}")
        self.weight = linear.weight
        self.bias = linear.bias
        self.online_hadamard = online_hadamard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.online_hadamard(x), self.weight, self.bias)


def get_online_hadamard(model: nn.Module) -> torch.Tensor | None:
    """The [I, I] matrix installed before down_proj, or None (raises if only some layers have one)."""
    found = [isinstance(layer.mlp.down_proj, HadamardInputLinear) for layer in model.model.layers]
    if not any(found):
        return None
    if not all(found):
        raise InputError("an online Hadamard is installed on only some down_proj layers")
    return model.model.layers[0].mlp.down_proj.online_hadamard.matrix


def install_online_hadamard(model: nn.Module, matrix: torch.Tensor) -> OnlineHadamard:
    """Replace every ``mlp.down_proj`` by a HadamardInputLinear applying ``matrix`` [I, I] to its input.

    Does not touch W_down: the model computes a different function until W_down absorbs H (``transformed_weights``
    / ``fuse_transforms_`` with ``online_down=matrix`` do that). Returns the shared OnlineHadamard module.
    """
    dims = check_supported(model)
    if get_online_hadamard(model) is not None:
        raise InputError("an online Hadamard is already installed on down_proj")
    if tuple(matrix.shape) != (dims.intermediate, dims.intermediate):
        raise InputError(f"online Hadamard must be [{dims.intermediate}, {dims.intermediate}] (the down_proj input "
                         f"size), got {tuple(matrix.shape)}")
    w = model.model.layers[0].mlp.down_proj.weight
    had = OnlineHadamard(matrix.detach().to(device=w.device, dtype=w.dtype if w.is_floating_point() else None))
    for layer in model.model.layers:
        layer.mlp.down_proj = HadamardInputLinear(layer.mlp.down_proj, had)
    return had


def _check_online(model: nn.Module, online_down: torch.Tensor | None) -> None:
    installed = get_online_hadamard(model)
    if online_down is None and installed is not None:
        raise InputError("an online Hadamard is installed on down_proj: pass it as online_down so W_down absorbs it")
    if online_down is not None:
        if installed is None:
            raise InputError("online_down given but not installed: call install_online_hadamard(model, H) first")
        if installed.shape != online_down.shape:
            raise InputError(f"online_down {tuple(online_down.shape)} differs from the installed "
                             f"{tuple(installed.shape)}")


# ------------------------------------------------------------------ learnable parameters

class OSTParams(nn.Module):
    """Learnable OSTQuant transforms for one model (notes section 2.1).

    Parameters (absent ones are None; L layers):
      r_res            [D, D]             global residual rotation (orthogonal; optimise with CayleyAdam)
      r_ov             [L, Hkv, d, d]     per layer, per KV head value/output rotation (orthogonal)
      log_s_norm_qkv   [L, D]             log S_norm_qkv  (S_attn in the paper)
      log_s_norm_upgate[L, D]             log S_norm_upgate (S_ffn)
      log_s_qk         [L, Hkv, d/2]      log S_qk, shared by each rotary pair (i, i + d/2)
      log_s_ov         [L, Hkv * d]       log S_ov
      log_s_up_down    [L, I]             log S_up_down
    Init: r_res = random Hadamard (``init="klt"``: eigenvectors of the covariance of all q/k/v/gate/up weight rows
    times a random Hadamard; needs a folded model), r_ov = random Hadamard of size d, scales 1 (log 0). Sizes without
    a Hadamard fall back to a random orthogonal matrix.
    """

    def __init__(self, model: nn.Module, *, rotate_res: bool = True, rotate_ov: bool = True, smooth_norm: bool = True,
                 smooth_qk: bool = True, smooth_ov: bool = True, smooth_up_down: bool = True, init: str = "hadamard",
                 seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        dims = check_supported(model)
        if init not in ("hadamard", "klt"):
            raise InputError(f"OSTParams init must be 'hadamard' or 'klt', got {init!r}")
        self.dims = dims
        L, D, I, kv, d = dims.n_layers, dims.hidden, dims.intermediate, dims.n_kv_heads, dims.head_dim
        dev = model.model.embed_tokens.weight.device

        def par(t: torch.Tensor | None) -> nn.Parameter | None:
            return None if t is None else nn.Parameter(t.to(device=dev, dtype=dtype))

        r_res = None
        if rotate_res:
            r_res = random_rotation(D, seed)  # [D, D] float64
            if init == "klt":
                r_res = _klt(model) @ r_res
        self.r_res = par(r_res)
        r_ov = None
        if rotate_ov:  # [L, Hkv, d, d], a different random sign pattern per (layer, head)
            r_ov = torch.stack([random_rotation(d, seed + 1 + i) for i in range(L * kv)]).reshape(L, kv, d, d)
        self.r_ov = par(r_ov)
        self.log_s_norm_qkv = par(torch.zeros(L, D) if smooth_norm else None)
        self.log_s_norm_upgate = par(torch.zeros(L, D) if smooth_norm else None)
        self.log_s_qk = par(torch.zeros(L, kv, d // 2) if smooth_qk else None)
        self.log_s_ov = par(torch.zeros(L, kv * d) if smooth_ov else None)
        self.log_s_up_down = par(torch.zeros(L, I) if smooth_up_down else None)

    def rotations(self) -> list[nn.Parameter]:
        """The orthogonal parameters (for CayleyAdam / CayleySGD)."""
        return [p for p in (self.r_res, self.r_ov) if p is not None]

    def scales(self) -> list[nn.Parameter]:
        """The log-scale parameters (for Adam)."""
        return [p for p in (self.log_s_norm_qkv, self.log_s_norm_upgate, self.log_s_qk, self.log_s_ov,
                            self.log_s_up_down) if p is not None]

    def qk_scale(self, layer: int) -> torch.Tensor:
        """S_qk of one layer as [Hkv, d]: each half-dim scale repeated at i and i + d/2."""
        s = self.log_s_qk[layer].exp()  # [Hkv, d/2]
        return torch.cat([s, s], dim=-1)


@torch.no_grad()
def _klt(model: nn.Module) -> torch.Tensor:
    """Eigenvectors [D, D] (columns) of the covariance of all q/k/v/gate/up weight rows (float64)."""
    _check_folded(model)
    rows = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        rows += [lin.weight.double() for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)]
    w = torch.cat(rows)  # [sum_out, D]
    cov = torch.cov(w.T)  # [D, D], rows centred
    return torch.linalg.eigh(cov).eigenvectors


# ------------------------------------------------------------------ applying the transforms

def transformed_weights(model: nn.Module, params: OSTParams | None, online_down: torch.Tensor | None,
                        *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Transformed weights/biases (and norm weights) by parameter name; differentiable w.r.t. ``params``.

    Use as ``torch.func.functional_call(model, {**dict(model.named_parameters()), **out}, args)``. With no
    quantisation the result equals the original model for any parameter values (up to float rounding). ``params``
    None: only W_down absorbs ``online_down`` (the original function of a model with H installed, e.g. a teacher).
    Math runs in ``dtype`` (default: the params' dtype, float32 without params); results are cast to each weight's
    dtype. Requires a folded model when params are given, and ``online_down`` installed iff given. Freeze the
    model (``model.requires_grad_(False)``) when training so that only ``params`` receive gradients.
    """
    dims = check_supported(model)
    _check_online(model, online_down)
    if params is not None:
        _check_folded(model)
        if params.dims != dims:
            raise InputError(f"OSTParams were built for {params.dims}, the model is {dims}")
    if dtype is None:
        own = list(params.parameters()) if params is not None else []
        dtype = own[0].dtype if own else torch.float32
    cd = dtype
    D, kv, hq, d, n_rep = dims.hidden, dims.n_kv_heads, dims.n_heads, dims.head_dim, dims.n_rep
    out: dict[str, torch.Tensor] = {}

    def put(name: str, value: torch.Tensor | None, like: torch.Tensor | None) -> None:
        if value is not None and like is not None:
            out[name] = value.to(like.dtype)

    def wb(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        return lin.weight.to(cd), None if lin.bias is None else lin.bias.to(cd)

    H = None if online_down is None else online_down.to(device=model.lm_head.weight.device, dtype=cd)  # [I, I]
    if params is None:
        for i, layer in enumerate(model.model.layers):
            down = layer.mlp.down_proj
            put(f"model.layers.{i}.mlp.down_proj.weight", down.weight.to(cd) @ H if H is not None else None,
                down.weight)
        return out

    R = None if params.r_res is None else params.r_res.to(cd)  # [D, D]
    if R is not None:
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        put("model.embed_tokens.weight", emb.to(cd) @ R, emb)  # [V, D]
        put("lm_head.weight", head.to(cd) @ R, head)  # [V, D]

    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        # ---- attention: wq [Hq*d, D], wk/wv [Hkv*d, D], wo [D, Hq*d]
        wq, bq = wb(attn.q_proj)
        wk, bk = wb(attn.k_proj)
        wv, bv = wb(attn.v_proj)
        wo, bo = wb(attn.o_proj)
        if params.log_s_qk is not None:
            s = params.qk_scale(i).to(cd)  # [Hkv, d]
            sq = s.repeat_interleave(n_rep, dim=0).reshape(-1)  # [Hq*d]
            s = s.reshape(-1)  # [Hkv*d]
            wk = wk * s[:, None]
            wq = wq / sq[:, None]
            bk = None if bk is None else bk * s
            bq = None if bq is None else bq / sq
        if params.log_s_ov is not None:
            s = params.log_s_ov[i].exp().to(cd)  # [Hkv*d]
            so = s.view(kv, d).repeat_interleave(n_rep, dim=0).reshape(-1)  # [Hq*d]
            wv = wv / s[:, None]
            bv = None if bv is None else bv / s
            wo = wo * so[None, :]
        if R is not None:
            wq, wk, wv = wq @ R, wk @ R, wv @ R
            wo = R.T @ wo
            bo = None if bo is None else bo @ R
        if params.r_ov is not None:
            r = params.r_ov[i].to(cd)  # [Hkv, d, d]
            wv = (r.transpose(-1, -2) @ wv.view(kv, d, D)).reshape(kv * d, D)  # v_g -> v_g R_g
            bv = None if bv is None else (bv.view(kv, 1, d) @ r).reshape(kv * d)
            rq = r.repeat_interleave(n_rep, dim=0)  # [Hq, d, d]
            wo = torch.einsum("ehi,hij->ehj", wo.view(D, hq, d), rq).reshape(D, hq * d)
        if params.log_s_norm_qkv is not None:
            s = params.log_s_norm_qkv[i].exp().to(cd)  # [D]
            wq, wk, wv = wq * s[None, :], wk * s[None, :], wv * s[None, :]
            put(p + "input_layernorm.weight", 1.0 / s, layer.input_layernorm.weight)
        for name, w, b in (("q_proj", wq, bq), ("k_proj", wk, bk), ("v_proj", wv, bv), ("o_proj", wo, bo)):
            lin = getattr(attn, name)
            put(p + f"self_attn.{name}.weight", w, lin.weight)
            put(p + f"self_attn.{name}.bias", b, lin.bias)
        # ---- MLP: wg/wu [I, D], wd [D, I]
        wg, bg = wb(mlp.gate_proj)
        wu, bu = wb(mlp.up_proj)
        wd, bd = wb(mlp.down_proj)
        if params.log_s_up_down is not None:
            s = params.log_s_up_down[i].exp().to(cd)  # [I]
            wu = wu / s[:, None]
            bu = None if bu is None else bu / s
            wd = wd * s[None, :]
        if H is not None:
            wd = wd @ H  # down sees (x @ H): (x H) (W H)^T = x W^T
        if R is not None:
            wg, wu = wg @ R, wu @ R
            wd = R.T @ wd
            bd = None if bd is None else bd @ R
        if params.log_s_norm_upgate is not None:
            s = params.log_s_norm_upgate[i].exp().to(cd)  # [D]
            wg, wu = wg * s[None, :], wu * s[None, :]
            put(p + "post_attention_layernorm.weight", 1.0 / s, layer.post_attention_layernorm.weight)
        for name, w, b in (("gate_proj", wg, bg), ("up_proj", wu, bu), ("down_proj", wd, bd)):
            lin = getattr(mlp, name)
            put(p + f"mlp.{name}.weight", w, lin.weight)
            put(p + f"mlp.{name}.bias", b, lin.bias)
    return out


@torch.no_grad()
def fuse_transforms_(model: nn.Module, params: OSTParams | None, online_down: torch.Tensor | None) -> None:
    """Write the transformed weights into ``model`` in place (float64 math), installing ``online_down`` if needed.

    Afterwards the model is a standard HF model (norm weights 1/S_norm) plus the online Hadamard on down_proj, and
    computes the original function. ``params`` are consumed: do not apply them again to this model.
    """
    if online_down is not None and get_online_hadamard(model) is None:
        install_online_hadamard(model, online_down)
    new = transformed_weights(model, params, online_down, dtype=torch.float64)
    named = dict(model.named_parameters())
    for name, value in new.items():
        named[name].copy_(value)


# ------------------------------------------------------------------ optimisers

def cayley_retraction(x: torch.Tensor, a: torch.Tensor, lr: float) -> torch.Tensor:
    """(I + lr/2 A)^-1 (I - lr/2 A) X for skew A [..., n, n] and X [..., n, n]; orthogonal if X is (Wen & Yin 2013)."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye + 0.5 * lr * a, (eye - 0.5 * lr * a) @ x)


class _CayleyOptimizer(torch.optim.Optimizer):
    """Shared loop of the Cayley optimisers: skew gradient A = G X^T - X G^T, a step direction, retraction."""

    def _direction(self, p: torch.Tensor, a: torch.Tensor, group: dict) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() < 2 or p.shape[-1] != p.shape[-2]:
                    raise InputError(f"{type(self).__name__} parameters must be [..., n, n], got {tuple(p.shape)}")
                x, g = p.double(), p.grad.double()  # [..., n, n]
                a = g @ x.mT - x @ g.mT  # [..., n, n] skew
                x = cayley_retraction(x, self._direction(p, a, group), group["lr"])
                if group["reorthogonalize"]:  # one Newton-Schulz step removes float32 round-off drift
                    x = 0.5 * x @ (3 * torch.eye(x.shape[-1], dtype=x.dtype, device=x.device) - x.mT @ x)
                p.copy_(x)
        return loss


class CayleySGD(_CayleyOptimizer):
    """Riemannian SGD (with optional momentum) on the orthogonal group, Cayley retraction, float64 math.

    For a parameter X [..., n, n] (a batch of orthogonal matrices) with Euclidean gradient G:
        A = G X^T - X G^T                (skew; the Riemannian gradient is A X)
        M = momentum * M + A             (momentum kept in the skew/Lie-algebra form, valid at any X)
        X <- (I + lr/2 M)^-1 (I - lr/2 M) X
    then (``reorthogonalize``) one Newton-Schulz step X <- X (3 I - X^T X) / 2 removes float32 round-off drift.
    The step direction is a descent direction: d/dlr f at 0 = -||A||^2 / 2. As in SpinQuant's SGDG / Wen & Yin (2013),
    but with an exact solve instead of a fixed-point iteration.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, reorthogonalize: bool = True):
        if lr <= 0 or not 0 <= momentum < 1:
            raise InputError(f"CayleySGD needs lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, reorthogonalize=reorthogonalize))

    def _direction(self, p: torch.Tensor, a: torch.Tensor, group: dict) -> torch.Tensor:
        if not group["momentum"]:
            return a
        buf = self.state[p].get("momentum_buffer")
        a = a if buf is None else buf.mul_(group["momentum"]).add_(a)
        self.state[p]["momentum_buffer"] = a
        return a


class CayleyAdam(_CayleyOptimizer):
    """Adam on the orthogonal group: Adam's moments kept in the Lie algebra, Cayley retraction, float64 math.

    For X [..., n, n] with Euclidean gradient G:
        A = G X^T - X G^T                            (skew; the Riemannian gradient is A X)
        M = b1 M + (1 - b1) A,  V = b2 V + (1 - b2) A * A          (elementwise; V is symmetric, M skew)
        D = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps)         (skew: elementwise ratio of skew by symmetric)
        X <- (I + lr/2 D)^-1 (I - lr/2 D) X
    Like the reference code's RiemannianAdam, the step size is set by ``lr`` and not by the gradient's scale,
    which matters here: calibration losses (a KL of ~1e-3) give tiny Euclidean gradients, under which a plain
    Riemannian SGD step at the paper's learning rate does not move. Moments expressed in the Lie algebra stay
    valid at the new point (right-multiplying by X transports them), so no explicit transport is needed.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 reorthogonalize: bool = True):
        if lr <= 0 or not all(0 <= b < 1 for b in betas):
            raise InputError(f"CayleyAdam needs lr > 0 and betas in [0, 1), got lr={lr}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, reorthogonalize=reorthogonalize))

    def _direction(self, p: torch.Tensor, a: torch.Tensor, group: dict) -> torch.Tensor:
        b1, b2 = group["betas"]
        st = self.state[p]
        if not st:
            st["t"], st["m"], st["v"] = 0, torch.zeros_like(a), torch.zeros_like(a)
        st["t"] += 1
        st["m"].mul_(b1).add_(a, alpha=1 - b1)
        st["v"].mul_(b2).addcmul_(a, a, value=1 - b2)
        return (st["m"] / (1 - b1 ** st["t"])) / ((st["v"] / (1 - b2 ** st["t"])).sqrt() + group["eps"])


def build_optimizers(params: OSTParams, rotate_lr: float = 0.016, smooth_lr: float = 0.0018,
                     momentum: float = 0.0, rotation_optimizer: str = "adam") -> list[torch.optim.Optimizer]:
    """Cayley Adam (or SGD) for the rotations and Adam for the log-scales (lrs from the notes' OSTQuant scripts).

    Call ``step()``/``zero_grad()`` on each.
    """
    opts: list[torch.optim.Optimizer] = []
    if params.rotations():
        if rotation_optimizer == "adam":
            opts.append(CayleyAdam(params.rotations(), lr=rotate_lr))
        else:
            opts.append(CayleySGD(params.rotations(), lr=rotate_lr, momentum=momentum))
    if params.scales():
        opts.append(torch.optim.Adam(params.scales(), lr=smooth_lr))
    return opts


__all__ = ["SUPPORTED_MODEL_TYPES", "ModelDims", "check_supported", "untie_lm_head", "fold_rmsnorm",
           "HadamardInputLinear", "get_online_hadamard", "install_online_hadamard", "OSTParams",
           "transformed_weights", "fuse_transforms_", "cayley_retraction", "CayleySGD", "CayleyAdam",
           "build_optimizers"]
