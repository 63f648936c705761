"""CSKV: channel shrinking. Tokens older than an exact recent window are stored as low-rank features of their
pre-RoPE keys and of their values, and rebuilt (and re-rotated) whenever attention reads them.

Based on CSKV (Wang et al. 2024, arXiv 2409.10593, "Training-Efficient Channel Shrinking for KV Cache in
Long-Context Scenarios"; official code github.com/wln20/CSKV). The paper replaces W_K by A_K B_K and caches the
features X A_K; for every initialisation it uses (SVD of W_K, activation-scaled ASVD) and for the optimum of its
layer-wise loss MSE(K, X A_K B_K) the rebuilt key is a projection of K itself: K^ = K P P^T with P [d, r] orthonormal
(d = H_kv x head_dim, all KV heads of a layer together, as the official code's one SVD of the whole k_proj). So a
cache that sees K can store c = K P (r numbers per token) and rebuild K^ = c P^T without touching the model. The
bases (``fit_factors``), per layer, for keys and values separately:

- ``pca``: the top-r eigenvectors of the uncentred Gram matrix sum_t k_t k_t^T of the calibration activations
  (k_proj / v_proj outputs: pre-RoPE, bias included): the exact minimiser of the paper's reconstruction loss on that
  data (Eckart-Young; RoPE is orthogonal per position, so the official code's post-RoPE MSE is the same loss);
- ``svd``: the top-r left singular vectors of W_K [d, h] (weights only, CSKV's SVD init; needs no data);
- ``asvd``: the top-r left singular vectors of W_K diag(s), s = (mean |x| + 1e-6)^0.5 over the k_proj input (the
  official ``asvd_init_calib.py`` scaling, alpha 0.5, CSKV's default init).

Gradient training (the paper's 1-epoch fine-tuning of A and B) is not done: without quantization its optimum is the
PCA basis above; a learned A acting on the hidden state X (not on K) is model surgery, which a cache cannot do.

Cache rules, per layer (the paper's bi-branch cache with its sliding window, not the official code's 32-token block
flush):

- Keys arrive post-RoPE (Llama attention rotates before ``cache.update``). The exact branch holds the last ``window``
  tokens as they arrived (post-RoPE K and V, [B, H_kv, <= window, D]). A token leaving it is un-rotated at its own
  position (k = (k_rot cos - rotate_half(k_rot) sin) / (cos^2 + sin^2), the inverse of ``apply_rotary_pos_emb``),
  flattened over heads to [d], and stored as features c_k = k P_K [r_k], c_v = v P_V [r_v].
- Reading (every update returns the past + the incoming rows): old keys K^ = c_k P_K^T, reshaped to heads and rotated
  again at their positions with the model's own ``rotary_emb`` (so ``attach(model)`` is needed; ``build_cache`` does
  it); values V^ = c_v P_V^T. The prompt pass and the incoming rows are exact (base contract). Full rank (r = d)
  rebuilds every token to float rounding.
- Positions: token t of a row is at position t - pads (its left pads, declared with ``set_padding(attention_mask)``,
  as ``generate`` numbers them); a prompt whose first token is not at position 0 without declared padding is refused.
- Stored per layer: the exact window (two [B, H_kv, <= window, D]), the features [B, n_old, r_k] and [B, n_old, r_v]
  in the states' dtype, and the pads (long [B], once declared). The bases are model weights (``CSKVFactors``, an
  ``nn.Module``: 2 x d x (r_k + r_v) numbers per layer at 16 bits, reported apart as ``factor_bytes``), not cache.

Factors belong to one model: ``fingerprint(model)`` hashes its k_proj/v_proj weights; saved factors carry it and a
model whose fingerprint differs is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from transformers.models.llama.modeling_llama import rotate_half

from llm_compress.errors import InputError
from llm_compress.kv.base import KVLayer
from llm_compress.kv.config import CSKVConfig
from llm_compress.kv.fingerprint import attention_modules, fingerprint  # noqa: F401 (re-exported)
from llm_compress.kv.sink import PaddedCache
from llm_compress.kv.spec import check_params, cskv_ranks

FACTORS_FILE = "cskv_factors.safetensors"
INITS = ("pca", "svd", "asvd")


class CSKVFactors(torch.nn.Module):
    """Orthonormal bases per layer: ``k[i]`` [d, r_k], ``v[i]`` [d, r_v] (float32); features c = x P, rebuilt x P^T.
    A module (model weights, not cache: measuring a cache does not count them), with ``fingerprint`` and ``init``."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], fingerprint: str, init: str) -> None:
        super().__init__()
        self.k = torch.nn.ParameterList([torch.nn.Parameter(t.float().contiguous(), requires_grad=False) for t in k])
        self.v = torch.nn.ParameterList([torch.nn.Parameter(t.float().contiguous(), requires_grad=False) for t in v])
        self.fingerprint, self.init = fingerprint, init

    @property
    def ranks(self) -> tuple[int, int]:
        return self.k[0].shape[1], self.v[0].shape[1]

    def factor_bytes(self) -> int:
        """What the bases take at 16 bits (the weights CSKV adds to the model)."""
        return 2 * sum(t.numel() for t in [*self.k, *self.v])

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {f"k.{i}": t.detach().cpu() for i, t in enumerate(self.k)}
        tensors.update({f"v.{i}": t.detach().cpu() for i, t in enumerate(self.v)})
        save_file(tensors, str(path), metadata={"fingerprint": self.fingerprint, "init": self.init})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "CSKVFactors":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"CSKV factors file {path} is missing (it is written next to kv_cache.json)")
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
            layers = len([n for n in names if n.startswith("k.")])
            if "fingerprint" not in meta or layers == 0:
                raise InputError(f"{path} is not a CSKV factors file (no fingerprint or no k.<layer> tensors)")
            return cls([f.get_tensor(f"k.{i}") for i in range(layers)], [f.get_tensor(f"v.{i}") for i in range(layers)],
                       meta["fingerprint"], meta.get("init", "?"))

    def check_model(self, model: torch.nn.Module, where: str = "CSKV factors") -> None:
        """InputError if ``model`` is not the one these factors were fitted on."""
        got = fingerprint(model)
        if got != self.fingerprint:
            raise InputError(f"{where} were fitted for another model (k/v projection fingerprint "
                             f"{self.fingerprint[:12]}, this model's {got[:12]}): fit them on this model")


def _top_eigvecs(gram: torch.Tensor, r: int) -> torch.Tensor:
    """The r eigenvectors of a symmetric [d, d] matrix with the largest eigenvalues, [d, r], largest first."""
    _, vecs = torch.linalg.eigh(gram)  # ascending
    return vecs[:, -r:].flip(-1)


@torch.no_grad()
def fit_factors(model: torch.nn.Module, rows: torch.Tensor | None, rank_k: int, rank_v: int, init: str = "pca",
                batch_size: int = 4) -> CSKVFactors:
    """Bases for every layer of ``model`` (see the module docstring): ``rows`` [N, T] token ids (unpadded
    calibration rows; unused by ``svd``), ranks over all KV heads of a layer (1 <= r <= H_kv x head_dim)."""
    if init not in INITS:
        raise InputError(f"CSKV init must be one of {INITS}, got {init!r}")
    attns = attention_modules(model)
    if not attns:
        raise InputError("CSKV needs a model with the Llama attention layout (k_proj, v_proj per layer)")
    d = attns[0].k_proj.out_features
    for name, r in (("k_rank", rank_k), ("v_rank", rank_v)):
        if not 1 <= r <= d:
            raise InputError(f"kv.cache.{name} {r} must lie in [1, {d}] (the layer's key/value channels, "
                             "H_kv x head_dim)")
    if init == "svd":
        k, v = [], []
        for attn in attns:
            for proj, out, r in ((attn.k_proj, k, rank_k), (attn.v_proj, v, rank_v)):
                u, _, _ = torch.linalg.svd(proj.weight.detach().double(), full_matrices=False)  # W [d, h] = U S V^T
                out.append(u[:, :r])
        return CSKVFactors(k, v, fingerprint(model), init)
    if rows is None or rows.numel() == 0:
        raise InputError(f"CSKV init {init!r} needs calibration rows")
    stats: dict[tuple[int, str], torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(layer: int, which: str):
        def fn(module, args, out):
            if init == "pca":  # uncentred Gram of the projection's outputs (pre-RoPE K or V), [d, d]
                x = out.detach().flatten(0, -2).double()
                stats[layer, which] = stats.get((layer, which), 0) + x.T @ x
            elif which == "k":  # asvd: sum |x| of the projections' (shared) input, [h]
                x = args[0].detach().flatten(0, -2).double()
                stats[layer, "x"] = stats.get((layer, "x"), 0) + x.abs().sum(0)
                counts[layer] = counts.get(layer, 0) + x.shape[0]
        return fn

    handles = [h for attn in attns for h in (attn.k_proj.register_forward_hook(hook(attn.layer_idx, "k")),
                                             attn.v_proj.register_forward_hook(hook(attn.layer_idx, "v")))]
    try:
        device = next(model.parameters()).device
        for i in range(0, rows.shape[0], batch_size):
            model(input_ids=rows[i:i + batch_size].long().to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    k, v = [], []
    for attn in attns:
        i = attn.layer_idx
        if init == "pca":
            k.append(_top_eigvecs(stats[i, "k"], rank_k))
            v.append(_top_eigvecs(stats[i, "v"], rank_v))
        else:
            s = (stats[i, "x"] / counts[i] + 1e-6) ** 0.5  # [h]
            for proj, out, r in ((attn.k_proj, k, rank_k), (attn.v_proj, v, rank_v)):
                u, _, _ = torch.linalg.svd(proj.weight.detach().double() * s, full_matrices=False)  # W diag(s)
                out.append(u[:, :r])
    return CSKVFactors(k, v, fingerprint(model), init)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated as ``apply_rotary_pos_emb`` does, cos/sin [B, T, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def unrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rope`` (cos^2 + sin^2 is the squared attention scaling, 1 for plain RoPE)."""
    return (x * cos[:, None] - rotate_half(x) * sin[:, None]) / (cos * cos + sin * sin)[:, None]


class CSKVLayer(KVLayer):
    """One layer: an exact window of the last ``window`` tokens and low-rank features of the older ones."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.factors: CSKVFactors | None = None  # the cache's bases (a module: weights, not cache), and this
        self.index = 0  # layer's index in them: p_k [d, r_k], p_v [d, r_v]
        self.rotary: torch.nn.Module | None = None  # the model's rotary_emb
        self.pads: torch.Tensor | None = None  # long [B], once declared
        super().__init__()

    def __repr__(self) -> str:
        return f"CSKVLayer(window={self.window}, seen={self.seen})"

    def _reset_state(self) -> None:
        self.k_win: torch.Tensor | None = None  # [B, H, <= window, D], post-RoPE, exact
        self.v_win: torch.Tensor | None = None
        self.c_k: torch.Tensor | None = None  # [B, n_old, r_k] features of the pre-RoPE keys
        self.c_v: torch.Tensor | None = None  # [B, n_old, r_v]

    @property
    def n_old(self) -> int:
        return 0 if self.c_k is None else self.c_k.shape[1]

    def _cos_sin(self, start: int, count: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, count, D] in float32 for tokens start .. start+count-1 of every row (position = token - pads)."""
        pos = torch.arange(start, start + count, device=like.device).expand(self.batch, -1)
        if self.pads is not None:
            pos = (pos - self.pads.to(like.device)[:, None]).clamp_min(0)
        return self.rotary(like.float(), pos)

    def _bases(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's bases, float32 [d, r_k] and [d, r_v], on ``device``."""
        return (self.factors.k[self.index].detach().to(device), self.factors.v[self.index].detach().to(device))

    def past(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or (self.k_win is None and self.c_k is None):
            return self.empty(), self.empty()
        parts_k, parts_v = [], []
        if self.c_k is not None:
            b, n = self.c_k.shape[:2]
            heads = lambda x: x.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # noqa: E731
            p_k, p_v = self._bases(self.c_k.device)
            k_pre = heads(self.c_k.float() @ p_k.T)  # [B, H, n_old, D]
            cos, sin = self._cos_sin(0, n, k_pre)
            parts_k.append(rope(k_pre, cos, sin).to(self.dtype))
            parts_v.append(heads(self.c_v.float() @ p_v.T).to(self.dtype))
        if self.k_win is not None:
            parts_k.append(self.k_win)
            parts_v.append(self.v_win)
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    def _update(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.factors is None or self.rotary is None:
            raise InputError("CSKVCache is not attached to a model: build it with build_cache / load_kv_cache, or "
                             "call cache.attach(model) first")
        if self.seen == 0 and self.pads is None:
            sin = cache_kwargs.get("sin")  # [B, q, D]; sin(0) = 0 for every frequency
            if sin is not None and sin.dim() == 3 and (sin[:, 0] != 0).any():
                raise InputError("the prompt looks left-padded (its first token is not at position 0): call "
                                 "cache.set_padding(attention_mask) (or pass attention_mask to build_cache) first, "
                                 "or CSKV would re-rotate old keys at the wrong positions")
        if self.pads is not None and self.pads.shape[0] != k.shape[0]:
            raise InputError(f"set_padding declared {self.pads.shape[0]} rows, the batch has {k.shape[0]}")
        past_k, past_v = self.past()
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        win_k = k if self.k_win is None else torch.cat([self.k_win, k], dim=-2)
        win_v = v if self.v_win is None else torch.cat([self.v_win, v], dim=-2)
        leave = win_k.shape[-2] - self.window
        if leave > 0:  # the oldest window tokens become features
            start = self.n_old
            cos, sin = self._cos_sin(start, leave, win_k)
            flat = lambda x: x.transpose(1, 2).flatten(2)  # noqa: E731  [B, H, n, D] -> [B, n, H * D]
            p_k, p_v = self._bases(k.device)
            c_k = (flat(unrope(win_k[..., :leave, :].float(), cos, sin)) @ p_k).to(self.dtype)
            c_v = (flat(win_v[..., :leave, :].float()) @ p_v).to(self.dtype)
            self.c_k = c_k if self.c_k is None else torch.cat([self.c_k, c_k], dim=1)
            self.c_v = c_v if self.c_v is None else torch.cat([self.c_v, c_v], dim=1)
            win_k, win_v = win_k[..., leave:, :].clone(), win_v[..., leave:, :].clone()  # no view of the old storage
        self.k_win, self.v_win = (win_k, win_v) if win_k.shape[-2] else (None, None)
        return keys, values

    def held_tensors(self) -> Iterable[torch.Tensor]:
        held = [t for t in (self.k_win, self.v_win, self.c_k, self.c_v) if t is not None]
        return held + ([self.pads] if self.pads is not None else [])


_DEFAULT = CSKVConfig()  # the defaults of the constructor's arguments


class CSKVCache(PaddedCache):
    """CSKV in every one of ``num_layers`` layers (settings: ``llm_compress.kv.config.CSKVConfig``; rules: the
    module docstring). Needs ``attach(model, factors)`` before use (``build_cache`` / ``load_kv_cache`` call it with
    the file the spec's ``factors`` record names), with factors fitted for that model (``fit_factors``), except with
    ``init: svd``, whose bases come from the weights alone and are computed on attach when none are given."""

    def __init__(self, num_layers: int, k_rank: int | None = _DEFAULT.k_rank, v_rank: int | None = _DEFAULT.v_rank,
                 k_ratio: float = _DEFAULT.k_ratio, v_ratio: float = _DEFAULT.v_ratio, window: int = _DEFAULT.window,
                 init: str = _DEFAULT.init, calib_rows: int = _DEFAULT.calib_rows, spec: dict | None = None) -> None:
        self.params = check_params("cskv", {"k_rank": k_rank, "v_rank": v_rank, "k_ratio": k_ratio,
                                            "v_ratio": v_ratio, "window": window, "init": init,
                                            "calib_rows": calib_rows})
        super().__init__([CSKVLayer(window) for _ in range(num_layers)], spec)
        self.factors: CSKVFactors | None = None

    def attach(self, model: torch.nn.Module, factors: CSKVFactors | None = None) -> "CSKVCache":
        """Take the model's rotary embedding and the bases: ``factors`` if given, else the spec's factors file, else
        for ``init: svd`` computed from the weights; checked against the model's fingerprint. Returns self."""
        if factors is not None:
            self.factors = factors
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        r_k, r_v = cskv_ranks(self.params, config)
        record = (self.spec or {}).get("factors")
        if self.factors is None and record is not None:
            if "path" not in record:
                raise InputError(f"the CSKV spec names its factors file {record.get('file')!r} but not where it is: "
                                 "read the spec with load_kv_cache(folder, model) or read_spec(path)")
            self.factors = CSKVFactors.load(record["path"])
        if self.factors is None:
            if self.params["init"] != "svd":
                raise InputError(f"CSKV init {self.params['init']!r} needs factors fitted on data "
                                 "(llm_compress.kv.cskv.fit_factors, or the kv stage's cskv_factors.safetensors)")
            self.factors = fit_factors(model, None, r_k, r_v, "svd")
        self.factors.check_model(model)
        if len(self.factors.k) != len(self.layers) or self.factors.ranks != (r_k, r_v):
            raise InputError(f"CSKV factors have {len(self.factors.k)} layers and ranks {self.factors.ranks}, the "
                             f"spec asks for {len(self.layers)} layers and ranks {(r_k, r_v)}")
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        if rotary is None:
            raise InputError("CSKV needs the model's rotary embedding (model.model.rotary_emb) to re-rotate keys")
        for i, layer in enumerate(self.layers):
            layer.factors, layer.index, layer.rotary = self.factors, i, rotary
        return self

    def factor_bytes(self) -> int:
        """The bases' bytes at 16 bits (weights CSKV adds to the model, not counted as cache)."""
        return self.factors.factor_bytes() if self.factors is not None else 0
