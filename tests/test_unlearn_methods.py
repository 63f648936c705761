"""The gradient unlearning methods: SHRED's pure functions on hand-made tensors, each loss at the start, and the shared
loop on a tiny random Llama that first memorises its forget set."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llm_compress.errors import TrainingError
from llm_compress.unlearn.base import Batch, UnlearnData
from llm_compress.unlearn.config import GradientAscentConfig, GradientDifferenceConfig, NPOConfig, ShredConfig
from llm_compress.unlearn.data import ForgetSet
from llm_compress.unlearn.gradient_ascent import GradientAscent
from llm_compress.unlearn.gradient_difference import GradientDifference
from llm_compress.unlearn.loop import mean_span_nll, token_logp
from llm_compress.unlearn.npo import NPO
from llm_compress.unlearn.shred import Shred, demoted_targets, forget_positions, shred_loss

N, T, V = 8, 16, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs ~10x faster on one thread than on two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama that has memorised 8 random records (span: tokens 5.. of each, right-padded), general rows
    (retain) and held-out rows never trained on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (N, T), generator=g)
    lens = torch.tensor([16, 14, 12, 16, 10, 15, 16, 13])
    attn = torch.arange(T)[None] < lens[:, None]
    ids[~attn] = 0
    span = attn & (torch.arange(T)[None] >= 5)
    fs = ForgetSet(ids, attn, span, torch.full((N,), 5), 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):  # memorise the forget set
        lp = token_logp(model(ids, attention_mask=attn).logits, ids)
        loss = -(lp * attn).sum() / attn.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    general = torch.randint(1, V, (16, T), generator=g)
    held = torch.randint(1, V, (8, T), generator=g)
    return model, UnlearnData(fs, general), held


def _nll(model, fs):
    with torch.no_grad():
        return mean_span_nll(model(fs.ids, attention_mask=fs.attn).logits, fs).item()


def _kl(orig, model, rows):
    """Mean KL(orig || model) of the next-token distributions over all positions of ``rows``."""
    with torch.no_grad():
        p, q = orig(rows).logits.log_softmax(-1), model(rows).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


# ---------------------------------------------------------------------------------------------------- pure functions

def test_forget_positions_by_hand():
    lp = torch.full((2, 8), -100.0)  # pads and prompt: never chosen however unlikely
    span = torch.zeros(2, 8, dtype=torch.bool)
    span[0, 2:8] = True  # 6 span positions, the first skipped -> 5 eligible, ceil(0.5 * 5) = 3 chosen
    lp[0, 2:8] = torch.tensor([-9.0, -2.0, -3.0, -2.0, -0.5, -2.0])  # position 2 is skipped; ties at 3, 5, 7
    span[1, 3:5] = True  # a 5-token record: 2 span positions, 1 eligible, ceil(0.5) = 1
    lp[1, :5] = torch.tensor([0.0, -1.0, -1.0, -0.1, -0.2])
    want = torch.zeros(2, 8, dtype=torch.bool)
    want[0, [3, 4, 5]] = True  # -3 at 4, then the two earliest of the -2 ties (3, 5; not 7)
    want[1, 4] = True
    assert torch.equal(forget_positions(lp, span, 0.5, 1), want)
    assert not forget_positions(lp, span, 0.5, 6).any()  # everything skipped
    ten = torch.zeros(1, 12, dtype=torch.bool)
    ten[0, 2:12] = True
    assert forget_positions(torch.randn(1, 12), ten, 0.3, 0).sum() == 3  # not ceil(3.0000000000000004) = 4


def _hand_logits():
    """One record, V = 6, K = 3: position 1 forget (true token 0, the top-1), 2 anchor (token 5), 3 forget with its
    true token 0 outside the top-K."""
    logits = torch.zeros(1, 4, 6)
    logits[0, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])  # predicts token 1
    logits[0, 1] = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # predicts token 2
    logits[0, 2] = torch.tensor([-5.0, 0.0, 1.0, 2.0, 3.0, 4.0])  # predicts token 3
    ids = torch.tensor([[1, 0, 5, 0]])
    span = torch.tensor([[False, True, True, True]])
    forget = torch.tensor([[False, True, False, True]])
    return logits, ids, span, forget


@pytest.mark.parametrize("rule", ["subtract", "floor"])
def test_demoted_targets_by_hand(rule):
    logits, ids, span, forget = _hand_logits()
    g = 2.0
    idx, logp = demoted_targets(logits, ids, forget, span, 3, rule, g)
    assert idx.shape == logp.shape == (1, 4, 3)
    assert idx[0, 1].tolist() == [0, 1, 2] and idx[0, 2].tolist() == [5, 4, 3] and idx[0, 3].tolist() == [5, 4, 3]
    p = logp.exp()
    assert torch.allclose(p.sum(-1), torch.ones(1, 4))
    e = math.exp
    if rule == "subtract":  # q' = q e^-g / (q e^-g + 1 - q), q the true token's top-K probability
        q = e(3) / (e(3) + e(2) + e(1))
        want = q * e(-g) / (q * e(-g) + 1 - q)
    else:  # z_y <- min top-K logit - g = 1 - g
        want = e(1 - g) / (e(1 - g) + e(2) + e(1))
    assert p[0, 1, 0].item() == pytest.approx(want, rel=1e-5)
    assert (p[0, 1, 1] / p[0, 1, 2]).item() == pytest.approx(e(1), rel=1e-5)  # other tokens' ratio kept
    untouched = torch.tensor([5.0, 4.0, 3.0]).softmax(-1)
    assert torch.allclose(p[0, 2], untouched)  # anchor: the original top-K
    assert torch.allclose(p[0, 3], untouched)  # true token outside the top-K: nothing to demote


def test_shred_loss_zero_at_anchors_positive_at_forget():
    logits, ids, span, forget = _hand_logits()
    idx, logp = demoted_targets(logits, ids, forget, span, 3, "subtract", 10.0)
    anchors = span & ~forget
    assert shred_loss(logits, idx, logp, anchors).item() == pytest.approx(0.0, abs=1e-6)
    assert shred_loss(logits, idx, logp, torch.tensor([[False, False, False, True]])).item() == pytest.approx(
        0.0, abs=1e-6)  # forget position whose true token is outside the top-K
    p, q = logp[0, 1].exp(), torch.tensor([3.0, 2.0, 1.0]).log_softmax(-1)
    want = (p * (p.log() - q)).sum().item()
    assert shred_loss(logits, idx, logp, torch.tensor([[False, True, False, False]])).item() == pytest.approx(want)
    assert want > 1.0


def test_shred_prepare_on_the_model(setup):
    model, data, _ = setup
    m = copy.deepcopy(model)
    u = Shred(ShredConfig(batch_size=3, forget_share=0.3, skip_tokens=1, top_k=8))
    u.prepare(m, data)
    fs = data.forget
    per_record = ((fs.span.sum(1) - 1) * 0.3).ceil().long()  # ceil(P n) of the span after the skipped token
    assert torch.equal(u.forget_mask.sum(1), per_record) and u.n_forget_positions == int(per_record.sum())
    assert not (u.forget_mask & ~fs.span).any()
    assert u.topk_idx.shape == u.target_logp.shape == (N, T, 8)
    index = torch.tensor([6, 1, 3])
    batch = Batch(fs.rows(index), index)
    logits = m(batch.forget.ids, attention_mask=batch.forget.attn).logits
    ti, tl, fm = u.topk_idx[index], u.target_logp[index], u.forget_mask[index]
    assert shred_loss(logits, ti, tl, batch.forget.span & ~fm).item() == pytest.approx(0.0, abs=1e-5)
    assert shred_loss(logits, ti, tl, fm).item() > 1.0  # memorised tokens, demoted by 10 nats


def test_losses_at_the_start(setup):
    model, data, _ = setup
    fs = data.forget
    index = torch.tensor([0, 2, 5, 7])
    batch = Batch(fs.rows(index), index, data.general[:4])
    with torch.no_grad():
        logits = model(batch.forget.ids, attention_mask=batch.forget.attn).logits
        m = batch.forget.span[:, 1:]
        nll = F.cross_entropy(logits[:, :-1][m], batch.forget.ids[:, 1:][m])
        ga = GradientAscent(GradientAscentConfig()).loss(model, batch)
        assert ga.item() == pytest.approx(-nll.item(), abs=1e-6)  # memorised: NLL ~ 2e-3
        rows = data.general[:4]
        retain = F.cross_entropy(model(rows).logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
        gd = GradientDifference(GradientDifferenceConfig(retain_weight=0.5)).loss(model, batch)
        assert gd.item() == pytest.approx(-nll.item() + 0.5 * retain.item(), abs=1e-5)
        npo = NPO(NPOConfig(beta=0.1, batch_size=3))
        npo.prepare(model, data)
        assert npo.loss(model, batch).item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    assert not NPO(NPOConfig()).needs_retain and NPO(NPOConfig(retain_weight=1.0)).needs_retain


def test_every_method_is_registered_once_with_its_parameters_and_class():
    # One registry line per method: the recipe's union, build() and the method's name all follow from it.
    from llm_compress.config import parse_recipe
    from llm_compress.unlearn import build
    from llm_compress.unlearn.base import Unlearner
    from llm_compress.unlearn.config import UNLEARN_METHODS

    assert list(UNLEARN_METHODS) == ["shred", "kfade", "gradient_ascent", "gradient_difference", "npo"]
    for name, method in UNLEARN_METHODS.items():
        cfg = parse_recipe({"unlearn": {"method": name}}).unlearn.method
        assert type(cfg) is method.model and cfg == method.model()
        unlearner = build(cfg)
        assert type(unlearner) is method.load() and isinstance(unlearner, Unlearner) and unlearner.name == name


# ---------------------------------------------------------------------------------------------------------- the loop

METHODS = [(Shred, ShredConfig), (GradientAscent, GradientAscentConfig),
           (GradientDifference, GradientDifferenceConfig), (NPO, NPOConfig)]


@pytest.mark.parametrize("method,config", METHODS, ids=[c().method for _, c in METHODS])
def test_loop_raises_forget_nll(setup, method, config):
    model, data, _ = setup
    m = copy.deepcopy(model)
    before = _nll(m, data.forget)
    history = method(config(steps=10, lr=3e-3, batch_size=4))(m, data, seed=0)
    assert [h["step"] for h in history] == list(range(1, 11))
    assert all(set(h) == {"step", "loss", "forget_nll"} for h in history)
    assert history[0]["forget_nll"] < 0.05  # memorised: the first batch is measured before any step
    assert not m.training
    assert _nll(m, data.forget) > before + 0.3


def test_shred_moves_other_rows_less_than_gradient_ascent(setup):
    model, data, held = setup
    kl = {}
    for method, config in METHODS[:2]:  # 30 steps at lr 1e-3 each
        m = copy.deepcopy(model)
        method(config(batch_size=4, steps=30, lr=1e-3))(m, data, seed=0)
        kl[config().method] = _kl(model, m, held)
        assert _nll(m, data.forget) > 0.5
    assert kl["shred"] < 0.5 * kl["gradient_ascent"], kl  # ~4-8x apart over seeds


def test_batches_cycle_a_seeded_permutation(setup):
    model, data, _ = setup

    class Spy(GradientDifference):
        def loss(self, model, batch):
            self.seen.append((batch.index.tolist(), tuple(batch.retain.shape)))
            return super().loss(model, batch)

    def draws():
        spy = Spy(GradientDifferenceConfig(steps=3, batch_size=3, lr=1e-6))
        spy.seen = []
        spy(copy.deepcopy(model), data, seed=7)
        return spy.seen

    seen = draws()
    drawn = [i for idx, _ in seen for i in idx]
    assert sorted(drawn[:8]) == list(range(N)) and drawn[8] == drawn[0]  # one permutation, cycled
    assert all(r == (3, T) for _, r in seen)
    assert draws() == seen


def test_nan_loss_raises(setup):
    model, data, _ = setup

    class Diverges(GradientAscent):
        calls = 0

        def loss(self, model, batch):
            self.calls += 1
            loss = super().loss(model, batch)
            return loss * float("nan") if self.calls == 2 else loss

    m = copy.deepcopy(model)
    with pytest.raises(TrainingError, match=r"gradient_ascent: loss is nan at step 2"):
        Diverges(GradientAscentConfig(steps=5, batch_size=2))(m, data)
    assert not m.training


def test_a_bf16_model_trains_on_float32_master_weights(setup):
    """bf16 weights updated directly lose most lr-1e-4 AdamW steps to rounding; the loop keeps float32 masters, so a
    bf16 run moves its weights as the float32 run does, and hands back a bf16 model."""
    model, data, _ = setup
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model).to(dtype)
        start = {n: p.detach().float().clone() for n, p in m.named_parameters()}
        GradientAscent(GradientAscentConfig(steps=5, lr=1e-4, batch_size=4))(m, data, seed=0)
        assert all(p.dtype == dtype for p in m.parameters())
        moved[dtype] = torch.cat([(p.detach().float() - start[n]).flatten() for n, p in m.named_parameters()])
    a, b = moved[torch.float32], moved[torch.bfloat16]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.8
    assert 0.7 < b.norm() / a.norm() < 1.3
