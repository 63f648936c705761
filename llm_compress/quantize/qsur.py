"""Quantization Space Utilization Rate (QSUR), after OSTQuant (Hu et al., ICLR 2025).

SOURCE / CAVEAT: the paper text (arXiv 2501.13987) could not be retrieved when this was written, so the
section/equation numbers are not cited and the definition below is as recalled, not read from the paper:
QSUR = V_data / V_quant, with
  V_data  = volume of the data ellipsoid E = {x : (x - mu)^T Sigma^-1 (x - mu) <= c^2}
          = [pi^(d/2) / Gamma(d/2 + 1)] * c^d * prod_i sqrt(lambda_i)      (lambda = eigenvalues of Sigma)
  V_quant = volume of the smallest origin-centred axis-aligned hypercube holding E (a symmetric quantiser's grid)
          = (2 a)^d,  a = max_j (|mu_j| + c * sqrt(Sigma_jj))            (E's half-extent along axis j)
mu and Sigma are the sample mean and covariance of x [tokens, d] (float64). c is the ellipsoid's Mahalanobis radius:
by default the 99% chi-square quantile with d degrees of freedom (Wilson-Hilferty approximation), an assumption of
this implementation; pass ``radius`` to change it. With mu = 0, c cancels.

Properties (which the tests check): for mu = 0, QSUR <= ball/cube = pi^(d/2) / (Gamma(d/2+1) 2^d), reached iff all
lambda_i are equal (then every Sigma_jj = lambda). A rotation Q changes Sigma_jj (to diag(Q^T Sigma Q)) but not the
eigenvalues, so the best it can do is equalise the diagonal (Sigma_jj = mean(lambda), e.g. a Hadamard spreading an
outlier channel); only a scaling can equalise the eigenvalues. A mean along one axis is best rotated onto the cube
diagonal (|mu_j| = |mu| / sqrt(d)).

Reported value: QSUR is astronomically small for large d, so everything is computed in log space and
``qsur`` returns the d-th root of QSUR / (ball/cube) -- the per-dimension utilisation relative to the best case, in
(0, 1] when mu = 0 (1 = isotropic data). ``log_qsur`` returns the raw natural log of QSUR.
Sample covariance needs tokens >> d (eigenvalues of a rank-deficient Sigma are 0 and the QSUR is ~0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm_compress.errors import InputError

_Z99 = 2.3263478740408408  # standard normal 0.99 quantile


def default_radius(d: int) -> float:
    """sqrt of the 0.99 chi-square quantile with d degrees of freedom (Wilson-Hilferty)."""
    k = 2.0 / (9.0 * d)
    return math.sqrt(d * (1.0 - k + _Z99 * math.sqrt(k)) ** 3)


def _log_unit_ball(d: int) -> float:
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def log_qsur(x: torch.Tensor, radius: float | None = None) -> float:
    """Natural log of QSUR = V_ellipsoid / V_hypercube for samples x [tokens, d] (leading dims are flattened)."""
    if x.dim() < 2:
        raise InputError(f"qsur needs samples [tokens, d], got shape {tuple(x.shape)}")
    x = x.detach().reshape(-1, x.shape[-1]).double()  # [T, d]
    t, d = x.shape
    if t <= d:
        raise InputError(f"qsur needs more samples than dimensions to estimate a covariance: {t} samples, d={d}")
    c = default_radius(d) if radius is None else float(radius)
    mu = x.mean(0)  # [d]
    xc = x - mu
    cov = xc.T @ xc / (t - 1)  # [d, d]
    lam = torch.linalg.eigvalsh(cov)  # [d] ascending
    lam = lam.clamp_min(max(lam[-1].item(), 1e-300) * 1e-30)  # rank-deficient: tiny, not -inf
    log_v_ell = _log_unit_ball(d) + d * math.log(c) + 0.5 * lam.log().sum().item()
    half = (mu.abs() + c * torch.diagonal(cov).clamp_min(0).sqrt()).max().item()  # a
    if half <= 0:
        raise InputError("qsur: the samples are all zero")
    return log_v_ell - d * math.log(2.0 * half)


def qsur(x: torch.Tensor, radius: float | None = None) -> float:
    """(QSUR / QSUR_max)^(1/d) for samples x [tokens, d]: 1 for isotropic zero-mean data, smaller otherwise."""
    d = x.shape[-1]
    return math.exp((log_qsur(x, radius) - (_log_unit_ball(d) - d * math.log(2.0))) / d)


SITES = ("attn_in", "mlp_in", "down_in")


@torch.no_grad()
def layer_qsur(model: nn.Module, input_ids: torch.Tensor, params=None,
               radius: float | None = None) -> dict[str, float]:
    """QSUR (``qsur``'s normalised d-th root) of the inputs of every layer's quantised matmuls.

    Sites per layer i, keys ``model.layers.{i}.{site}``: ``attn_in`` (the q/k/v input), ``mlp_in`` (gate/up input),
    ``down_in`` (the down_proj matmul input). Measured on the original model; when ``params`` (OSTParams) is given,
    also on the transformed model through ``functional_call`` under the same key plus ``"/ost"`` -- there the
    down_in site is taken after the installed online Hadamard (x @ H), i.e. what the quantiser sees. input_ids:
    [batch, seq]; tokens >> hidden size are needed (see ``qsur``).
    """
    from torch.func import functional_call

    from llm_compress.quantize.transforms import HadamardInputLinear, get_online_hadamard, transformed_weights

    layers = model.model.layers
    online = get_online_hadamard(model)
    grabbed: dict[str, list[torch.Tensor]] = {}
    after_hadamard = [False]

    def grab(key: str):
        def hook(mod: nn.Module, args):
            x = args[0]
            if after_hadamard[0] and isinstance(mod, HadamardInputLinear):
                x = mod.online_hadamard(x)
            grabbed.setdefault(key, []).append(x.detach().reshape(-1, x.shape[-1]).float())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        for site, mod in zip(SITES, (layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj)):
            handles.append(mod.register_forward_pre_hook(grab(f"model.layers.{i}.{site}")))
    named = dict(model.named_parameters())
    out: dict[str, float] = {}
    try:
        passes = [("", None)] + ([("/ost", params)] if params is not None else [])
        for suffix, p in passes:
            grabbed.clear()
            after_hadamard[0] = p is not None
            # without params this is only W_down absorbing an installed H (the original function), else nothing
            weights = transformed_weights(model, p, online)
            functional_call(model, {**named, **weights}, (input_ids,))
            for key, xs in grabbed.items():
                out[key + suffix] = qsur(torch.cat(xs), radius)
    finally:
        for h in handles:
            h.remove()
    return out
