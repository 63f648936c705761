"""K-FADE: the K-FAC direction and step size against a dense Gauss-Newton solve, and the method on a tiny Llama."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call, jacrev

from llm_compress.errors import RecipeError, TrainingError
from llm_compress.unlearn.base import UnlearnData
from llm_compress.unlearn.config import KFadeConfig
from llm_compress.unlearn.data import ForgetSet
from llm_compress.unlearn.kfade import (KFade, forget_grads, kfac_factors, natural_direction, quadratic_kl,
                                        select_linears, step_size)


class SoftmaxRegression(torch.nn.Module):
    """Position-wise: logits = head(tanh(embed(token))), so K-FAC of ``head`` is exact for one input."""

    def __init__(self, vocab=7, dim=5):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.head(torch.tanh(self.embed(input_ids))))


def forget_set(ids: torch.Tensor, attn: torch.Tensor, span: torch.Tensor) -> ForgetSet:
    return ForgetSet(ids, attn, span, span.int().argmax(1), 0)


def span_nll(model, fs: ForgetSet) -> torch.Tensor:
    """Mean NLL of the span tokens, written independently of the module under test."""
    logp = model(input_ids=fs.ids, attention_mask=fs.attn).logits.float().log_softmax(-1)
    tok = logp[:, :-1].gather(-1, fs.ids[:, 1:, None])[..., 0]
    return -(tok * fs.span[:, 1:]).sum() / fs.span[:, 1:].sum()


def test_direction_and_step_match_dense_gauss_newton(one_thread):
    torch.manual_seed(0)
    V, dim, damping, eps = 7, 5, 0.1, 0.02
    model = SoftmaxRegression(V, dim)
    general = torch.tensor([[3]])  # one row, one position: A (x) G is the exact Gauss-Newton matrix
    fs = forget_set(torch.tensor([[1, 4, 2], [5, 0, 6]]), torch.ones(2, 3, dtype=torch.bool),
                    torch.tensor([[False, True, True], [False, True, False]]))
    mods = select_linears(model, r"^head$")

    factors = kfac_factors(model, mods, general, labels="exact")
    A, G = factors["head"]

    # dense: J of the logits w.r.t. W (row-major vec), H = diag(p) - p p^T
    W0 = model.head.weight.detach().clone()

    def logits_of(W):
        return functional_call(model, {"head.weight": W}, (general,)).logits[0, 0]

    J = jacrev(logits_of)(W0).reshape(V, V * dim)
    p = logits_of(W0).softmax(-1).detach()
    H = torch.diag(p) - torch.outer(p, p)
    F_dense = J.T @ H @ J
    a = torch.tanh(model.embed.weight[3]).detach()
    torch.testing.assert_close(A, torch.outer(a, a))
    torch.testing.assert_close(G, H, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.kron(G, A), F_dense, atol=1e-6, rtol=1e-5)  # row-major vec: G (x) A

    # forget gradient against torch.func.grad of an independently written loss
    nll, grads = forget_grads(model, mods, fs)
    def nll_of(W):
        return span_nll(lambda **kw: functional_call(model, {"head.weight": W}, (), kw), fs)

    dense_grad = torch.func.grad(nll_of)(W0)
    assert nll == pytest.approx(span_nll(model, fs).item(), rel=1e-6)
    torch.testing.assert_close(grads["head"], dense_grad)

    # K-FAC damping: (G + lam_G I) (x) (A + lam_A I), lam = damping * mean eigenvalue
    A_d = torch.outer(a, a) + damping * (a @ a) / dim * torch.eye(dim)
    G_d = H + damping * H.trace() / V * torch.eye(V)
    F_damped = torch.kron(G_d, A_d).double()
    d_dense = torch.linalg.solve(F_damped, dense_grad.double().flatten())
    D = natural_direction(grads, factors, damping)
    torch.testing.assert_close(D["head"].double().flatten(), d_dense, atol=1e-4, rtol=1e-4)

    eta = step_size(grads, D, eps)
    d = D["head"].double().flatten()
    assert 0.5 * eta ** 2 * (d @ F_damped @ d).item() == pytest.approx(eps, rel=1e-4)
    undamped = 0.5 * eta ** 2 * (d @ F_dense.double() @ d).item()
    assert quadratic_kl(D, factors, eta) == pytest.approx(undamped, rel=1e-4)
    assert undamped < eps


def test_sampled_labels_match_exact_expectation(one_thread):
    """G from sampled labels is unbiased for the exact expectation, also with attention mixing positions."""
    torch.manual_seed(0)
    model = tiny_llama()
    mods = select_linears(model, r"layers\.0\.self_attn\.v_proj$")
    rows = torch.randint(0, 64, (1, 4))
    A, G = kfac_factors(model, mods, rows, labels="exact")["model.layers.0.self_attn.v_proj"]
    gen = torch.Generator().manual_seed(0)
    A_s, G_s = kfac_factors(model, mods, rows.repeat(256, 1), batch_size=256, mc_samples=8,
                            generator=gen)["model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(A_s, A)
    assert (G_s - G).norm() < 0.1 * G.norm()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def llama_data(n_general=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (3, 12), generator=g)
    attn = torch.ones(3, 12, dtype=torch.bool)
    attn[1, 9:] = False
    ids[~attn] = 0
    span = torch.zeros(3, 12, dtype=torch.bool)
    span[:, 6:] = True
    span &= attn
    return UnlearnData(forget_set(ids, attn, span), torch.randint(1, 64, (n_general, 16), generator=g))


def test_kfade_updates_selected_layers_and_ascends(one_thread):
    torch.manual_seed(0)
    model = tiny_llama()
    data = llama_data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        nll0 = span_nll(model, data.forget).item()
    eps = 0.01
    cfg = KFadeConfig(steps=2, trust_region=eps, fisher_rows=8)
    history = KFade(cfg)(model, data, seed=0)

    assert [h["step"] for h in history] == [1, 2]
    assert set(history[0]) >= {"step", "forget_nll", "step_size", "predicted_kl"}
    assert history[0]["forget_nll"] == pytest.approx(nll0, rel=1e-5)
    assert all(0 < h["predicted_kl"] <= eps * (1 + 1e-6) and h["step_size"] > 0 for h in history)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n + ".weight" for n, _ in model.named_modules() if re.search(cfg.layers, n)}
    assert changed == expected and len(expected) == 14  # 7 linears x 2 blocks; lm_head, embeddings, norms kept
    with torch.no_grad():
        assert span_nll(model, data.forget).item() > nll0


def test_measured_kl_matches_trust_region(one_thread):
    """One layer (no cross-layer terms K-FAC drops): the KL on the general rows is about the trust region."""
    torch.manual_seed(0)
    model = tiny_llama()
    data = llama_data()
    with torch.no_grad():
        p0 = model(input_ids=data.general).logits.log_softmax(-1)
    eps = 1e-3
    KFade(KFadeConfig(steps=1, trust_region=eps, fisher_rows=8, layers=r"layers\.1\.mlp\.down_proj$",
                      backtrack=0))(model, data)
    with torch.no_grad():
        p1 = model(input_ids=data.general).logits.log_softmax(-1)
    kl = (p0.exp() * (p0 - p1)).sum(-1).mean().item()  # mean per-token KL(old || new) on the K-FAC rows
    assert eps / 3 < kl < 3 * eps


def test_backtracking_keeps_the_measured_kl_inside_the_trust_region(one_thread):
    """Every linear of the default-init model: the quadratic step lands far outside the trust region (cross-layer
    curvature dropped, bilinear attention); halving it until the measured KL fits keeps each step's KL <= eps."""
    eps = 1e-3
    kls = {}
    for backtrack in (0, 12):
        torch.manual_seed(0)
        model = tiny_llama()
        data = llama_data()
        with torch.no_grad():
            p0 = model(input_ids=data.general).logits.log_softmax(-1)
        hist = KFade(KFadeConfig(steps=1, trust_region=eps, fisher_rows=8, backtrack=backtrack))(model, data)
        with torch.no_grad():
            p1 = model(input_ids=data.general).logits.log_softmax(-1)
        kls[backtrack] = (p0.exp() * (p0 - p1)).sum(-1).mean().item()
        if backtrack:
            assert hist[0]["halvings"] > 0 and abs(hist[0]["measured_kl"] - kls[backtrack]) < 1e-4
    assert kls[0] > 3 * eps and kls[12] <= eps


def test_nan_forget_loss_raises(one_thread):
    torch.manual_seed(0)
    model = tiny_llama()
    data = llama_data(4)
    data.general[data.general == 7] = 8
    data.forget.ids[0, 3] = 7  # a token only the forget set uses
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    with pytest.raises(TrainingError, match="forget NLL is nan"):
        KFade(KFadeConfig(steps=1, fisher_rows=4))(model, data)


def test_layer_selection_errors():
    model = tiny_llama()
    with pytest.raises(RecipeError, match="matches no nn.Linear"):
        select_linears(model, r"nothing_here$")
    model.lm_head.weight = model.model.embed_tokens.weight
    linear = torch.nn.Linear(32, 64, bias=False)
    linear.weight = model.lm_head.weight
    model.extra = linear  # a selected weight shared with a module that is not selected
    with pytest.raises(RecipeError, match="tied weights"):
        select_linears(model, r"^extra$")
