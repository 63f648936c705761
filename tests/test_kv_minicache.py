"""MiniCache's retention rule and its storage under KIVI (llm_compress.kv.minicache): how many token pairs stay
unmerged as adjacent layers grow apart, what gamma and max_distance do, and that retained states are held as KIVI
codes (and counted) under quantization. Synthetic states and tiny random Llama models (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from llm_compress.kv.base import storage_nbytes
from llm_compress.kv.config import MiniCacheConfig
from llm_compress.kv.minicache import MergedPair, MergedStates, MiniCache, merge_states, retention_mask

pytestmark = pytest.mark.usefixtures("one_thread")

B, H, T, D = 2, 2, 256, 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layers(cosine: float | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two layers' states [B, H, T, D], each token's pair about ``cosine`` apart: x1 is x0 turned, in a random plane,
    by acos(cosine) times a per-token factor exp(0.15 N(0, 1)) (so distances vary across tokens as in a model), with
    its own norm; ``cosine`` None: unrelated layers (independent states)."""
    x0 = torch.randn(B, H, T, D, generator=_gen(seed))
    other = torch.randn(B, H, T, D, generator=_gen(seed + 1))
    if cosine is None:
        return x0, other
    u0 = x0 / x0.norm(dim=-1, keepdim=True)
    other -= (other * u0).sum(-1, keepdim=True) * u0  # orthogonal to x0
    n = other / other.norm(dim=-1, keepdim=True)
    theta = (math.acos(cosine) * torch.exp(0.15 * torch.randn(B, H, T, 1, generator=_gen(seed + 2)))).clamp(max=math.pi)
    scale = 1 + torch.rand(B, H, T, 1, generator=_gen(seed + 3))
    return x0, (torch.cos(theta) * u0 + torch.sin(theta) * n) * scale


def _share(x0: torch.Tensor, x1: torch.Tensor, **settings) -> float:
    """Share of token pairs one prompt-sized merge retains (the rule over the whole prompt's range)."""
    states = MergedStates(**{"t": 0.6, "gamma": 0.05, "max_distance": 0.5, "bits": 16, "group_size": 16,
                             "residual": 32, "per_channel": True, **settings})
    states.add(x0, x1)
    return states.mask.float().mean().item()


def _cosine(x0: torch.Tensor, x1: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(x0, x1, dim=-1).mean().item()


# ---------------------------------------------------------------------------------------------------------------
# the rule


def test_nearly_identical_layers_merge_almost_everything_and_the_old_rule_did_not():
    x0, x1 = _layers(0.999)
    assert _cosine(x0, x1) == pytest.approx(0.999, abs=2e-4)
    assert _share(x0, x1) < 0.02  # defaults: gamma 0.05, guard 0.5
    # the rule this replaced, d - d_min > gamma (d_max - d_min), kept nearly every token of these layers
    d = merge_states(x0, x1)[3]
    lo, hi = d.amin(-1, keepdim=True), d.amax(-1, keepdim=True)
    assert ((d - lo) > 0.05 * (hi - lo)).float().mean() > 0.9


def test_retention_rises_as_layers_grow_apart():
    shares = {c: _share(*_layers(c)) for c in (0.999, 0.9, None, -0.8)}
    assert shares[0.999] < 0.02 and shares[0.9] < 0.02  # alike layers: only the top of the range
    assert shares[None] > 0.3  # unrelated layers (about 90 degrees): the guard keeps the pairs beyond it
    assert shares[-0.8] > 0.99  # anti-aligned layers: (nearly) nothing is merged
    # the paper's relative rule alone (no guard) keeps the same small share whatever the layers: it cannot tell
    alone = [_share(*_layers(c), max_distance=1.0) for c in (0.999, None)]
    assert all(s < 0.02 for s in alone)


@pytest.mark.parametrize("cosine", [0.99, 0.7])
def test_gamma_is_monotonic_from_nothing_to_everything(cosine):
    x0, x1 = _layers(cosine, seed=3)
    shares = [_share(x0, x1, gamma=g, max_distance=1.0) for g in (0.0, 0.05, 0.2, 0.5, 0.8, 1.0)]
    assert shares[0] == 0.0 and shares[-1] == 1.0
    assert all(a < b for a, b in zip(shares, shares[1:]))


def test_retention_mask_is_the_top_of_the_range_or_beyond_the_guard():
    d = torch.tensor([[0.10, 0.20, 0.29, 0.30, 0.60]])  # one row: range 0.10 .. 0.60
    lo, hi = d.amin(-1), d.amax(-1)
    assert retention_mask(d, lo, hi, 0.5, 1.0).tolist() == [[False, False, False, False, True]]  # > 0.35
    assert retention_mask(d, lo, hi, 0.7, 1.0).tolist() == [[False, False, True, True, True]]  # > 0.25
    assert retention_mask(d, lo, hi, 0.0, 0.25).tolist() == [[False, False, True, True, True]]  # the guard alone
    assert retention_mask(d, lo, hi, 1.0, 1.0).all()  # gamma 1: all, the closest pair too
    same = torch.full((1, 4), 0.2)  # every pair equally far apart (identical layers: all 0): merge them all
    assert not retention_mask(same, same.amin(-1), same.amax(-1), 0.05, 0.5).any()


def test_decode_tokens_are_judged_against_the_running_range():
    x0, x1 = _layers(0.95, seed=5)
    states = MergedStates(0.6, 0.1, 1.0, 16, 16, 32, True)
    states.add(x0, x1)
    lo, hi = states.d_min.clone(), states.d_max.clone()
    near = _layers(0.999, seed=7)
    states.add(near[0][..., :1, :], near[1][..., :1, :])  # closer than the prompt's closest: merged
    far0, far1 = _layers(0.2, seed=9)
    states.add(far0[..., :1, :], far1[..., :1, :])  # farther than the prompt's farthest: retained, the range grows
    assert not states.mask[..., T].any() and states.mask[..., T + 1].all()
    torch.testing.assert_close(states.d_min, torch.minimum(lo, merge_states(*near)[3][..., 0]))
    assert (states.d_max > hi).all()


def test_paper_defaults():
    cfg = MiniCacheConfig()
    assert (cfg.t, cfg.gamma, cfg.max_distance, cfg.bits, cfg.start_layer) == (0.6, 0.05, 0.5, [16, 16], None)


# ---------------------------------------------------------------------------------------------------------------
# storage under KIVI


def _mixed_layers(seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair where a third of the tokens point elsewhere in layer s+1 (retained by the guard), the rest alike."""
    x0, x1 = _layers(0.99, seed=seed)
    far = torch.rand(B, H, T, generator=_gen(seed + 3)) < 1 / 3
    return x0, torch.where(far.unsqueeze(-1), -x1, x1)


def test_retained_states_are_kivi_codes_once_their_token_leaves_the_window():
    """bits 4, residual 32: keys are flushed in 32-token blocks (all 256 prompt tokens), values slide (the last 32
    stay exact); layer s+1's retained rows follow their token: coded per token, exact inside the window."""
    x0, x1 = _mixed_layers()
    pair = MergedPair(t=0.6, gamma=0.05, bits=(4, 4), group_size=16, residual=32)
    pair.k.add(x0, x1)
    pair.v.add(x0, x1)
    for states, exact_tokens in ((pair.k, 0), (pair.v, 32)):
        n = int(states.mask.sum())
        n_exact = int(states.mask[..., T - exact_tokens:].sum())
        assert 0.3 < n / states.mask.numel() < 0.45
        assert states.kept.shape == (n_exact, D) and len(states.kept_codes) == n - n_exact
        codes, scale, offset = states.kept_codes.tensors()  # 4 bits: 2 codes a byte; one scale/offset per 16
        assert codes.dtype == torch.uint8 and codes.shape == (1, 1, n - n_exact, D // 2)
        assert scale.shape == offset.shape == (1, 1, n - n_exact, D // 16)
        held = storage_nbytes([states.kept] + states.kept_codes.tensors())
        assert held == n_exact * D * 4 + (n - n_exact) * (D // 2 + 2 * (D // 16) * 4)  # float32 run
        held16 = storage_nbytes([states.kept] + states.kept_codes.tensors(), float_bytes=2)  # a 16-bit deployment
        assert held16 < n * D * 2 / 2  # against the same rows held exact: coded ones cost 3/8 (codes + scales)

        restored = states.restore(1, x1)
        keep = states.mask
        err = (restored - x1).abs()[keep]  # [n, D], token-major like the kept rows
        half_step = ((x1.amax(-1) - x1.amin(-1)) / 15 / 2)[keep]  # a 16-channel group's range <= the token's
        assert (err <= half_step.unsqueeze(-1) + 1e-5).all()
        exact_part = keep.clone()
        exact_part[..., :T - exact_tokens] = False
        assert torch.equal(restored[exact_part], x1[exact_part])  # inside the window: exact


def test_coded_retained_states_come_back_in_place_over_decode_steps():
    """Tokens decoded one at a time cross the window's edge: every retained row must come back at its own (token,
    row, head), the coded ones within half a 4-bit step, through a cache that is also counted."""
    x0, x1 = _mixed_layers(seed=13)
    pair = MergedPair(t=0.6, gamma=0.05, bits=(4, 4), group_size=16, residual=32)
    pair.v.add(x0[..., :40, :], x1[..., :40, :])
    for i in range(40, 120):
        pair.v.add(x0[..., i:i + 1, :], x1[..., i:i + 1, :])
    a1 = x1[..., :120, :]
    restored, keep = pair.v.restore(1, a1), pair.v.mask
    assert pair.v.coded_tokens == 120 - 32 and len(pair.v.kept_codes) == int(keep[..., :88].sum())
    half_step = (a1.amax(-1) - a1.amin(-1)) / 15 / 2
    assert ((restored - a1).abs()[keep] <= half_step[keep].unsqueeze(-1) + 1e-5).all()
    merged = ~keep
    direction = restored / restored.norm(dim=-1, keepdim=True)
    assert ((direction * a1 / a1.norm(dim=-1, keepdim=True)).sum(-1)[merged] > 0.95).all()  # merged: shared dir


def _tensors_in(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from obj's attributes (lists, tuples, objects), to check nothing held goes uncounted."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj if isinstance(obj, (list, tuple)) else vars(obj).values() if hasattr(obj, "__dict__") else []
    return [t for item in items for t in _tensors_in(item, seen)]


@pytest.mark.parametrize("bits", [(16, 16), (4, 4), (4, 16)])
def test_every_tensor_a_pair_holds_is_counted(bits):
    x0, x1 = _mixed_layers(seed=17)
    pair = MergedPair(t=0.6, gamma=0.05, bits=bits, group_size=16, residual=32)
    for i in range(0, 100, 25):
        pair.k.add(x0[..., i:i + 25, :], x1[..., i:i + 25, :])
        pair.v.add(x0[..., i:i + 25, :], x1[..., i:i + 25, :])
    pair.pending = (x0[..., :1, :], x1[..., :1, :])
    held = _tensors_in(pair)
    assert len(held) > 10
    assert storage_nbytes(held) == storage_nbytes(pair.tensors())


# ---------------------------------------------------------------------------------------------------------------
# in a model


def _model(layers: int = 4) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _twin_layers(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Layer 2 adds nothing to the residual stream (zero output projections) and layer 3 is a copy of it: layers 2
    and 3 then see the same input and make the same K and V."""
    with torch.no_grad():
        two, three = model.model.layers[2], model.model.layers[3]
        two.self_attn.o_proj.weight.zero_()
        two.mlp.down_proj.weight.zero_()
        three.load_state_dict(two.state_dict())
    return model


def _run(model, cache, ids: torch.Tensor, steps: int = 8) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(steps):
            out.append(logits[:, -1])
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
    return out


def test_identical_adjacent_layers_merge_and_decode_like_the_full_cache():
    model = _twin_layers(_model())
    ids = torch.randint(3, 128, (2, 48), generator=_gen(19))
    cache = MiniCache(4)
    got, ref = _run(model, cache, ids), _run(model, DynamicCache(), ids)
    assert cache.retained_fraction() == 0  # every d is exactly 0: nothing is above the range's top
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # per token, head and K/V: two full layers (2 x 16 values) + one slot (16), two magnitudes and a mask byte, in
    # 16-bit bytes 128 / (64 + 37) = 1.267 (plus the pair's d_min, d_max)
    assert cache.memory_ratio() == pytest.approx(128 / 101, rel=0.01)
    random = MiniCache(4)
    _run(_model(), random, ids)  # a random model: layers 2 and 3 unrelated, the guard keeps about half
    assert random.retained_fraction() > 0.3 and random.memory_ratio() < cache.memory_ratio() - 0.1
