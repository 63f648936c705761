"""The distillation divergence family: values and gradients against float64 references written here from
the formulas, limits, symmetries, masks, the chunked and top-k variants, and bad input.

The references use plain probabilities (softmax, .log(), broadcasting), not the log-space code under test. AKL's
and BD-KD's per-token weights come from plain-Python loops over one token's probabilities (``_py_*``), checked in
turn on distributions worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from llm_compress.distill.chunked import chunked_divergence, compress_teacher, get_divergence, topk_divergence
from llm_compress.distill.divergences import DIVERGENCES, SPECS, TOKENWISE
from llm_compress.errors import TrainingError

# (name, params) pairs covering every token-wise divergence, the endpoints included
CASES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("js", {}), ("gjsd", {"beta": 0.3}), ("gjsd", {"beta": 0.0}),
    ("gjsd", {"beta": 1.0}), ("tvd", {}), ("skew_kl", {}), ("skew_kl", {"alpha": 0.5}), ("skew_reverse_kl", {}),
    ("skew_reverse_kl", {"alpha": 0.7}), ("akl", {}), ("akl", {"mu": 0.9}), ("alpha_divergence", {}),
    ("alpha_divergence", {"alpha": 0.2}), ("alpha_divergence", {"alpha": 1.0}), ("bdkd", {}), ("bdkd", {"tau": 0.3}),
]
F_DIVERGENCES = ["forward_kl", "reverse_kl", "js", "gjsd", "tvd", "skew_kl", "skew_reverse_kl", "alpha_divergence"]


def _ids(cases):
    return [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" if kw else n for n, kw in cases]


# ------------------------------------------------------------------ float64 references

def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def ref_per_token(name, s, t, temperature=1.0, **kw):
    """Per-token divergence [...] in float64 from the textbook formulas."""
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(t.double() / temperature, -1)
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "js":
        m = (p + q) / 2
        return (_kl(p, m) + _kl(q, m)) / 2
    if name == "gjsd":
        b = kw.get("beta", 0.5)
        if b == 0:
            return _kl(p, q)
        if b == 1:
            return _kl(q, p)
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "tvd":
        return (p - q).abs().sum(-1) / 2
    if name == "skew_kl":
        a = kw.get("alpha", 0.1)
        return _kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = kw.get("alpha", 0.1)
        return _kl(q, a * q + (1 - a) * p)
    if name == "alpha_divergence":
        a = kw.get("alpha", 0.5)
        if a == 1:
            return _kl(p, q)
        if a == 0:
            return _kl(q, p)
        return (1 - (p**a * q ** (1 - a)).sum(-1)) / (a * (1 - a))
    if name in PY_FORWARD_WEIGHT:  # akl, bdkd: per-token weights (constants for the gradient) from plain Python
        v = p.shape[-1]
        pairs = zip(p.detach().reshape(-1, v).tolist(), q.detach().reshape(-1, v).tolist())
        w = torch.tensor([PY_FORWARD_WEIGHT[name](pp, qq, **kw) for pp, qq in pairs], dtype=p.dtype)
        w = w.reshape(p.shape[:-1])
        return w * _kl(p, q) + (1 - w) * _kl(q, p)
    raise KeyError(name)


def _py_kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def _py_entropy(a):
    return -sum(x * math.log(x) for x in a if x > 0)


def _py_akl_forward_weight(p, q, mu=0.5):
    """AKL's weight on KL(p || q) for one token (lists p = teacher, q = student): the head gap's share of the gap.

    Walk the teacher's tokens from the most likely down; a token is head while the teacher mass so far (itself
    included) is <= mu, and the first is always head (the AKL reference code's ``get_ratio``).
    """
    g_head = g_tail = mass = 0.0
    for rank, v in enumerate(sorted(range(len(p)), key=lambda i: -p[i])):
        mass += p[v]
        if rank == 0 or mass <= mu:
            g_head += abs(p[v] - q[v])
        else:
            g_tail += abs(p[v] - q[v])
    return g_head / (g_head + g_tail) if g_head + g_tail > 0 else 0.5


def _py_bdkd_forward_weight(p, q, tau=1.0):
    """BD-KD's weight on KL(p || q): 1 - w with w = sigmoid((H(q) - H(p)) / tau) the weight on KL(q || p)."""
    return 1.0 - 1.0 / (1.0 + math.exp(-(_py_entropy(q) - _py_entropy(p)) / tau))


PY_FORWARD_WEIGHT = {"akl": _py_akl_forward_weight, "bdkd": _py_bdkd_forward_weight}


def ref_loss(name, s, t, mask=None, temperature=1.0, **kw):
    d = ref_per_token(name, s, t, temperature, **kw)
    if mask is None:
        return d.mean()
    m = mask.double()
    return (d * m).sum() / m.sum()


def ref_sinkhorn(s, t, mask=None, temperature=1.0, epsilon=0.1, iterations=20, debias=True, reduction="mean"):
    """SinKD with plain (not log-space) Sinkhorn normalisation, float64; Feydy-style debiasing."""
    v = s.shape[-1]
    q = torch.softmax(s.double() / temperature, -1).reshape(-1, v)
    p = torch.softmax(t.double() / temperature, -1).reshape(-1, v)
    if mask is not None:
        keep = mask.reshape(-1) != 0
        q, p = q[keep], p[keep]

    def ot(a, b, entropic):
        w = (a[:, None, :] - b[None, :, :]).abs().sum(-1)  # [N, M] L1 costs
        k = torch.exp(-w / epsilon)
        for _ in range(iterations):
            k = k / k.sum(1, keepdim=True)
            k = k / k.sum(0, keepdim=True)
        plan = k / b.shape[0]
        out = (plan * w).sum()
        if entropic:
            out = out + epsilon * (plan * (plan.log() + math.log(a.shape[0] * b.shape[0]))).sum()
        return out

    loss = ot(q, p, debias) - 0.5 * (ot(q, q, True) + ot(p, p, True)) if debias else ot(q, p, False)
    return loss * q.shape[0] if reduction == "sum" else loss


def _pair(shape=(2, 3, 17), scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


# ------------------------------------------------------------------ values, gradients, basic properties

@pytest.mark.parametrize("name,kw", CASES, ids=_ids(CASES))
def test_value_and_gradient_match_float64_reference(name, kw):
    s, t = _pair()
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    s.requires_grad_()
    loss = DIVERGENCES[name](s, t, mask, 1.5, **kw)
    g, = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    ref = ref_loss(name, s64, t, mask, 1.5, **kw)
    g64, = torch.autograd.grad(ref, s64)
    assert abs(loss.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    torch.testing.assert_close(g.double(), g64, atol=1e-6, rtol=1e-4)
    assert torch.allclose(DIVERGENCES[name](s, t, mask, 1.5, scale_by_t2=True, **kw), 2.25 * loss)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_zero_when_equal_and_nonnegative(name):
    a, _ = _pair((3, 5, 40), 3.0)
    fn = DIVERGENCES[name]
    assert fn(a, a.clone()).abs().item() < 1e-6
    for seed in range(6):  # soft and very sharp distributions
        s, t = _pair((3, 5, 40), [0.5, 2.0, 8.0][seed % 3], seed + 1)
        value = fn(s, t).item()
        assert value > 1e-4, (seed, value)
        assert value >= 0


def test_sinkhorn_matches_plain_reference_value_and_gradient():
    s, t = _pair((2, 5, 12))
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    for kw in ({"debias": False}, {"debias": True}, {"debias": False, "reduction": "sum", "epsilon": 0.05},
               {"debias": True, "iterations": 5, "temperature": 2.0}):
        s1 = s.clone().requires_grad_()
        loss = DIVERGENCES["sinkhorn"](s1, t, mask, **kw)
        g, = torch.autograd.grad(loss, s1)
        s64 = s.double().requires_grad_()
        ref = ref_sinkhorn(s64, t, mask, **kw)
        g64, = torch.autograd.grad(ref, s64)
        assert abs(loss.item() - ref.item()) < 1e-5, (kw, loss.item(), ref.item())
        torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-3)


def test_sinkhorn_is_batch_wise_optimal_transport():
    s, t = _pair((1, 6, 20), 3.0)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    # transport between the two sets of tokens: pairing does not matter, unlike a token-wise divergence
    assert torch.allclose(DIVERGENCES["sinkhorn"](s, t), DIVERGENCES["sinkhorn"](s, t[:, perm]), atol=1e-6)
    assert not torch.allclose(DIVERGENCES["forward_kl"](s, t), DIVERGENCES["forward_kl"](s, t[:, perm]))
    # SinKD's own loss is not zero at q == p (the entropic plan leaks), the debiased one is
    assert DIVERGENCES["sinkhorn"](s, s.clone(), debias=False).item() > 1e-3
    assert DIVERGENCES["sinkhorn"](s, s.clone()).item() == 0.0
    n = s.shape[1]
    assert torch.allclose(DIVERGENCES["sinkhorn"](s, t, reduction="sum"), n * DIVERGENCES["sinkhorn"](s, t))


# ------------------------------------------------------------------ symmetries and limits

def test_symmetric_ones_are_symmetric_and_the_others_are_not():
    s, t = _pair((2, 4, 30), 2.5)
    # bdkd's value is symmetric too: swapping p and q swaps the KLs and turns w into 1 - w
    for name, kw in (("js", {}), ("tvd", {}), ("gjsd", {"beta": 0.5}), ("alpha_divergence", {"alpha": 0.5}),
                     ("bdkd", {"tau": 0.7})):
        fn = DIVERGENCES[name]
        assert torch.allclose(fn(s, t, **kw), fn(t, s, **kw), atol=1e-6), name
    for name in ("forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "akl"):
        assert not torch.allclose(DIVERGENCES[name](s, t), DIVERGENCES[name](t, s), atol=1e-4), name
    # mirror identities: swapping student and teacher mirrors the parameter
    assert torch.allclose(DIVERGENCES["gjsd"](s, t, beta=0.2), DIVERGENCES["gjsd"](t, s, beta=0.8), atol=1e-6)
    assert torch.allclose(DIVERGENCES["skew_kl"](s, t, alpha=0.3), DIVERGENCES["skew_reverse_kl"](t, s, alpha=0.3),
                          atol=1e-6)
    assert torch.allclose(DIVERGENCES["alpha_divergence"](s, t, alpha=0.2),
                          DIVERGENCES["alpha_divergence"](t, s, alpha=0.8), atol=1e-6)
    assert torch.allclose(DIVERGENCES["forward_kl"](s, t), DIVERGENCES["reverse_kl"](t, s), atol=1e-6)


def test_gjsd_ends_follow_gkd():
    s, t = _pair((2, 4, 30), 2.0)
    s, t = s.double(), t.double()  # float64 inputs are computed in float64: the limits need the precision
    fkl, rkl = DIVERGENCES["forward_kl"](s, t), DIVERGENCES["reverse_kl"](s, t)
    gjsd = DIVERGENCES["gjsd"]
    assert torch.equal(gjsd(s, t, beta=0.0), fkl) and torch.equal(gjsd(s, t, beta=1.0), rkl)  # GKD's endpoints
    assert torch.allclose(gjsd(s, t, beta=0.5), DIVERGENCES["js"](s, t))
    b = 1e-6
    # the interior vanishes at both ends (the loss jumps there), but its slope is the KL of that end
    assert gjsd(s, t, beta=b) < 1e-4 * fkl and gjsd(s, t, beta=1 - b) < 1e-4 * rkl
    assert torch.allclose(gjsd(s, t, beta=b) / b, fkl, rtol=1e-3)
    assert torch.allclose(gjsd(s, t, beta=1 - b) / b, rkl, rtol=1e-3)
    assert not torch.allclose(gjsd(s, t, beta=0.01) / 0.01, fkl, rtol=1e-3)  # (the check above can fail)


def test_skew_and_alpha_limits():
    s, t = _pair((2, 4, 30), 2.0)
    fkl, rkl = DIVERGENCES["forward_kl"](s, t), DIVERGENCES["reverse_kl"](s, t)
    assert torch.equal(DIVERGENCES["skew_kl"](s, t, alpha=0.0), fkl)
    assert torch.equal(DIVERGENCES["skew_reverse_kl"](s, t, alpha=0.0), rkl)
    s64, t64 = s.double(), t.double()
    assert torch.allclose(DIVERGENCES["skew_kl"](s64, t64, alpha=1e-7), fkl.double(), rtol=1e-4)
    assert torch.allclose(DIVERGENCES["skew_reverse_kl"](s64, t64, alpha=1e-7), rkl.double(), rtol=1e-4)
    # skew KL is bounded by log(1 / alpha) even where plain KL is huge
    sharp_s, sharp_t = s * 20, t * 20
    assert DIVERGENCES["forward_kl"](sharp_s, sharp_t) > 50
    assert DIVERGENCES["skew_kl"](sharp_s, sharp_t, alpha=0.1) <= math.log(10) + 1e-5
    ad = DIVERGENCES["alpha_divergence"]
    assert torch.equal(ad(s, t, alpha=1.0), fkl) and torch.equal(ad(s, t, alpha=0.0), rkl)
    assert torch.allclose(ad(s64, t64, alpha=1 - 1e-6), fkl.double(), rtol=1e-4)
    assert torch.allclose(ad(s64, t64, alpha=1e-6), rkl.double(), rtol=1e-4)
    q, p = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)  # alpha = 1/2: 2 sum (sqrt q - sqrt p)^2
    assert torch.allclose(ad(s, t, alpha=0.5).double(), (2 * (q.sqrt() - p.sqrt()) ** 2).sum(-1).mean(), atol=1e-6)


def test_akl_and_bdkd_on_a_distribution_worked_out_by_hand():
    p = [0.5, 0.25, 0.15, 0.1]  # teacher, already in descending order
    q = [0.3, 0.4, 0.1, 0.2]  # student
    fkl = 0.5 * math.log(0.5 / 0.3) + 0.25 * math.log(0.25 / 0.4) + 0.15 * math.log(0.15 / 0.1) + 0.1 * math.log(0.5)
    rkl = 0.3 * math.log(0.3 / 0.5) + 0.4 * math.log(0.4 / 0.25) + 0.1 * math.log(0.1 / 0.15) + 0.2 * math.log(2.0)
    assert fkl == pytest.approx(0.1294170, abs=1e-7) and rkl == pytest.approx(0.1328366, abs=1e-7)
    # AKL, mu = 0.6: the head is token 0 alone (teacher mass 0.5 <= 0.6 < 0.75); gaps |p - q|: head 0.2,
    # tail 0.15 + 0.05 + 0.1 = 0.3, so 0.4 KL(p || q) + 0.6 KL(q || p). mu = 0.8: tokens 0 and 1 (0.75 <= 0.8),
    # head 0.35, tail 0.15: 0.7 / 0.3. mu = 0.1: still token 0 (the teacher's argmax is always head).
    # BD-KD, tau = 1: H(p) = 1.2079737, H(q) = 1.2798542, w = sigmoid(0.0718805) = 0.5179624 on KL(q || p).
    expected = {("akl", 0.6): 0.4 * fkl + 0.6 * rkl, ("akl", 0.8): 0.7 * fkl + 0.3 * rkl,
                ("akl", 0.1): 0.4 * fkl + 0.6 * rkl, ("bdkd", 1.0): 0.4820376 * fkl + 0.5179624 * rkl}
    assert expected[("akl", 0.6)] == pytest.approx(0.1314688, abs=1e-7)
    assert expected[("bdkd", 1.0)] == pytest.approx(0.1311882, abs=1e-7)
    s = torch.tensor(q, dtype=torch.float64).log()[None]
    t = torch.tensor(p, dtype=torch.float64).log()[None]
    for (name, x), value in expected.items():
        kw = {"mu": x} if name == "akl" else {"tau": x}
        assert DIVERGENCES[name](s, t, **kw).item() == pytest.approx(value, abs=1e-6), (name, x)
        assert PY_FORWARD_WEIGHT[name](p, q, x) * fkl + (1 - PY_FORWARD_WEIGHT[name](p, q, x)) * rkl == \
            pytest.approx(value, abs=1e-6), (name, x)  # the plain-Python weights used as references elsewhere


def test_akl_weights_forward_kl_by_the_head_gap_and_reverse_kl_by_the_tail_gap():
    p = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])  # mu = 0.75: the head is the first two tokens
    head_equal = torch.tensor([0.4, 0.3, 0.15, 0.05, 0.05, 0.05])
    tail_equal = torch.tensor([0.45, 0.25, 0.1, 0.1, 0.05, 0.05])
    t = p.log()[None]
    akl = DIVERGENCES["akl"]
    assert torch.allclose(akl(head_equal.log()[None], t, mu=0.75), DIVERGENCES["reverse_kl"](head_equal.log()[None], t))
    assert torch.allclose(akl(tail_equal.log()[None], t, mu=0.75), DIVERGENCES["forward_kl"](tail_equal.log()[None], t))
    # with mu = 0.3 only the argmax is head: the tail now differs too, so both KLs get weight
    q = tail_equal.log()[None]
    fkl, rkl = DIVERGENCES["forward_kl"](q, t), DIVERGENCES["reverse_kl"](q, t)
    w = 0.05 / (0.05 + 0.05)  # head gap |0.4 - 0.45| and tail gap |0.3 - 0.25|
    assert torch.allclose(akl(q, t, mu=0.3), w * fkl + (1 - w) * rkl)
    assert not torch.allclose(fkl, rkl)


def test_bdkd_leans_on_reverse_kl_for_a_flat_student_and_forward_kl_for_a_sharp_one():
    flat = torch.zeros(1, 50)
    sharp = torch.zeros(1, 50)
    sharp[0, :3] = torch.tensor([9.0, 5.0, 4.0])
    bd, fkl, rkl = DIVERGENCES["bdkd"], DIVERGENCES["forward_kl"], DIVERGENCES["reverse_kl"]
    assert torch.allclose(bd(flat, sharp, tau=0.05), rkl(flat, sharp), rtol=1e-4)  # H(q) > H(p)
    assert torch.allclose(bd(sharp, flat, tau=0.05), fkl(sharp, flat), rtol=1e-4)  # H(q) < H(p)
    mid = bd(flat, sharp, tau=100.0)  # a very soft switch is close to the even mix
    assert torch.allclose(mid, (fkl(flat, sharp) + rkl(flat, sharp)) / 2, rtol=0.05)


def test_mode_seeking_and_mode_covering_preferences():
    """Which single-bump student each divergence prefers against a bimodal teacher over 1-D bins.

    (tests/test_units.py fits forward and reverse KL by gradient descent; here the other divergences compare
    a student on one mode with the moment-matched student spread over both.)
    """
    x = torch.linspace(-6, 6, 121)
    teacher = torch.logsumexp(torch.stack([-(x + 3) ** 2 / 0.5, -(x - 3) ** 2 / 0.5]), 0)[None]
    one_mode = (-(x - 3) ** 2 / 0.5)[None]
    cover = (-(x**2) / (2 * 3.04**2))[None]  # mean 0, variance 9.25 = the teacher's
    seeking = [("reverse_kl", {}), ("skew_reverse_kl", {}), ("gjsd", {"beta": 0.9}),
               ("alpha_divergence", {"alpha": 0.1})]
    covering = [("forward_kl", {}), ("gjsd", {"beta": 0.1}), ("alpha_divergence", {"alpha": 0.9})]
    for name, kw in seeking:
        fn = DIVERGENCES[name]
        assert fn(one_mode, teacher, **kw) * 1.3 < fn(cover, teacher, **kw), (name, kw)
    for name, kw in covering:
        fn = DIVERGENCES[name]
        assert fn(cover, teacher, **kw) * 1.3 < fn(one_mode, teacher, **kw), (name, kw)


# ------------------------------------------------------------------ masks

@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_masked_tokens_do_not_count(name):
    s, t = _pair((2, 6, 24), 2.0, seed=5)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]])
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0] = torch.randn(int((mask == 0).sum()), 24) * 5  # garbage where the mask is 0
    t2[mask == 0] = torch.randn(int((mask == 0).sum()), 24) * 5
    fns = [DIVERGENCES[name]]
    if name in TOKENWISE:
        fns += [lambda a, b, m: chunked_divergence(name, a, b, m, chunk_tokens=4),
                lambda a, b, m: topk_divergence(name, a, compress_teacher(b, 10), m, chunk_tokens=3)]
    for fn in fns:
        a, b = s.clone().requires_grad_(), s2.clone().requires_grad_()
        la, lb = fn(a, t, mask), fn(b, t2, mask)
        assert torch.allclose(la, lb, atol=1e-6)
        ga, = torch.autograd.grad(la, a)
        gb, = torch.autograd.grad(lb, b)
        assert torch.allclose(ga, gb, atol=1e-7)
        assert ga[mask == 0].abs().max() == 0
    if name in TOKENWISE:  # the mean runs over unmasked tokens only
        keep = mask.bool()
        assert torch.allclose(DIVERGENCES[name](s, t, mask), DIVERGENCES[name](s[keep][None], t[keep][None]),
                              atol=1e-6)
        zero = DIVERGENCES[name](s, t, torch.zeros_like(mask))
        assert zero.item() == 0.0


# ------------------------------------------------------------------ chunked

@pytest.mark.parametrize("name,kw", CASES, ids=_ids(CASES))
def test_chunked_equals_plain_loss_and_gradients(name, kw):
    s, t = _pair((3, 11, 64), 2.5, seed=7)
    mask = (torch.arange(33).reshape(3, 11) % 4 != 1).long()
    for chunk, m in ((1, mask), (5, mask), (None, None), (1000, mask), (4, None)):
        s0, t0 = s.clone().requires_grad_(), t.clone().requires_grad_()  # teacher gradients too (online KD)
        plain = DIVERGENCES[name](s0, t0, m, 1.3, **kw)
        gs0, gt0 = torch.autograd.grad(plain, (s0, t0))
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        chunked = chunked_divergence(name, s1, t1, m, 1.3, chunk_tokens=chunk, **kw)
        gs1, gt1 = torch.autograd.grad(chunked, (s1, t1))
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gs1, gs0, rtol=1e-4, atol=1e-8)
        if name not in ("akl", "bdkd"):  # those two detach their weights, so teacher gradients are partial
            torch.testing.assert_close(gt1, gt0, rtol=1e-4, atol=1e-8)


def test_chunked_backward_mechanics():
    s, t = _pair((2, 9, 40), 2.0, seed=3)
    # scaled loss (e.g. (1 - ce_weight) * kd), a non-contiguous [B, T-1, V] slice, bf16 logits
    a = s.clone().requires_grad_()
    (0.25 * DIVERGENCES["js"](a[:, :-1], t[:, :-1])).backward()
    b = s.clone().requires_grad_()
    (0.25 * chunked_divergence("js", b[:, :-1], t[:, :-1], chunk_tokens=4)).backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-9)
    assert b.grad[:, -1].abs().max() == 0
    c = s.bfloat16().requires_grad_()
    chunked_divergence("forward_kl", c, t.bfloat16(), chunk_tokens=5).backward()
    d = s.bfloat16().requires_grad_()
    DIVERGENCES["forward_kl"](d, t.bfloat16()).backward()
    assert c.grad.dtype == torch.bfloat16
    torch.testing.assert_close(c.grad.float(), d.grad.float(), rtol=2e-2, atol=1e-5)
    # no autograd: same value, nothing to hand back
    e = s.clone().requires_grad_()
    with torch.no_grad():
        value = chunked_divergence("reverse_kl", e, t, chunk_tokens=3)
    assert not value.requires_grad and torch.allclose(value, DIVERGENCES["reverse_kl"](s, t), atol=1e-7)
    # the gradient buffer is handed over once
    f = s.clone().requires_grad_()
    loss = chunked_divergence("tvd", f, t, chunk_tokens=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    # every token masked: zero loss, zero gradient
    g = s.clone().requires_grad_()
    loss = chunked_divergence("skew_kl", g, t, torch.zeros(2, 9), chunk_tokens=4)
    loss.backward()
    assert loss.item() == 0.0 and g.grad.abs().max() == 0


def test_every_divergence_is_registered_once_with_its_model():
    # A divergence's parameters and defaults are its config model's only: the functions take them as keywords, with
    # no defaults of their own, and called without any they compute with the model's defaults.
    import inspect

    from llm_compress.distill.config import DIVERGENCE_MODELS, divergence_params

    assert list(SPECS) == list(DIVERGENCE_MODELS) == list(DIVERGENCES)
    shared = ["student_logits", "teacher_logits", "mask", "temperature", "scale_by_t2", "params"]
    s, t = _pair((2, 3, 11))
    for name, spec in SPECS.items():
        assert spec.model is DIVERGENCE_MODELS[name] and DIVERGENCES[name] is spec.fn
        assert list(inspect.signature(spec.fn).parameters) == shared, name
        assert torch.equal(spec.fn(s, t), spec.fn(s, t, **divergence_params(spec.model()))), name


def test_get_divergence_binds_parameters_and_chunks():
    s, t = _pair((2, 5, 30))
    assert torch.equal(get_divergence("gjsd", beta=0.2)(s, t), DIVERGENCES["gjsd"](s, t, beta=0.2))
    assert get_divergence("reverse_kl") is DIVERGENCES["reverse_kl"]
    assert torch.allclose(get_divergence("js", chunked=True)(s, t, temperature=2.0), DIVERGENCES["js"](s, t,
                          temperature=2.0), atol=1e-7)
    assert torch.allclose(get_divergence("akl", chunk_tokens=3, mu=0.8)(s, t), DIVERGENCES["akl"](s, t, mu=0.8),
                          atol=1e-7)


# ------------------------------------------------------------------ top-k teacher

def test_compress_teacher():
    _, t = _pair((2, 3, 50), 3.0)
    ids, lp, tail = compress_teacher(t, 7, chunk_tokens=4)
    assert ids.shape == (2, 3, 7) and lp.shape == (2, 3, 7) and tail.shape == (2, 3) and ids.dtype == torch.int64
    log_p = torch.log_softmax(t, -1)
    assert torch.equal(ids, log_p.topk(7, -1).indices) and torch.allclose(lp, log_p.gather(-1, ids))
    assert (lp[..., :-1] >= lp[..., 1:]).all()
    total = torch.logsumexp(torch.cat([lp, tail[..., None]], -1), -1)  # top-k mass + tail mass = 1
    assert torch.allclose(total, torch.zeros(2, 3), atol=1e-6)
    ref_tail = torch.log(1 - torch.softmax(t.double(), -1).gather(-1, ids).sum(-1))
    assert torch.allclose(tail.double(), ref_tail, atol=1e-6)
    assert torch.isneginf(compress_teacher(t, 50).tail_logprob).all()
    hot = compress_teacher(t, 7, temperature=2.0)  # the temperature is baked in
    assert torch.allclose(hot.topk_logprobs, compress_teacher(t / 2, 7).topk_logprobs, atol=1e-6)


@pytest.mark.parametrize("name,kw", CASES, ids=_ids(CASES))
def test_topk_is_exact_when_k_is_the_vocabulary(name, kw):
    s, t = _pair((2, 5, 32), 2.0, seed=11)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]])
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    exact = DIVERGENCES[name](a, t, mask, 1.4, **kw)
    approx = topk_divergence(name, b, compress_teacher(t, 32, temperature=1.4), mask, 1.4, chunk_tokens=3, **kw)
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-7)
    ga, = torch.autograd.grad(exact, a)
    gb, = torch.autograd.grad(approx, b)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-8)


def test_topk_forward_kl_drops_exactly_the_tail_shape_mismatch():
    s, t = _pair((3, 4, 64), 2.0, seed=13)
    k = 20
    comp = compress_teacher(t, k)
    approx = topk_divergence("forward_kl", s, comp)
    exact = DIVERGENCES["forward_kl"](s, t)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, comp.topk_ids, False)  # [.., V] outside the top k
    p_tail, q_tail = (p * tail).sum(-1), (q * tail).sum(-1)
    pt, qt = p / p_tail[..., None], q / q_tail[..., None]  # conditionals on the tail
    tail_kl = (tail * pt * (pt.log() - qt.log())).sum(-1)
    assert torch.allclose((exact - approx).double(), (p_tail * tail_kl).mean(), atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "js", "tvd", "alpha_divergence", "akl"])
def test_topk_value_and_gradient_match_the_bucketed_float64_reference(name):
    s, t = _pair((2, 5, 40), 2.0, seed=19)
    k = 9
    comp = compress_teacher(t, k)
    a = s.clone().requires_grad_()
    loss = topk_divergence(name, a, comp, chunk_tokens=4)
    g, = torch.autograd.grad(loss, a)
    # the k + 1 class distributions built by hand: top-k entries plus the mass of everything else
    s64 = s.double().requires_grad_()
    log_q = torch.log_softmax(s64, -1)
    log_p = torch.log_softmax(t.double(), -1)
    in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, comp.topk_ids, True)

    def bucket(lp):
        tail = torch.log((lp.exp() * ~in_top).sum(-1, keepdim=True))
        return torch.cat([lp.gather(-1, comp.topk_ids), tail], -1)
    ref = ref_loss(name, bucket(log_q), bucket(log_p))  # softmax of log-probabilities is the distribution itself
    g64, = torch.autograd.grad(ref, s64)
    assert abs(loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(g.double(), g64, atol=1e-6, rtol=1e-4)


def test_topk_is_a_lower_bound_for_f_divergences_and_close_for_large_k():
    s, t = _pair((3, 4, 64), 2.0, seed=17)
    t = t * 2  # a peaked teacher, as LLM teachers are
    for name in F_DIVERGENCES:
        exact = DIVERGENCES[name](s, t).item()
        errors = []
        for k in (1, 8, 32, 60):
            approx = topk_divergence(name, s, compress_teacher(t, k)).item()
            assert approx <= exact + 1e-6, (name, k)
            errors.append(exact - approx)
        assert errors[-1] < 0.01 * exact and errors[-1] <= errors[0], (name, errors)


# ------------------------------------------------------------------ bad input

def test_bad_inputs_raise_clear_errors():
    s, t = _pair((2, 3, 10))
    with pytest.raises(TrainingError, match=r"unknown divergence 'kl'; available: forward_kl, reverse_kl, js, gjsd"):
        get_divergence("kl")
    with pytest.raises(TrainingError, match="unknown divergence 'kl'; available"):
        chunked_divergence("kl", s, t)
    with pytest.raises(TrainingError, match="batch-wise and cannot be chunked"):
        chunked_divergence("sinkhorn", s, t)
    with pytest.raises(TrainingError, match="batch-wise and cannot be chunked"):
        get_divergence("sinkhorn", chunked=True)
    for fn in (DIVERGENCES["js"], lambda a, b, *x, **k: chunked_divergence("js", a, b, *x, **k)):
        with pytest.raises(TrainingError, match="differ in shape"):
            fn(s, t[..., :9])
        for bad_t in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(TrainingError, match="temperature must be > 0"):
                fn(s, t, temperature=bad_t)
        with pytest.raises(TrainingError, match=r"mask shape \(2, 4\) must equal the logits' leading shape \(2, 3\)"):
            fn(s, t, torch.ones(2, 4))
        with pytest.raises(TrainingError, match="has no parameter 'beta'; its parameters: none"):
            fn(s, t, beta=0.3)
    with pytest.raises(TrainingError, match="must be floating point"):
        DIVERGENCES["forward_kl"](s.long(), t.long())
    bad = [("gjsd", {"beta": 1.5}, r"beta: Input should be less than or equal to 1, got 1.5"),
           ("gjsd", {"beta": -0.1}, r"beta: Input should be greater than or equal to 0"),
           ("skew_kl", {"alpha": 1.0}, r"alpha: Input should be less than 1, got 1.0"),
           ("skew_reverse_kl", {"alpha": -0.5}, r"alpha: Input should be greater than or equal to 0"),
           ("alpha_divergence", {"alpha": 1.2}, r"alpha: Input should be less than or equal to 1"),
           ("akl", {"mu": 2.0}, r"mu: Input should be less than or equal to 1"),
           ("bdkd", {"tau": 0.0}, "tau: Input should be greater than 0"),
           ("gjsd", {"beta": "0.5"}, r"beta: Input should be a valid number"),
           ("gjsd", {"alpha": 0.5}, "its parameters: beta"),
           ("sinkhorn", {"epsilon": -1.0}, "epsilon: Input should be greater than 0"),
           ("sinkhorn", {"iterations": 0}, "iterations: Input should be greater than or equal to 1"),
           ("sinkhorn", {"debias": "yes"}, "debias: Input should be a valid boolean"),
           ("sinkhorn", {"reduction": "max"}, "reduction: Input should be 'mean' or 'sum'")]
    for name, kw, msg in bad:
        with pytest.raises(TrainingError, match=f"divergence '{name}'.*{msg}"):
            DIVERGENCES[name](s, t, **kw)
        with pytest.raises(TrainingError, match=msg):
            get_divergence(name, **kw)  # fails when the trainer is set up, not at the first step
        if SPECS[name].tokenwise:
            with pytest.raises(TrainingError, match=msg):
                chunked_divergence(name, s, t, **kw)
    with pytest.raises(TrainingError, match="chunk_tokens must be None .* or an integer >= 1"):
        chunked_divergence("js", s, t, chunk_tokens=0)
    with pytest.raises(TrainingError, match=r"k must be an integer in \[1, V = 10\]"):
        compress_teacher(t, 11)
    with pytest.raises(TrainingError, match=r"k must be an integer in \[1, V = 10\]"):
        compress_teacher(t, 0)
    comp = compress_teacher(t, 4)
    with pytest.raises(TrainingError, match="must be \\[..., k\\] with the student logits' leading shape"):
        topk_divergence("forward_kl", s[:1], comp)
    with pytest.raises(TrainingError, match="topk_logprobs .* must match topk_ids"):
        topk_divergence("forward_kl", s, (comp.topk_ids, comp.topk_logprobs[..., :3], comp.tail_logprob))
    with pytest.raises(TrainingError, match="ids outside"):
        topk_divergence("forward_kl", s, (comp.topk_ids + 9, comp.topk_logprobs, comp.tail_logprob))
    with pytest.raises(TrainingError, match="must be an integer tensor"):
        topk_divergence("forward_kl", s, (comp.topk_ids.float(), comp.topk_logprobs, comp.tail_logprob))
    with pytest.raises(TrainingError, match="batch-wise"):
        topk_divergence("sinkhorn", s, comp)


def test_teacher_minus_infinity_logits_stay_finite():
    """A top-k filtered teacher (-inf logits) gives p = 0 there: every divergence stays finite."""
    s, t = _pair((2, 3, 20), 2.0)
    t[..., 10:] = float("-inf")
    for name, fn in DIVERGENCES.items():
        a = s.clone().requires_grad_()
        loss = fn(a, t)
        g, = torch.autograd.grad(loss, a)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), name
    p = torch.softmax(t[..., :10].double(), -1)  # the teacher lives on the first 10 ids
    log_q = torch.log_softmax(s.double(), -1)[..., :10]  # the student's full softmax there
    ref = (p * (p.log() - log_q)).sum(-1).mean()
    assert torch.allclose(DIVERGENCES["forward_kl"](s, t).double(), ref, atol=1e-5)
