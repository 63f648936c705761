"""Quantizers (RTN weights, per-token activations, KV cache), GPTQ, and the fake-quant hooks, on tiny random data."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_compress.errors import InputError
from llm_compress.quantize import fakequant
from llm_compress.quantize.fakequant import attach_fake_quant
from llm_compress.quantize.gptq import gptq_quantize_model, gptq_quantize_weight, gptq_solve
from llm_compress.quantize.quantizers import (QuantSetting, fake_quant_kv, fake_quant_per_token, parse_setting,
                                              quant_range, quantize_weight, search_clip_ratio, weight_qparams)
from llm_compress.quantize.rtn import quantize_tensor


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _levels(x: torch.Tensor) -> int:
    return int(torch.unique(x).numel())


# ---------------------------------------------------------------------------------------------------------------
# weights


def _rtn_by_hand(rows: list[list[float]], bits: int, group_size: int | None, symmetric: bool, clip: float = 1.0):
    """RTN written out from the grids in ``llm_compress.quantize.quantizers``' docstring, one group at a time in
    Python."""
    out = []
    for row in rows:
        g = group_size or len(row)
        q_row = []
        for start in range(0, len(row), g):
            group = row[start:start + g]
            if symmetric:  # s = r max|x| / (2^(b-1) - 1), z = 0, codes in [-2^(b-1), 2^(b-1) - 1]
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                scale, zero = clip * max(abs(x) for x in group) / qmax, 0
            else:  # s = r (max' - min') / (2^b - 1), z = round(-r min' / s), codes in [0, 2^b - 1]
                qmin, qmax = 0, 2**bits - 1
                lo, hi = clip * min(min(group), 0.0), clip * max(max(group), 0.0)
                scale = (hi - lo) / (qmax - qmin)
                zero = round(-lo / scale)
            q_row += [(min(max(round(x / scale) + zero, qmin), qmax) - zero) * scale for x in group]
        out.append(q_row)
    return out


def test_quantize_weight_on_a_matrix_worked_out_by_hand():
    w = torch.tensor([[0.1, -0.5, 0.3, 0.9], [0.2, 0.4, -0.6, -0.3]])
    # symmetric 2-bit, per row: codes in [-2, 1], s = max|w| / 1; row 0: s = 0.9, w / s = 0.11, -0.56, 0.33, 1
    # -> 0, -1, 0, 1; row 1: s = 0.6, w / s = 0.33, 0.67, -1, -0.5 -> 0, 1, -1, -0 (round half to even)
    torch.testing.assert_close(quantize_weight(w, 2, symmetric=True),
                               torch.tensor([[0.0, -0.9, 0.0, 0.9], [0.0, 0.6, -0.6, 0.0]]))
    # asymmetric 2-bit, row 0: codes in [0, 3], s = (0.9 + 0.5) / 3 = 0.4667, z = round(0.5 / s) = 1;
    # w / s = 0.21, -1.07, 0.64, 1.93 -> 0 + 1, -1 + 1, 1 + 1, 2 + 1 -> (q - z) s = 0, -s, s, 2 s
    s0 = 1.4 / 3
    torch.testing.assert_close(quantize_weight(w[:1], 2, symmetric=False), torch.tensor([[0.0, -s0, s0, 2 * s0]]))
    # groups of 2, symmetric 3-bit (codes in [-4, 3]): group (0.1, -0.5): s = 0.5 / 3, codes 0.6 -> 1, -3;
    # group (0.3, 0.9): s = 0.3, codes 1, 3
    torch.testing.assert_close(quantize_weight(w[:1], 3, group_size=2, symmetric=True),
                               torch.tensor([[0.5 / 3, -0.5, 0.3, 0.9]]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_quantize_weight_and_the_rtn_entry_point_match_rtn_written_out_by_hand(symmetric, group_size, clip):
    w = torch.randn(8, 64, generator=_gen(0))
    ref = torch.tensor(_rtn_by_hand(w.tolist(), 4, group_size, symmetric, clip), dtype=torch.float64)  # in float64
    for fn in (quantize_weight, quantize_tensor):  # the stage's entry point checks the layer, then rounds alike
        got = fn(w, 4, group_size, symmetric, clip)
        assert got.dtype == w.dtype
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6, msg=fn.__name__)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_quantize_weight_error_bound_and_levels(bits, symmetric, group_size):
    w = torch.randn(6, 64, generator=_gen(bits)) * torch.logspace(-2, 1, 6)[:, None]
    q = quantize_weight(w, bits, group_size, symmetric)
    assert q.shape == w.shape and q.dtype == w.dtype
    scale, zero = weight_qparams(w, bits, group_size, symmetric)
    n_groups = 1 if group_size is None else 64 // group_size
    assert scale.shape == zero.shape == (6, n_groups, 1)
    wg, qg = w.view(6, n_groups, -1), q.view(6, n_groups, -1)
    # every value is inside the range at clip 1.0, so rounding moves it by at most half a step
    assert ((wg - qg).abs() <= scale / 2 * (1 + 1e-5) + 1e-7).all()
    # values are on the grid: integer codes within [qmin, qmax]
    qmin, qmax = quant_range(bits, symmetric)
    codes = qg / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    for r in range(6):
        for g in range(n_groups):
            assert _levels(qg[r, g]) <= 2**bits


def test_quantize_weight_exact_on_grid():
    ints = torch.randint(-7, 8, (4, 32), generator=_gen(1)).float()
    ints[:, 0] = 7  # sets max|w| = 7 * 0.125, so the symmetric 4-bit scale is exactly 0.125
    w = ints * 0.125
    assert torch.equal(quantize_weight(w, 4, symmetric=True), w)
    ints = torch.randint(-5, 11, (4, 32), generator=_gen(2)).float()
    ints[:, 0], ints[:, 1] = -5, 10  # range 15 * 0.25: the asymmetric 4-bit scale is 0.25, zero point 5
    w = ints * 0.25
    assert torch.equal(quantize_weight(w, 4, symmetric=False), w)
    assert torch.equal(quantize_weight(w, 4, group_size=8, symmetric=False)[:, :8], w[:, :8])


def test_asymmetric_beats_symmetric_on_one_sided_weights():
    w = torch.rand(16, 64, generator=_gen(3))
    mse = {s: (quantize_weight(w, 3, symmetric=s) - w).pow(2).mean() for s in (True, False)}
    assert mse[False] < 0.5 * mse[True]


def test_quantize_weight_bad_arguments():
    w = torch.randn(4, 12)
    for kwargs in (dict(bits=1), dict(bits=9), dict(bits=4, group_size=5), dict(bits=4, clip_ratio=0.0),
                   dict(bits=4, clip_ratio=1.5), dict(bits=4, group_size=0)):
        with pytest.raises(InputError):
            quantize_weight(w, **kwargs)
    with pytest.raises(InputError):
        quantize_weight(torch.randn(2, 3, 4), 4)


@pytest.mark.parametrize("group_size", [None, 16])
def test_clip_search_never_worse_and_clips_heavy_tails(group_size):
    w = torch.distributions.StudentT(2.0).sample((32, 64))
    for norm in (2.0, 2.4):
        ratio = search_clip_ratio(w, 3, group_size, True, grid=20, min_ratio=0.5, norm=norm)
        n_groups = 1 if group_size is None else 4
        assert ratio.shape == (32, n_groups, 1)
        assert ratio.min() >= 0.5 - 1e-6 and ratio.max() <= 1.0
        err_clip = (quantize_weight(w, 3, group_size, True, ratio) - w).abs().pow(norm)
        err_full = (quantize_weight(w, 3, group_size, True, 1.0) - w).abs().pow(norm)
        per_group = lambda e: e.view(32, n_groups, -1).sum(-1)  # noqa: E731
        assert (per_group(err_clip) <= per_group(err_full) * (1 + 1e-5)).all()
        assert (ratio < 1).any() and err_clip.sum() < err_full.sum()


# ---------------------------------------------------------------------------------------------------------------
# activations and KV


def test_fake_quant_per_token_levels_independence_and_identity():
    x = torch.randn(2, 5, 32, generator=_gen(4))
    q = fake_quant_per_token(x, 4)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert all(_levels(q[b, t]) <= 16 for b in range(2) for t in range(5))
    step = x.abs().amax(-1, keepdim=True) / 7  # symmetric 4-bit: max|x| / (2^3 - 1)
    assert ((q - x).abs() <= step / 2 * (1 + 1e-5)).all()
    x2 = x.clone()
    x2[0, 0] *= 100.0  # an outlier token changes only its own scale
    q2 = fake_quant_per_token(x2, 4)
    assert torch.equal(q2[0, 1:], q[0, 1:]) and torch.equal(q2[1], q[1])
    assert fake_quant_per_token(x, 16) is x
    xb = x.to(torch.bfloat16)
    assert fake_quant_per_token(xb, 4).dtype == torch.bfloat16
    # groups of the last dim get their own scale
    qg = fake_quant_per_token(x, 2, group_size=8)
    assert all(_levels(qg[b, t, i:i + 8]) <= 4 for b in range(2) for t in range(5) for i in range(0, 32, 8))
    assert (qg - x).pow(2).mean() < (fake_quant_per_token(x, 2) - x).pow(2).mean()
    # clipping shrinks the range of every token (the symmetric grid has one extra negative level: -128 s)
    qc = fake_quant_per_token(x, 8, clip_ratio=0.5)
    assert (qc.abs().amax(-1) <= 0.5 * x.abs().amax(-1) * 128 / 127 * (1 + 1e-5)).all()


@pytest.mark.parametrize("fn", [lambda t: fake_quant_per_token(t, 3),
                                lambda t: fake_quant_kv(t, 2, group_size=4)])
def test_gradient_passes_the_rounding_and_sees_the_quantization_error(fn):
    """Training path: same values as inference; rounding straight through; the scale's dependence on x kept.

    With a whole-quantizer straight-through gradient, d||Q(x) - x||^2 / dx would be exactly 0 (Q's gradient is the
    identity), so transforms trained through it could not learn to reduce the error; here it is not 0.
    """
    x = torch.randn(2, 3, 4, 8, generator=_gen(5), requires_grad=True)
    y = fn(x)
    with torch.no_grad():
        assert torch.equal(y, fn(x.detach()))  # the training path computes the same quantized values
    assert not torch.equal(y.detach(), x.detach())
    (y - x).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 1e-3


def test_rounding_gradient_is_the_identity_for_a_fixed_scale():
    """Away from the range ends, d Q(x)_i / d x_i = 1 + (round(v_i) - v_i) ds/dx_i: for an entry that does not set
    the scale (not the absmax) the scale does not depend on it, so its own gradient is exactly 1."""
    x = torch.tensor([[0.3, -0.7, 1.0, 0.05]], requires_grad=True)
    fake_quant_per_token(x, 4)[0, 0].backward()
    assert x.grad[0, 0].item() == pytest.approx(1.0) and x.grad[0, 1].item() == 0.0


def test_fake_quant_kv_shape_levels_and_bounds():
    x = torch.randn(2, 3, 7, 16, generator=_gen(7)) + 0.5
    for group_size, bits in ((None, 4), (8, 3), (4, 2)):
        q = fake_quant_kv(x, bits, group_size)  # asymmetric by default
        gs = group_size or 16
        assert q.shape == x.shape
        xg, qg = x.view(2, 3, 7, -1, gs), q.view(2, 3, 7, -1, gs)
        lo, hi = xg.amin(-1, keepdim=True).clamp_max(0), xg.amax(-1, keepdim=True).clamp_min(0)
        step = (hi - lo) / (2**bits - 1)
        assert ((qg - xg).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()
        levels = torch.tensor([_levels(v) for v in qg.reshape(-1, gs)])
        assert levels.max() <= 2**bits
    assert fake_quant_kv(x, 16) is x
    with pytest.raises(InputError):
        fake_quant_kv(x[0], 4)
    with pytest.raises(InputError):
        fake_quant_kv(x, 4, group_size=5)


# ---------------------------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("name, bits", [("W4A16", (4, 16, 16)), ("W8A8", (8, 8, 16)), ("W4A8", (4, 8, 16)),
                                        ("W4A4KV4", (4, 4, 4)), ("W4A4KV16", (4, 4, 16)), ("W3A16", (3, 16, 16)),
                                        ("w4a4kv8", (4, 4, 8)), ("W16A16KV16", (16, 16, 16))])
def test_parse_setting_good(name, bits):
    s = parse_setting(name)
    assert (s.w_bits, s.a_bits, s.kv_bits) == bits
    assert s.w_group_size is None and s.w_symmetric and s.a_symmetric and not s.kv_symmetric


def test_parse_setting_group_suffix_and_options():
    s = parse_setting("W4A16g128")
    assert s.w_group_size == 128 and s.name == "W4A16KV16g128"
    assert parse_setting("W4A4", w_group_size=64, w_symmetric=False) == QuantSetting(4, 4, 16, 64, False)


@pytest.mark.parametrize("name", ["W4", "A4W4", "W4A4KV", "W1A16", "W4A32", "W4A4KV9", "4-4-4", "", "W4A16g0"])
def test_parse_setting_bad(name):
    with pytest.raises(InputError, match=r"W<bits>A<bits>"):
        parse_setting(name)


# ---------------------------------------------------------------------------------------------------------------
# GPTQ on one layer


def _layer_problem(seed: int, n: int = 1024, d: int = 128, out: int = 48):
    """Correlated inputs X [n, d] with uneven channel scales, a weight [out, d] and H = 2/n XᵀX."""
    g = _gen(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    X = (torch.randn(n, d, generator=g) @ mix) * scales
    W = torch.randn(out, d, generator=g)
    return X, W, 2 / n * X.T @ X


def _out_err(X, W, Q) -> float:
    return ((X @ (W - Q).T).norm() / (X @ W.T).norm()).item()


@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_rtn_and_act_order_helps(group_size):
    errs = {"rtn": [], "gptq": [], "act": []}
    for seed in range(3):
        X, W, H = _layer_problem(seed)
        errs["rtn"].append(_out_err(X, W, quantize_weight(W, 3, group_size)))
        errs["gptq"].append(_out_err(X, W, gptq_quantize_weight(W, H, 3, group_size)))
        errs["act"].append(_out_err(X, W, gptq_quantize_weight(W, H, 3, group_size, act_order=True)))
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    assert all(g < 0.95 * r for g, r in zip(errs["gptq"], errs["rtn"]))
    assert mean["act"] <= mean["gptq"]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric, group_size, clip", [(True, None, False), (False, 32, False), (True, 16, True)])
def test_gptq_result_on_grid_of_its_groups(act_order, symmetric, group_size, clip):
    X, W, H = _layer_problem(10, n=256, d=64, out=16)
    res = gptq_solve(W, H, 3, group_size, symmetric, act_order, block_size=24, clip_search=clip)
    n_groups = 1 if group_size is None else 64 // group_size
    assert res.scale.shape == res.zero.shape == (16, n_groups, 1)
    codes = res.weight.view(16, n_groups, -1) / res.scale + res.zero
    qmin, qmax = quant_range(3, symmetric)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    assert res.loss > 0


@pytest.mark.parametrize("act_order, group_size", [(False, None), (False, 32), (True, 32)])
def test_gptq_independent_of_block_size(act_order, group_size):
    # lazy block updates, and group params read across block borders, are exact reorganisations
    X, W, H = _layer_problem(11, n=256, d=64, out=16)
    a = gptq_quantize_weight(W, H, 4, group_size, act_order=act_order, block_size=64)
    b = gptq_quantize_weight(W, H, 4, group_size, act_order=act_order, block_size=7)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_with_uncorrelated_inputs_is_rtn(group_size):
    W = torch.randn(8, 64, generator=_gen(12))
    H = torch.diag(torch.rand(64, generator=_gen(13)) + 0.5)
    assert torch.allclose(gptq_quantize_weight(W, H, 4, group_size, percdamp=0.0), quantize_weight(W, 4, group_size))


def test_gptq_dead_columns_and_dtype():
    X, W, _ = _layer_problem(14, n=512, d=64, out=16)
    dead = torch.tensor([0, 5, 33, 63])
    X[:, dead] = 0
    H = 2 / 512 * X.T @ X
    Q = gptq_quantize_weight(W, H, 3, 16, act_order=True)
    assert torch.isfinite(Q).all() and (Q[:, dead] == 0).all()
    assert _out_err(X, W, Q) < _out_err(X, W, quantize_weight(W, 3, 16))
    Qb = gptq_quantize_weight(W.to(torch.bfloat16), H, 4)
    assert Qb.dtype == torch.bfloat16 and Qb.shape == W.shape


def test_gptq_bad_hessian_raises_clear_error():
    W = torch.randn(4, 8)
    with pytest.raises(InputError, match="not positive definite"):
        gptq_quantize_weight(W, -torch.eye(8), 4)
    with pytest.raises(InputError, match="non-finite"):
        gptq_quantize_weight(W, torch.full((8, 8), float("nan")), 4)
    with pytest.raises(InputError):
        gptq_quantize_weight(W, torch.eye(7), 4)


# ---------------------------------------------------------------------------------------------------------------
# tiny models

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=256)


def _tiny(model_type: str = "llama", attn: str | None = None, seed: int = 0):
    import transformers

    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn} if attn else {}
    return cls_model(cls_cfg(**TINY, **kwargs)).eval()


def _ids(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n, length), generator=_gen(seed))


@torch.no_grad()
def test_gptq_model_beats_rtn_on_calibration_logits():
    from llm_compress.quantize.rtn import quantize_model

    fp = _tiny()
    ids = _ids(16, 32)
    ref = fp(ids).logits
    errs = {}
    for method in ("gptq", "rtn"):
        m = copy.deepcopy(fp)
        if method == "gptq":
            stats = gptq_quantize_model(m, ids, 3, None, True, False, 0.01, False, batch_size=8)
        else:
            quantize_model(m, 3, None, True, ["lm_head"])
        errs[method] = ((m(ids).logits - ref).norm() / ref.norm()).item()
    assert errs["gptq"] < 0.9 * errs["rtn"]
    assert len(stats["layers"]) == 14 and set(stats["gptq_loss"]) == set(stats["layers"])
    assert stats["quantized_params"] == sum(p.numel() for n, p in fp.model.layers.named_parameters()
                                            if n.endswith("proj.weight"))
    assert all(0 < v < 1 for v in stats["layers"].values())


@torch.no_grad()
def test_gptq_model_skip_and_not_true_sequential():
    fp = _tiny()
    m = copy.deepcopy(fp)
    stats = gptq_quantize_model(m, [_ids(1, 16, s)[0] for s in range(3)], 4, 32, False, True, 0.01, True,
                                skip=("lm_head", "down_proj"), true_sequential=False)
    assert len(stats["layers"]) == 12 and not any("down_proj" in n for n in stats["layers"])
    for name, p in m.named_parameters():
        same = torch.equal(p, fp.get_parameter(name))
        assert same == (not name.endswith("proj.weight") or "down_proj" in name), name
    with pytest.raises(InputError):
        gptq_quantize_model(m, torch.zeros(0, 4, dtype=torch.long), 4, None, True, False, 0.01, False)


# ---------------------------------------------------------------------------------------------------------------
# fake-quant hooks


@torch.no_grad()
def test_attach_w16a16kv16_is_identity_and_a4_changes_then_remove_restores():
    m = _tiny()
    ids = _ids()
    ref = m(ids).logits
    impl = m.config._attn_implementation
    with attach_fake_quant(m, parse_setting("W16A16KV16")):
        assert torch.equal(m(ids).logits, ref)
    h = attach_fake_quant(m, parse_setting("W16A4"))
    out = m(ids).logits
    assert not torch.allclose(out, ref, atol=1e-3)
    assert ((out - ref).norm() / ref.norm()) < 0.5  # perturbed, not destroyed
    with pytest.raises(InputError, match="already attached"):
        attach_fake_quant(m, parse_setting("W16A8"))
    h.remove()
    h.remove()  # idempotent
    assert torch.equal(m(ids).logits, ref) and m.config._attn_implementation == impl


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_attach_kv_quant_takes_effect_and_is_undone(attn):
    m = _tiny(attn=attn)
    ids = _ids()
    ref = m(ids).logits
    with attach_fake_quant(m, parse_setting("W16A16KV16")):
        assert m.config._attn_implementation == attn
        assert torch.equal(m(ids).logits, ref)
    with attach_fake_quant(m, parse_setting("W16A16KV2")):
        assert m.config._attn_implementation == f"fakequant_kv_{attn}"
        kv2 = m(ids).logits
    with attach_fake_quant(m, parse_setting("W16A16KV8")):
        kv8 = m(ids).logits
    assert not torch.allclose(kv2, ref, atol=1e-3)
    assert (kv8 - ref).norm() < 0.2 * (kv2 - ref).norm()
    assert m.config._attn_implementation == attn
    assert torch.equal(m(ids).logits, ref)


@torch.no_grad()
def test_kv_quant_sees_post_rope_keys_per_kv_head(monkeypatch):
    m = _tiny()
    ids = _ids(2, 8)
    seen, pre = [], []
    real = fakequant.fake_quant_kv
    monkeypatch.setattr(fakequant, "fake_quant_kv", lambda x, *a, **k: (seen.append(x.clone()), real(x, *a, **k))[1])
    attn = m.model.layers[0].self_attn
    hook = attn.k_proj.register_forward_hook(lambda mod, i, o: pre.append(o.view(2, 8, 2, 16).transpose(1, 2)))
    with attach_fake_quant(m, parse_setting("W16A16KV4")):
        m(ids)
    hook.remove()
    key = [x for x in seen if x.shape[0] == 2][0]  # layer 0's key (after the argument check on a dummy)
    assert key.shape == (2, 2, 8, 16)  # [batch, n_kv_heads (before repeat for GQA), seq, head_dim]
    assert torch.allclose(key[:, :, 0], pre[0][:, :, 0], atol=1e-6)  # RoPE is the identity at position 0
    assert not torch.allclose(key[:, :, 1:], pre[0][:, :, 1:], atol=1e-3)  # ... and rotates the others


@torch.no_grad()
def test_kv_quant_respects_padding_mask():
    m = _tiny()
    ids = _ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding in the first row
    ref = m(ids, attention_mask=mask).logits
    with attach_fake_quant(m, parse_setting("W16A16KV8")):
        out = m(ids, attention_mask=mask).logits
    unmasked = m(ids).logits
    gap = (unmasked[0, 5:] - ref[0, 5:]).abs().max()
    assert gap > 1e-2  # the mask matters for these logits
    assert (out[:, 5:] - ref[:, 5:]).abs().max() < 0.2 * gap


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
@torch.no_grad()
def test_attach_supports_mistral_and_qwen2(model_type):
    m = _tiny(model_type)
    ids = _ids()
    ref = m(ids).logits
    with attach_fake_quant(m, parse_setting("W16A4KV4"), a_clip_ratio=0.9, kv_group_size=8, o_proj_group_size=16):
        assert not torch.allclose(m(ids).logits, ref, atol=1e-3)
    assert torch.equal(m(ids).logits, ref)


def test_attach_trains_through_quantizers():
    m = _tiny()
    ids = _ids(2, 8)
    with attach_fake_quant(m, parse_setting("W16A4KV4")):
        m(ids, labels=ids).loss.backward()
    grad = m.model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_attach_rejects_unsupported_models_and_bad_arguments():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(InputError, match="llama, mistral, qwen2"):
        attach_fake_quant(gpt2, parse_setting("W16A4"))
    m = _tiny()
    with pytest.raises(InputError):
        attach_fake_quant(m, parse_setting("W16A16KV4"), kv_group_size=5)
    with pytest.raises(InputError):
        attach_fake_quant(m, parse_setting("W16A4"), a_clip_ratio=0.0)
    assert getattr(m, "_fakequant_handle", None) is None and m.config._attn_implementation == "sdpa"


def test_every_method_reaches_a_registered_weight_quantizer():
    # apply() dispatches on the registries: each method's weight quantizer (its own name, or OSTQuant's choice) and
    # the transforms some methods run first; calibration is read by the methods whose model has a calibration section.
    from typing import get_args

    from llm_compress.quantize.apply import TRANSFORMS, WEIGHT_QUANTIZERS
    from llm_compress.quantize.config import QuantMethod

    methods = {m.model_fields["method"].default: m for m in get_args(get_args(QuantMethod)[0])}
    assert list(methods) == ["rtn", "gptq", "ostquant"]
    choices = get_args(methods["ostquant"].model_fields["weight_quantizer"].annotation)
    assert set(WEIGHT_QUANTIZERS) == {"rtn", "gptq"} == set(choices) and set(TRANSFORMS) == {"ostquant"}
    assert [m().calibrated for m in methods.values()] == [False, True, True]
