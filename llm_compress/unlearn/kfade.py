"""K-FADE: a few uphill Gauss-Newton steps on the forget loss, preconditioned by K-FAC, sized by a KL trust region.

McKinney, Thudi, Bae, Rezaei, Papernot, McIlraith, Grosse, "Gauss-Newton Unlearning for the LLM Era"
(arXiv 2602.10568). The paper publishes no code; this follows ``shared/notes/methods.md`` section 5.2.

For every selected ``nn.Linear`` (``cfg.layers``, a regex searched in the module names) with weight W [out, in]:

- K-FAC factors on general (non-forget) rows, estimated ONCE before the first step on the first ``cfg.fisher_rows``
  rows of ``data.general``: A = E[a a^T] over the layer's input activations a [in], G = E[g g^T] over the gradients
  g [out] at its output. Every token position is a sample (K-FAC "expand": the weight is shared over positions and
  the cross-position terms are dropped). The labels of g are SAMPLED from the model's own next-token distribution
  (one per position per pass), so A (x) G approximates the true Fisher, which for softmax cross-entropy is the
  Gauss-Newton matrix. ``labels="exact"`` takes the expectation over labels instead (one backward per position and
  vocabulary entry: for tests and toy vocabularies).
- Scale: F = E_tokens[J^T H J], the Gauss-Newton matrix of the MEAN per-token NLL, H = diag(p) - p p^T of one
  position. So A is the mean of a a^T over all tokens, and G is the mean over all tokens of g g^T with g the
  gradient of the SUMMED (not averaged) sampled NLL of the row (so g at one position collects every later position's
  term, as in a true per-sequence Fisher). Then 0.5 dW^T F dW is the mean per-token KL(p_old || p_new) on general
  text to second order, and the forget loss (the mean NLL of the span tokens) is normalised the same way.
- Direction D = (G + lam_G I)^-1 grad_W L_forget (A + lam_A I)^-1 with lam_A = damping * trace(A) / in and
  lam_G = damping * trace(G) / out (each relative to its factor's mean eigenvalue). This inverts the damped Kronecker
  product (A + lam_A I) (x) (G + lam_G I), not F + lam I, as K-FAC does.
- Step size eta = sqrt(2 eps / sum_layers <grad, D>), so the damped quadratic model of the step's KL is eps
  (``cfg.trust_region``), and W <- W + eta D: an ASCENT step, the forget loss increases.
- The forget gradient is recomputed before every step (teacher forced, mean NLL over ``forget.span`` tokens).

The trust region holds for the block-diagonal K-FAC model only, so by default (``cfg.backtrack``) each step is also
measured: while the KL on the K-FAC rows exceeds ``trust_region``, eta is halved. When many layers move the same
logits together
(the cross-layer terms K-FAC drops), or the step leaves the quadratic regime (q/k projections act bilinearly on the
attention scores), the measured KL is larger. On a random 2-block Llama (8 rows x 16 tokens) it was ~1.3x eps for
one down_proj, 3-10x for all 14 linears at initializer_range 0.1, and up to ~90x at the default 0.02 (uniform
attention, tiny weights: the step saturates).

Labels are drawn independently per position, and ``labels="exact"`` sums the expectation position by position, so
both estimate the same G (backpropagating one Hessian square-root column at all positions at once would add
cross-position terms). General rows are taken as full rows (no padding, every position counts).

Biases are left unchanged (A has no constant-1 entry). Rows are processed ``batch_size`` at a time (forward with
autograd, no weight .grad is written), factors are float32 on the model's device. Memory: per selected layer an
in x in (A) and an out x out (G) float32 matrix, kept for all steps: ~69 GB for all 224 linears of a 7B Llama
(the 11008-wide MLP factors dominate, 484 MB each), plus one float32 gradient per selected weight, turned into its
direction in place (~26 GB); a narrower ``cfg.layers`` (e.g. only ``down_proj``) cuts both.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm_compress.errors import InputError, RecipeError, TrainingError
from llm_compress.progress import report as report_progress
from llm_compress.unlearn.base import Unlearner, UnlearnData
from llm_compress.unlearn.data import ForgetSet

if TYPE_CHECKING:
    from llm_compress.unlearn.config import KFadeConfig

BATCH = 4  # rows per forward pass (factors and forget gradient)
LABELS = ("sampled", "exact")


def select_linears(model: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules whose name matches ``pattern`` (re.search). Raises RecipeError when none does, or
    when a selected weight is shared with a module that is not selected (a tied lm_head / embedding)."""
    rx = re.compile(pattern)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.search(n)}
    if not modules:
        raise RecipeError(f"kfade: layers regex {pattern!r} matches no nn.Linear of {type(model).__name__}")
    chosen = {id(m.weight): n for n, m in modules.items()}
    for n, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if w is not None and id(w) in chosen and n not in modules:
            raise RecipeError(f"kfade: selected layer {chosen[id(w)]} shares its weight with {n} (tied weights); "
                              f"exclude it from the layers regex")
    return modules


class _Capture:
    """Forward hooks that keep each module's input (detached) and output (in the graph) of the last forward."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for name, m in self.modules.items():
            self.handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.inputs.clear()
        self.outputs.clear()

    def _hook(self, name):
        def hook(module, args, output):
            if name in self.outputs:
                raise InputError(f"kfade: {name} runs twice in one forward (shared module); K-FAC needs one call")
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output
        return hook

    def reset(self):
        self.inputs.clear()
        self.outputs.clear()


def _logits(model, ids: torch.Tensor, attn: torch.Tensor | None = None) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=attn, use_cache=False)
    return getattr(out, "logits", out)


def kfac_factors(model: torch.nn.Module, modules: dict[str, torch.nn.Linear], rows: torch.Tensor, *,
                 labels: str = "sampled", mc_samples: int = 1, batch_size: int = BATCH,
                 generator: torch.Generator | None = None,
                 progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """K-FAC factors {name: (A [in, in], G [out, out])}, float32 on the model's device, of the Gauss-Newton matrix
    F = E_tokens[J^T H J] of the mean per-token NLL on ``rows`` [R, T] int64 (full rows, no padding).

    ``labels="sampled"``: g is the gradient of the summed NLL of ``mc_samples`` label draws from the model's own
    distribution per position (``generator`` on the model's device). ``labels="exact"``: the expectation over labels,
    one backward per (position, vocabulary entry). See the module docstring for the scaling.
    """
    if labels not in LABELS:
        raise RecipeError(f"kfade: labels must be one of {', '.join(LABELS)}, got {labels!r}")
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise InputError(f"kfade: K-FAC needs general rows [R, T] with R >= 1, got {tuple(rows.shape)}")
    device = next(model.parameters()).device
    sums = {n: (torch.zeros(m.in_features, m.in_features, device=device),
                torch.zeros(m.out_features, m.out_features, device=device)) for n, m in modules.items()}
    tokens = 0
    names = list(modules)
    with _Capture(modules) as cap, _weights_require_grad(modules):
        for start in tqdm(range(0, rows.shape[0], batch_size), desc="kfade: K-FAC", disable=not progress):
            ids = rows[start:start + batch_size].to(device)
            cap.reset()
            logits = _logits(model, ids)  # [B, T, V]
            probs = logits.detach().float().softmax(-1)
            if not torch.isfinite(probs).all():
                raise TrainingError("kfade: non-finite logits on the general rows (K-FAC data)")
            outputs = [cap.outputs[n] for n in names]
            for v, weight in _output_vectors(probs, labels, mc_samples, generator):
                grads = torch.autograd.grad(logits, outputs, grad_outputs=v.to(logits.dtype), retain_graph=True,
                                            allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        g = g.reshape(-1, g.shape[-1]).float()
                        sums[n][1].add_(g.T @ g, alpha=weight)
            for n in names:
                a = cap.inputs[n].reshape(-1, modules[n].in_features).float()
                sums[n][0].add_(a.T @ a)
            tokens += ids.numel()
            del logits, outputs, probs
            cap.reset()  # frees the graph
    return {n: (A / tokens, G / tokens) for n, (A, G) in sums.items()}


def _output_vectors(probs: torch.Tensor, labels: str, mc_samples: int, generator):
    """Vectors v [B, T, V] at the logits with weights w such that sum_v w v v^T = H per position (in expectation for
    sampled labels): v = p - onehot(y) at every position for a sampled y; exact: sqrt(p_c) (e_c - p) at position t."""
    B, T, V = probs.shape
    if labels == "sampled":
        for _ in range(mc_samples):
            y = torch.multinomial(probs.reshape(-1, V), 1, generator=generator).reshape(B, T)
            yield probs - F.one_hot(y, V).to(probs.dtype), 1.0 / mc_samples
        return
    eye = torch.eye(V, device=probs.device)
    for t in range(T):
        p = probs[:, t]  # [B, V]
        for c in range(V):
            v = torch.zeros_like(probs)
            v[:, t] = p[:, c:c + 1].sqrt() * (eye[c] - p)
            yield v, 1.0


class _weights_require_grad:
    """Make the selected weights require grad for the duration (restored after)."""

    def __init__(self, modules):
        self.weights = [m.weight for m in modules.values()]

    def __enter__(self):
        self.flags = [w.requires_grad for w in self.weights]
        for w in self.weights:
            w.requires_grad_(True)

    def __exit__(self, *exc):
        for w, f in zip(self.weights, self.flags):
            w.requires_grad_(f)


def forget_grads(model: torch.nn.Module, modules: dict[str, torch.nn.Linear], forget: ForgetSet, *,
                 batch_size: int = BATCH) -> tuple[float, dict[str, torch.Tensor]]:
    """(mean NLL of the forget span tokens, {name: its gradient w.r.t. the weight, float32 [out, in]}), teacher
    forced: token t of a span is predicted from the logits at t - 1. Raises TrainingError on a non-finite loss."""
    device = next(model.parameters()).device
    n_span = int(forget.span[:, 1:].sum())
    if n_span == 0:
        raise InputError("kfade: the forget set has no span tokens")
    names = list(modules)
    weights = [modules[n].weight for n in names]
    total = 0.0
    grads = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in zip(names, weights)}
    with _weights_require_grad(modules):
        for start in range(0, len(forget), batch_size):
            part = forget.rows(slice(start, start + batch_size)).to(device)
            mask = part.span[:, 1:]
            logits = _logits(model, part.ids, part.attn)[:, :-1][mask].float()  # [span tokens, V]
            nll = F.cross_entropy(logits, part.ids[:, 1:][mask], reduction="sum")
            if not torch.isfinite(nll):
                raise TrainingError(f"kfade: the forget NLL is {nll.item()} (rows {start}..{start + len(part) - 1}); "
                                    f"the model's weights or logits are not finite")
            for n, g in zip(names, torch.autograd.grad(nll, weights)):
                grads[n].add_(g.float())
            total += nll.item()
    return total / n_span, {n: g / n_span for n, g in grads.items()}


def natural_direction(grads: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      damping: float) -> dict[str, torch.Tensor]:
    """D = (G + lam_G I)^-1 grad (A + lam_A I)^-1 per layer (float32), lam = damping * trace / dim of each factor:
    vec(D) = ((A + lam_A I) (x) (G + lam_G I))^-1 vec(grad) (column-major vec; row-major it is G (x) A)."""
    out = {}
    for n, grad in grads.items():
        A, G = factors[n]
        la = torch.linalg.cholesky_ex(_damped(A, damping))
        lg = torch.linalg.cholesky_ex(_damped(G, damping))
        if la.info.item() or lg.info.item():
            raise TrainingError(f"kfade: the damped K-FAC factors of {n} are not positive definite (non-finite "
                                f"activations or gradients on the general rows?); raise damping")
        d = torch.cholesky_solve(grad.float(), lg.L)  # G^-1 grad
        d = torch.cholesky_solve(d.T, la.L).T  # ... A^-1 (A symmetric)
        if not torch.isfinite(d).all():
            raise TrainingError(f"kfade: non-finite Gauss-Newton direction for {n}; raise damping or fisher_rows")
        out[n] = d
    return out


def _damped(M: torch.Tensor, damping: float) -> torch.Tensor:
    """M + damping * (trace(M) / dim) I."""
    return M + damping * M.diagonal().mean() * torch.eye(M.shape[0], device=M.device, dtype=M.dtype)


def step_size(grads: dict[str, torch.Tensor], directions: dict[str, torch.Tensor], trust_region: float) -> float:
    """eta = sqrt(2 eps / sum_layers <grad, D>): the damped quadratic KL model 0.5 eta^2 <grad, D> equals eps."""
    return _eta(sum(float((grads[n].float() * directions[n]).sum()) for n in grads), trust_region)


def _eta(inner: float, trust_region: float) -> float:
    if not inner > 0 or not math.isfinite(inner):
        raise TrainingError(f"kfade: the forget gradient's natural norm <grad, D> is {inner}; nothing to ascend")
    return math.sqrt(2 * trust_region / inner)


def quadratic_kl(directions: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 eta: float) -> float:
    """0.5 eta^2 vec(D)^T (A (x) G) vec(D) summed over layers: the undamped K-FAC prediction of the step's KL."""
    return 0.5 * eta ** 2 * sum(float((D * (factors[n][1] @ D @ factors[n][0])).sum()) for n, D in directions.items())


@torch.no_grad()
def _mean_kl(model, rows: torch.Tensor, ref_logp: list[torch.Tensor], batch_size: int = 4) -> float:
    """Mean per-token KL(ref || model) on ``rows`` [R, T]; ``ref_logp``: the reference log-probs per batch."""
    total, count = 0.0, 0
    for i, ref in zip(range(0, len(rows), batch_size), ref_logp):
        logp = torch.log_softmax(_logits(model, rows[i:i + batch_size]).float(), -1)  # [b, T, V]
        total += float((ref.exp() * (ref - logp)).sum())
        count += ref.shape[0] * ref.shape[1]
    return total / count


@torch.no_grad()
def _backtrack(model, modules: dict[str, torch.nn.Linear], directions: dict[str, torch.Tensor], eta: float,
               rows: torch.Tensor, cfg) -> tuple[float, float | None, int]:
    """Apply W += eta D, halving eta (at most ``cfg.backtrack`` times) while the KL measured on ``rows`` exceeds
    ``cfg.trust_region``: the trust region as measured, not only as the block-diagonal quadratic model predicts.
    Returns (eta applied, measured KL or None when not measured, halvings)."""
    def move(scale: float) -> None:
        for n, D in directions.items():
            w = modules[n].weight
            w.add_((scale * D).to(w.dtype))  # ascent: the forget NLL rises

    if cfg.backtrack == 0:
        move(eta)
        return eta, None, 0
    device = next(model.parameters()).device
    rows = rows.to(device)
    ref = [torch.log_softmax(_logits(model, rows[i:i + 4]).float(), -1) for i in range(0, len(rows), 4)]
    move(eta)
    kl, halvings = _mean_kl(model, rows, ref), 0
    while kl > cfg.trust_region and halvings < cfg.backtrack:
        move(-eta / 2)  # W + eta D  ->  W + eta/2 D
        eta, halvings = eta / 2, halvings + 1
        kl = _mean_kl(model, rows, ref)
    return eta, kl, halvings


class KFade(Unlearner):
    """K-FADE (module docstring): ``cfg.steps`` uphill Gauss-Newton steps on the forget NLL; K-FAC factors from the
    first ``cfg.fisher_rows`` general rows, estimated once before the first step; each step's KL is ``cfg.trust_region``
    under the damped quadratic model."""

    cfg: KFadeConfig

    def __call__(self, model: torch.nn.Module, data: UnlearnData, *, seed: int = 0,
                 progress: bool = False) -> list[dict]:
        """Returns one record per step: ``step``, ``forget_nll`` (= ``loss``, before the step), ``step_size``
        (eta, after backtracking), ``predicted_kl`` (the undamped K-FAC quadratic model of the step's KL),
        ``measured_kl`` (on the K-FAC rows; None with backtrack 0) and ``halvings``."""
        cfg = self.cfg
        modules = select_linears(model, cfg.layers)
        device = next(model.parameters()).device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            rows = data.general[:cfg.fisher_rows]
            factors = kfac_factors(model, modules, rows, generator=gen, progress=progress)
            history = []
            for step in tqdm(range(cfg.steps), desc="kfade", disable=not progress):
                nll, grads = forget_grads(model, modules, data.forget)
                inner = 0.0
                for n in list(grads):  # one layer at a time, each gradient replaced by its direction (memory)
                    d = natural_direction({n: grads[n]}, factors, cfg.damping)[n]
                    inner += float((grads[n] * d).sum())
                    grads[n] = d
                directions = grads
                eta = _eta(inner, cfg.trust_region)  # = step_size(grads, directions, trust_region)
                eta, measured, halvings = _backtrack(model, modules, directions, eta, rows, cfg)
                report_progress((step + 1) / cfg.steps, f"kfade: step {step + 1}/{cfg.steps}, forget NLL {nll:.3f}")
                history.append({"step": step + 1, "loss": nll, "forget_nll": nll, "step_size": eta,
                                "predicted_kl": quadratic_kl(directions, factors, eta), "measured_kl": measured,
                                "halvings": halvings})
        finally:
            model.train(was_training)
        return history
