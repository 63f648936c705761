"""KV-cache compressors (llm_compress.kv): KIVI, attention sinks, MiniCache, their memory accounting and the spec
loader, on tiny random Llama models (CPU). References are DynamicCache runs, masks or plain-Python formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import DynamicCache, GPT2Config, LlamaConfig, LlamaForCausalLM

from llm_compress.errors import InputError
from llm_compress.kv import build_cache, load_kv_cache, normalize_spec, save_kv_cache_json
from llm_compress.kv.base import storage_nbytes
from llm_compress.kv.kivi import KIVICache, KIVILayer
from llm_compress.kv.minicache import MergedPair, MiniCache, MiniCacheLayer, merge_states
from llm_compress.kv.packing import pack_codes, unpack_codes
from llm_compress.kv.sink import SinkCache
from llm_compress.quantize.quantizers import dequantize_codes, fake_quant_kv, quantize_codes

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HEAD_DIM, VOCAB = 4, 16, 128


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _config(attn: str = "sdpa") -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = attn
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def eager_model(model):
    m = LlamaForCausalLM(_config("eager")).eval()
    m.load_state_dict(model.state_dict())
    return m


@pytest.fixture(scope="module")
def batch():
    """Two prompts of 20 tokens, the second left-padded by 5 (ids avoid pad/bos/eos)."""
    ids = torch.randint(3, VOCAB, (2, 20), generator=_gen(1))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    ids[1, :5] = 0
    return ids, mask


def _greedy_logits(model, ids: torch.Tensor, cache, steps: int) -> list[torch.Tensor]:
    """Plain forward passes: the prompt, then `steps` one-token steps feeding the argmax; logits of each pass."""
    out = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        out.append(logits)
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            logits = model(nxt, past_key_values=cache, use_cache=True).logits
            out.append(logits)
    return out


def _generate(model, batch, cache, n: int = 10) -> torch.Tensor:
    ids, mask = batch
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:]


# ---------------------------------------------------------------------------------------------------------------
# the quantizer (shared with the quantize stage) and bit packing


def test_quantize_codes_worked_out_by_hand():
    x = torch.tensor([[1.0, 1.5, 2.0, 4.0]])
    # tight 2-bit grid: s = (4 - 1) / 3 = 1, z = round(-1 / 1) = -1, q = round(x) - 1 -> 0, 1 (round half to even:
    # round(1.5) = 2), 1, 3; x_hat = (q + 1) * 1 = 1, 2, 2, 4
    codes, scale, zero = quantize_codes(x, 2, zero_on_grid=False)
    assert codes.tolist() == [[0, 1, 1, 3]] and codes.dtype == torch.uint8
    assert scale.item() == pytest.approx(1.0) and zero.item() == -1.0
    assert dequantize_codes(codes, scale, zero).tolist() == [[1.0, 2.0, 2.0, 4.0]]
    # the quantize stage's grid holds 0: range [0, 4], s = 4 / 3, z = 0, q = round(3 x / 4) -> 1, 1, 2, 3
    codes, scale, zero = quantize_codes(x, 2)
    assert codes.tolist() == [[1, 1, 2, 3]] and zero.item() == 0.0 and scale.item() == pytest.approx(4 / 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_codes_error_within_half_a_step(bits):
    x = torch.randn(3, 5, 32, generator=_gen(bits)) * 2 + 3  # groups far from 0, where a tight grid matters
    codes, scale, zero = quantize_codes(x, bits, group_size=8, zero_on_grid=False)
    assert int(codes.max()) <= 2**bits - 1
    xg = x.view(3, 5, 4, 8)
    step = (xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True)) / (2**bits - 1)  # range / (2^b - 1)
    err = (dequantize_codes(codes, scale, zero).view(3, 5, 4, 8) - xg).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()
    # a bfloat16-stored scale is rounded up, so the stored scale still bounds the error by half of itself
    codes, scale, zero = quantize_codes(x, bits, group_size=8, zero_on_grid=False, scale_dtype=torch.bfloat16)
    assert torch.equal(scale.to(torch.bfloat16).float(), scale) and (scale >= step * (1 - 1e-6)).all()
    err = (dequantize_codes(codes, scale, zero).view(3, 5, 4, 8) - xg).abs()
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-6).all()


def test_fake_quant_kv_is_the_code_path_dequantized():
    x = torch.randn(2, 3, 7, 16, generator=_gen(3))
    for bits, group in ((4, None), (3, 8), (8, 4)):
        codes, scale, zero = quantize_codes(x, bits, group_size=group)
        assert torch.equal(fake_quant_kv(x, bits, group), dequantize_codes(codes, scale, zero))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 16), generator=_gen(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 16 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_packing_layout_by_hand():
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 + (2 << 2) + (3 << 4)]
    assert pack_codes(torch.tensor([5, 12], dtype=torch.uint8), 4).tolist() == [5 + (12 << 4)]
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(3, dtype=torch.uint8), 2)


# ---------------------------------------------------------------------------------------------------------------
# KIVI


def test_kivi_groups_keys_per_channel_and_values_per_token():
    """States constant inside each KIVI group come back (nearly) exactly; the swapped grouping would not."""
    g = 4
    chan = torch.randn(1, 2, 1, HEAD_DIM, generator=_gen(5)) * 5  # per-channel levels (outlier-like spread)
    keys = chan.repeat(1, 1, 16, 1) + torch.arange(4).repeat_interleave(g).view(1, 1, 16, 1)  # const per g tokens
    tok = torch.randn(1, 2, 16, 1, generator=_gen(6)) * 5
    values = tok + torch.arange(HEAD_DIM // g).repeat_interleave(g).view(1, 1, 1, HEAD_DIM)  # const per g chans
    layer = KIVILayer(2, 2, group_size=g, residual=8)
    layer.update(keys, values)
    layer.update(keys[..., :8, :], values[..., :8, :])  # the first 16 tokens are now quantized (keys and values)
    past_k, past_v = layer.past()
    assert len(layer.k.store) == 24 and len(layer.v.store) == 16
    torch.testing.assert_close(past_k[..., :16, :], keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(past_v[..., :16, :], values, rtol=1e-5, atol=1e-5)
    # per token, the key groups would span the channels' spread: far from exact at 2 bits
    assert (fake_quant_kv(keys, 2, g) - keys).abs().max() > 0.5


def test_kivi_streaming_keeps_the_recent_window_exact():
    """R = 8, G = 4: keys are quantized in 8-token blocks (the last len % 8 exact), values keep the last 8 exact."""
    k = torch.randn(2, 2, 24, HEAD_DIM, generator=_gen(7))
    v = torch.randn(2, 2, 24, HEAD_DIM, generator=_gen(8))
    layer = KIVILayer(4, 4, group_size=4, residual=8)
    keys, values = layer.update(k[..., :21, :], v[..., :21, :])  # prompt: returned exactly
    assert torch.equal(keys, k[..., :21, :]) and torch.equal(values, v[..., :21, :])
    expected = {21: (16, 13), 22: (16, 14), 23: (16, 15), 24: (24, 16)}  # tokens seen: (keys, values) quantized
    for t in range(21, 24):
        past_k, past_v = layer.past()
        nk, nv = expected[t]
        assert len(layer.k.store) == nk and len(layer.v.store) == nv and layer.get_seq_length() == t
        assert torch.equal(past_k[..., nk:, :], k[..., nk:t, :]) and torch.equal(past_v[..., nv:, :], v[..., nv:t, :])
        assert not torch.equal(past_k[..., :nk, :], k[..., :nk, :])  # quantized: not exact ...
        assert (past_k[..., :nk, :] - k[..., :nk, :]).abs().max() < 0.5  # ... but close at 4 bits
        keys, values = layer.update(k[..., t:t + 1, :], v[..., t:t + 1, :])
        assert keys.shape[-2] == t + 1 and torch.equal(keys[..., -1:, :], k[..., t:t + 1, :])
    assert len(layer.k.store) == 24 and layer.k.window.shape[-2] == 0 and len(layer.v.store) == 16


def test_kivi_dtype_and_device_follow_the_states():
    k = torch.randn(1, 2, 40, HEAD_DIM, generator=_gen(9)).to(torch.bfloat16)
    layer = KIVILayer(4, 2, group_size=4, residual=8)
    keys, values = layer.update(k, k)
    assert keys.dtype == torch.bfloat16 and layer.k.store.scale.dtype == torch.bfloat16
    assert layer.past()[0].dtype == torch.bfloat16 and layer.k.store.codes.dtype == torch.uint8


def test_kivi_nbytes_counts_codes_scales_offsets_and_windows():
    """fp16 states, B=1, H=2, D=64, G=32, R=32; 200-token prompt + 61 decode steps = 261 tokens seen.

    Keys: 256 quantized (blocks of 32), 5 exact; values: 229 quantized, the last 32 exact.
    """
    b, h, d, t = 1, 2, 64, 261
    x = torch.randn(b, h, t, d, generator=_gen(10)).half()
    cache = KIVICache(2, [(4, 4), (4, 2)], group_size=32, residual=32)
    for layer_idx in range(2):
        cache.update(x[..., :200, :], x[..., :200, :], layer_idx)
    for i in range(200, t):
        for layer_idx in range(2):
            cache.update(x[..., i:i + 1, :], x[..., i:i + 1, :], layer_idx)
    keys = b * h * 256 * d * 4 // 8 + b * h * (256 // 32) * d * 2 * 2 + b * h * 5 * d * 2  # codes + scale/offset
    values4 = b * h * 229 * d * 4 // 8 + b * h * 229 * (d // 32) * 2 * 2 + b * h * 32 * d * 2  # + exact window
    values2 = b * h * 229 * d * 2 // 8 + b * h * 229 * (d // 32) * 2 * 2 + b * h * 32 * d * 2
    assert (keys, values4, values2) == (21760, 26512, 19184)
    assert cache.nbytes() == 2 * keys + values4 + values2 == 89216
    assert cache.full_bytes() == 2 * 2 * b * h * t * d * 2 == 267264
    assert cache.memory_ratio() == pytest.approx(267264 / 89216)
    assert cache.get_seq_length() == t


def test_kivi_4bit_long_sequence_approaches_16_over_5():
    """4-bit codes + an fp16 scale and offset per 32 values = 5 bits per element, plus the exact windows."""
    b, h, d, t, r = 1, 2, 64, 4096 + 64 + 7, 64
    x = torch.randn(b, h, t, d, generator=_gen(11)).half()
    cache = KIVICache(1, (4, 4), group_size=32, residual=r)
    cache.update(x, x, 0)
    k_quant, v_quant = t // r * r, t - r
    held_bits = 5 * (k_quant + v_quant) * b * h * d + 16 * ((t - k_quant) + r) * b * h * d
    assert cache.nbytes() * 8 == held_bits
    assert 2.9 < cache.memory_ratio() < 16 / 5


def test_kivi_error_shrinks_with_bits(model):
    ids = torch.randint(3, VOCAB, (1, 40), generator=_gen(13))
    ref = _greedy_logits(model, ids, DynamicCache(), steps=4)
    err = {}
    for bits in (2, 8):
        got = _greedy_logits(model, ids, KIVICache(LAYERS, (bits, bits), group_size=4, residual=8), steps=4)
        err[bits] = max((a - b).abs().max().item() for a, b in zip(ref[1:], got[1:]))
        assert torch.equal(ref[0], got[0])  # the prompt pass is exact
    assert 0 < err[8] < err[2] and err[8] < 0.05


def test_refused_cache_operations():
    cache = KIVICache(LAYERS, (4, 4), group_size=4, residual=8)
    with pytest.raises(NotImplementedError, match="reorder_cache"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(3)


# ---------------------------------------------------------------------------------------------------------------
# attention sinks


def test_sink_cache_equals_masking_the_evicted_tokens(eager_model):
    """Reference: a full DynamicCache whose 4-D mask hides all but the first 2 and the last 4 past tokens."""
    ids = torch.randint(3, VOCAB, (1, 12), generator=_gen(14))
    sinks, window, steps = 2, 4, 6
    cache, ref_cache = SinkCache(LAYERS, sinks, window), DynamicCache()
    full_cache = DynamicCache()
    with torch.no_grad():
        logits = eager_model(ids, past_key_values=cache, use_cache=True).logits
        ref = eager_model(ids, past_key_values=ref_cache, use_cache=True).logits
        eager_model(ids, past_key_values=full_cache, use_cache=True)
        assert torch.equal(logits, ref)  # the prompt pass sees every token
        differs = False
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            p = ref_cache.get_seq_length()
            allowed = [j < sinks or j >= p - window for j in range(p + 1)]  # past sinks, past window, itself
            mask = torch.tensor([0.0 if a else float("-inf") for a in allowed]).view(1, 1, 1, p + 1)
            logits = eager_model(nxt, past_key_values=cache, use_cache=True).logits
            ref = eager_model(nxt, past_key_values=ref_cache, attention_mask=mask, use_cache=True).logits
            full = eager_model(nxt, past_key_values=full_cache, use_cache=True).logits
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
            differs |= not torch.allclose(logits, full, atol=1e-4)
            assert cache.get_seq_length() == p + 1 and cache[0][0].shape[-2] == sinks + window
    assert differs  # the eviction did change something, so the comparison above is not vacuous


def test_sink_cache_with_left_padding_matches_unpadded_rows(model, batch):
    """With set_padding, each row of a padded batch generates what it generates alone, unpadded."""
    ids, mask = batch
    cache = SinkCache(LAYERS, sinks=2, window=6).set_padding(mask)
    out = _generate(model, batch, cache)
    for row in range(2):
        alone = ids[row:row + 1, int((mask[row] == 0).sum()):]
        with torch.no_grad():
            single = model.generate(alone, past_key_values=SinkCache(LAYERS, sinks=2, window=6), max_new_tokens=10,
                                    do_sample=False, pad_token_id=0)[:, alone.shape[1]:]
        assert torch.equal(out[row], single[0])


def test_sink_cache_refuses_undeclared_padding(model, batch):
    with pytest.raises(InputError, match="set_padding"):
        _generate(model, batch, SinkCache(LAYERS, sinks=2, window=6))
    with pytest.raises(InputError, match="left padding"):
        SinkCache(LAYERS).set_padding(torch.tensor([[1, 0, 1]]))


def test_sink_nbytes_is_the_held_tokens():
    x = torch.randn(2, 2, 30, HEAD_DIM, generator=_gen(15)).half()
    cache = SinkCache(1, sinks=3, window=5)
    cache.update(x, x, 0)
    pads = 2 * 8  # the pads left in front of each row (none here), long [B]: counted too
    assert cache.nbytes() == 2 * 2 * 2 * (3 + 5) * HEAD_DIM * 2 + pads
    assert cache.full_bytes() == 2 * 2 * 2 * 30 * HEAD_DIM * 2
    keys, _ = cache.layers[0].past()
    assert torch.equal(keys, torch.cat([x[..., :3, :], x[..., -5:, :]], dim=-2))


# ---------------------------------------------------------------------------------------------------------------
# MiniCache


def _angle(a: list[float], b: list[float]) -> float:
    dot = sum(p * q for p, q in zip(a, b))
    na, nb = math.sqrt(sum(p * p for p in a)), math.sqrt(sum(q * q for q in b))
    return math.acos(max(-1.0, min(1.0, dot / (na * nb))))


def test_slerp_merge_keeps_norms_and_interpolates_the_angle():
    x0 = torch.randn(2, 3, 5, HEAD_DIM, generator=_gen(16), dtype=torch.float64)
    x1 = torch.randn(2, 3, 5, HEAD_DIM, generator=_gen(17), dtype=torch.float64)
    for t in (0.0, 0.3, 0.5, 1.0):
        direction, n0, n1, d = merge_states(x0, x1, t)
        torch.testing.assert_close(direction.norm(dim=-1), torch.ones(2, 3, 5))
        torch.testing.assert_close((n0.unsqueeze(-1) * direction).norm(dim=-1), x0.float().norm(dim=-1))
        a, b, e = x0[0, 1, 2].tolist(), x1[0, 1, 2].tolist(), direction[0, 1, 2].tolist()
        omega = _angle(a, b)
        assert d[0, 1, 2].item() == pytest.approx(omega / math.pi, abs=1e-6)
        assert _angle(a, e) == pytest.approx(t * omega, abs=1e-3)  # e sits t of the way along the arc
        assert _angle(e, b) == pytest.approx((1 - t) * omega, abs=1e-3)


def test_slerp_merge_of_equal_layers_returns_the_input():
    x = torch.randn(2, 3, 5, HEAD_DIM, generator=_gen(18))
    direction, n0, n1, d = merge_states(x, x.clone(), 0.5)
    torch.testing.assert_close(n0.unsqueeze(-1) * direction, x)
    torch.testing.assert_close(n1.unsqueeze(-1) * direction, x)
    assert d.abs().max() < 1e-3


def test_minicache_retains_distant_tokens_exactly():
    """gamma = 0.3: a token is kept exact iff d > d_max - 0.3 (d_max - d_min) (the top 30 % of the range, per row and
    head, running) or d > max_distance 0.5 (more than 90 degrees apart)."""
    x0 = torch.randn(1, 2, 10, 8, generator=_gen(19))
    x1 = torch.randn(1, 2, 10, 8, generator=_gen(20))
    x1[..., :4, :] = x0[..., :4, :] * 2 + 0.01 * x1[..., :4, :]  # nearly parallel: merged
    pair = MergedPair(t=0.5, gamma=0.3, bits=(16, 16), group_size=4, residual=8)
    pair.k.add(x0, x1)
    new0, new1 = torch.randn(1, 2, 1, 8, generator=_gen(21)), torch.randn(1, 2, 1, 8, generator=_gen(22))
    pair.k.add(new0, new1)  # one decode token, judged against the running range
    a, b = torch.cat([x0, new0], dim=-2), torch.cat([x1, new1], dim=-2)
    restored = [pair.k.restore(role, a) for role in (0, 1)]
    for h in range(2):
        d = [_angle(a[0, h, i].tolist(), b[0, h, i].tolist()) / math.pi for i in range(11)]
        for i in range(11):
            lo, hi = min(d[:max(i, 9) + 1]), max(d[:max(i, 9) + 1])  # range over the prompt, then running
            kept = d[i] > hi - 0.3 * (hi - lo) or d[i] > 0.5
            assert bool(pair.k.mask[0, h, i]) == kept
            if kept:
                assert torch.equal(restored[0][0, h, i], a[0, h, i]) and torch.equal(restored[1][0, h, i], b[0, h, i])
            else:  # merged: own norm, shared direction
                for r, x in zip(restored, (a, b)):
                    assert r[0, h, i].norm().item() == pytest.approx(x[0, h, i].norm().item(), rel=1e-5)
                torch.testing.assert_close(restored[0][0, h, i] / a[0, h, i].norm(),
                                           restored[1][0, h, i] / b[0, h, i].norm())
    assert not pair.k.mask[0, :, :4].any() and pair.k.mask.any()


def test_minicache_pairs_layers_from_the_middle_and_nothing_stays_pending(model):
    cache = MiniCache(LAYERS, gamma=0.5)
    assert [type(layer).__name__ for layer in cache.layers] == ["KIVILayer", "KIVILayer", "MiniCacheLayer",
                                                                "MiniCacheLayer"]
    assert cache.layers[2].pair is cache.layers[3].pair and cache.layers[2].role == 0
    _greedy_logits(model, torch.randint(3, VOCAB, (1, 9), generator=_gen(23)), cache, steps=2)
    assert cache.layers[2].pair.pending is None and 0 < cache.retained_fraction() < 1
    odd = MiniCache(5, start_layer=1)
    assert [isinstance(layer, MiniCacheLayer) for layer in odd.layers] == [False, True, True, True, True]
    assert isinstance(MiniCache(5, start_layer=2).layers[4], KIVILayer)


def test_minicache_nbytes_by_hand():
    """No retention (gamma 0, parallel states): per pair and K/V one direction [B,H,T,D], two magnitudes [B,H,T], a
    bool mask, d_min/d_max float32 [B,H]; fp16, B=1, H=2, T=10, D=16; layers 0-1 stay full."""
    x = torch.randn(1, 2, 10, HEAD_DIM, generator=_gen(24)).half()
    cache = MiniCache(4, gamma=0.0)
    for layer_idx in range(4):
        cache.update(x, x * (layer_idx + 1), layer_idx)
    full = 2 * (2 * 1 * 2 * 10 * HEAD_DIM * 2)  # two full layers, K and V
    pair = 2 * (2 * 10 * HEAD_DIM * 2 + 2 * (2 * 10 * 2) + 2 * 10 + 2 * (2 * 4))  # K and V
    assert cache.nbytes() == full + pair == 2560 + 1512
    assert cache.full_bytes() == 4 * 2 * 2 * 10 * HEAD_DIM * 2


# ---------------------------------------------------------------------------------------------------------------
# compression off: identical to DynamicCache


def _off_caches():
    return {"kivi16": KIVICache(LAYERS, (16, 16), group_size=4, residual=8),
            "sink_wide": SinkCache(LAYERS, sinks=2, window=100),
            "minicache_retain_all": MiniCache(LAYERS, gamma=1.0)}


@pytest.mark.parametrize("name", ["kivi16", "sink_wide", "minicache_retain_all"])
def test_compression_off_matches_dynamic_cache_logits(model, name):
    ids = torch.randint(3, VOCAB, (2, 13), generator=_gen(12))
    ref = _greedy_logits(model, ids, DynamicCache(), steps=6)
    got = _greedy_logits(model, ids, _off_caches()[name], steps=6)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["kivi16", "sink_wide", "minicache_retain_all"])
def test_compression_off_generates_the_full_cache_tokens(model, batch, name):
    cache = _off_caches()[name]
    if isinstance(cache, SinkCache):
        cache.set_padding(batch[1])
    assert torch.equal(_generate(model, batch, cache), _generate(model, batch, DynamicCache()))
    assert cache.get_seq_length() == batch[0].shape[1] + 9  # the last generated token is never fed back


# ---------------------------------------------------------------------------------------------------------------
# the loader and the spec


def test_kv_cache_json_round_trips(tmp_path, model):
    spec = {"method": "kivi", "bits": [[4, 2], [4, 4], [8, 4], [2, 2]], "group_size": 8}
    written = save_kv_cache_json(tmp_path, spec)
    assert written == tmp_path / "kv_cache.json" and [p.name for p in tmp_path.iterdir()] == ["kv_cache.json"]
    assert json.loads(written.read_text()) == {"method": "kivi", "bits": [[4, 2], [4, 4], [8, 4], [2, 2]],
                                               "group_size": 8, "residual": 128}
    cache = load_kv_cache(tmp_path, model)
    assert isinstance(cache, KIVICache) and cache.spec == normalize_spec(spec)
    assert [(layer.k_bits, layer.v_bits, layer.group_size) for layer in cache.layers] == \
        [(4, 2, 8), (4, 4, 8), (8, 4, 8), (2, 2, 8)]
    mini = {"method": "minicache", "start_layer": 2, "gamma": 0.1, "bits": [4, 4], "group_size": 4, "residual": 8}
    cache = build_cache(save_kv_cache_json(tmp_path / "m" / "spec.json", mini), model)
    assert isinstance(cache, MiniCache) and cache.start_layer == 2 and cache.spec == normalize_spec(mini)


@pytest.mark.parametrize("spec, model_cfg, match", [
    ({"method": "h2o"}, None, "unknown KV-cache method 'h2o'"),
    ({"method": "kivi", "bit": [4, 4]}, None, r"unknown kivi parameter\(s\) \['bit'\]"),
    ({"method": "kivi", "bits": [3, 4]}, None, "key bits must be one of"),
    ({"method": "kivi", "bits": [4, 4], "group_size": 32, "residual": 64}, None, "does not divide head_dim 16"),
    ({"method": "kivi", "group_size": 4, "residual": 6}, None, "multiple of the group size 4"),
    ({"method": "kivi", "bits": [[4, 4], [4, 4]], "group_size": 4}, None, "2 per-layer"),
    ({"method": "minicache", "start_layer": 4}, None, "start layer 4 is beyond the model's depth"),
    ({"method": "minicache", "start_layer": 3}, None, "no layer pair"),
    ({"method": "minicache", "gamma": -1}, None, r"gamma must lie in \[0, 1\]"),
    ({"method": "minicache", "bits": [4, 16], "group_size": 32, "residual": 32}, None,
     "MiniCache group size 32 does not divide head_dim 16"),
    ({"method": "sink", "window": 0}, None, "window must be an integer >= 1"),
    ({"method": "kivi", "group_size": 4, "residual": 8}, GPT2Config(), "model type 'gpt2' is not supported"),
])
def test_bad_specs_name_the_cause(model, spec, model_cfg, match):
    with pytest.raises(InputError, match=match):
        build_cache(spec, model_cfg if model_cfg is not None else model)


@pytest.mark.parametrize("spec", [{"method": "kivi", "bits": [2, 2], "group_size": 4, "residual": 8},
                                  {"method": "kivi", "bits": [[4, 2], [2, 2], [8, 4], [2, 4]], "group_size": 8,
                                   "residual": 8},
                                  {"method": "sink", "sinks": 2, "window": 6},
                                  {"method": "minicache", "gamma": 0.5},
                                  {"method": "minicache", "start_layer": 1, "gamma": 0.3, "bits": [4, 4],
                                   "group_size": 4, "residual": 8}])
def test_compression_on_generates_sanely(model, batch, spec):
    ref = _generate(model, batch, DynamicCache(), n=12)
    cache = build_cache(spec, model, attention_mask=batch[1])
    out = _generate(model, batch, cache, n=12)
    assert out.shape == ref.shape and int(out.min()) >= 0 and int(out.max()) < VOCAB
    # the prompt pass attends to exact states, so the first token never changes; later ones may
    assert torch.equal(out[:, 0], ref[:, 0])
    assert cache.nbytes() > 0 and cache.get_seq_length() == batch[0].shape[1] + 11


def test_every_method_is_defined_once_by_its_model():
    # Each registered method's defaults come from its pydantic model: the spec loader, the recipe and the cache
    # class's own constructor defaults all give the model's dump, so no second table of defaults can drift.
    import inspect

    from llm_compress.config import parse_recipe
    from llm_compress.kv.config import KV_METHODS

    assert list(KV_METHODS) == ["kivi", "sink", "minicache", "kvtuner", "kvmerger", "cskv"]
    wide = LlamaConfig(hidden_size=128, num_attention_heads=2,
                       num_hidden_layers=LAYERS)  # head_dim 64: the defaults fit
    for name, method in KV_METHODS.items():
        dumped = method.model().model_dump()
        assert normalize_spec({"method": name}) == dumped and dumped["method"] == name
        assert parse_recipe({"kv": {"cache": {"method": name}}}).kv.cache.model_dump() == dumped
        if method.runs is None:  # kvtuner: a search, nothing to build
            continue
        built = build_cache({"method": name}, wide)
        assert type(built) is method.load() and built.spec == dumped
        signature = inspect.signature(method.load()).parameters
        defaults = {k: p.default for k, p in signature.items() if k not in ("num_layers", "spec")}
        assert defaults.keys() == dumped.keys() - {"method"}
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} == \
            {k: v for k, v in dumped.items() if k != "method"}
    with pytest.raises(InputError, match="unknown KV-cache method 'h2o'; known: kivi, sink, minicache, kvtuner, "
                                         "kvmerger, cskv$"):
        normalize_spec({"method": "h2o"})


def test_missing_spec(tmp_path, model):
    with pytest.raises(InputError, match="no kv_cache.json"):
        load_kv_cache(tmp_path, model)


def test_evaluate_measures_a_model_with_the_cache_and_records_why_another_is_not(model):
    from transformers import GPT2LMHeadModel

    from llm_compress.pipeline.evaluate import EvaluateConfig
    from llm_compress.evaluate import kv_metrics

    cfg = EvaluateConfig(latency_new_tokens=4, latency_repeats=1)
    spec = normalize_spec({"method": "kivi", "bits": [2, 2], "group_size": 16, "residual": 16})
    rows = torch.randint(3, VOCAB, (2, 48), generator=_gen(3))
    m = kv_metrics(model, spec, rows, 16, rows[:1, :8], cfg)
    assert m["method"] == "kivi" and m["bytes_mean"] < m["full_bytes_mean"] and m["memory_ratio_mean"] > 1
    assert m["scored_tokens"] == 2 * 32 and m["ppl_ratio"] > 0 and 0 <= m["top1_agreement"] <= 1
    assert m["decode_tokens_per_s"] > 0 and m["decode_tokens_per_s_full"] > 0
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    assert kv_metrics(gpt2, spec, rows, 16, rows[:1, :8], cfg) == {
        "method": "kivi", "skipped": "model type 'gpt2' is not supported by the KV caches (supported: llama, "
                                     "mistral, qwen2: the Llama attention layout)"}


def test_export_generate_check_runs_through_the_folders_kv_cache_json(tmp_path, model):
    from llm_compress.export import KV_CHECK_TOKENS, kv_generate_check

    save_kv_cache_json(tmp_path, {"method": "kivi", "bits": [4, 4], "group_size": 16, "residual": 16})
    ids = torch.randint(3, VOCAB, (2, 24), generator=_gen(4))
    m = kv_generate_check(model, tmp_path, ids)
    assert m["file"] == "kv_cache.json" and m["method"] == "kivi" and m["generated_tokens"] == KV_CHECK_TOKENS
    assert m["cache_tokens"] == 24 + KV_CHECK_TOKENS - 1 and m["cache_bytes"] > 0
    assert 0 <= m["top1_agreement_with_full_cache"] <= 1


def test_report_warns_when_a_cache_holds_more_than_a_full_cache():
    from llm_compress.report import build, markdown

    def report(ratio: float) -> str:
        kv = {"metrics": {"method": "minicache", "memory_ratio_mean": ratio, "bytes_mean": 100,
                          "full_bytes_mean": int(100 * ratio)}}
        return markdown(build("r", "t", {"kv": kv}, [], "completed", None, True))

    assert "holds 1.25x *more* than a 16-bit full cache" in report(0.8)
    assert "*more*" not in report(1.3)


def test_minicache_retained_tokens_cost_about_what_two_unmerged_layers_cost():
    """gamma = 1 retains every token: layer s's states take the shared slots, layer s+1's are kept aside. Without
    quantization both come back exactly and the pair holds 2 D elements per token plus magnitudes and a mask byte;
    under 4-bit KIVI (window 16 of 64 tokens) both come back quantized: layer s's as |x0| times its quantized
    direction, layer s+1's from per-token codes."""
    x0 = torch.randn(1, 2, 64, HEAD_DIM, generator=_gen(40)).half()
    x1 = torch.randn(1, 2, 64, HEAD_DIM, generator=_gen(41)).half()
    pair = MergedPair(t=0.5, gamma=1.0, bits=(16, 16), group_size=16, residual=16)
    pair.k.add(x0, x1)
    assert torch.equal(pair.k.restore(0, x0), x0) and torch.equal(pair.k.restore(1, x1), x1)
    per_token = 2 * HEAD_DIM * 2 + 2 * 2 + 1  # two fp16 vectors, two fp16 magnitudes, the mask byte
    assert storage_nbytes(pair.k.tensors()) == 2 * 64 * per_token + 2 * 2 * 4  # + d_min, d_max float32 [1, 2]

    q = MergedPair(t=0.5, gamma=1.0, bits=(4, 4), group_size=16, residual=16)
    q.k.add(x0, x1)
    r0, r1 = q.k.restore(0, x0).float(), q.k.restore(1, x1).float()
    unit_err = 0.5 * 2 / 15  # half a 4-bit step of a unit direction's components (range at most [-1, 1])
    assert (r0 - x0.float()).abs().max() <= unit_err * x0.float().norm(dim=-1).max() + 1e-2
    half_step = (x1.float().amax(-1) - x1.float().amin(-1)) / 15 / 2  # one group of 16 channels per token
    assert ((r1 - x1.float()).abs() <= half_step.unsqueeze(-1) + 1e-2).all()
    assert not torch.equal(r0, x0.float()) and not torch.equal(r1, x1.float())  # quantized, not kept exact
