"""KVMerger as the paper describes it (llm_compress.kv.kvmerger): Algorithm 1's merging sets from the threshold alone,
the attention pivot fed by the attention hook, the values' |S| rescaling, ragged per-head storage and its masks.

Models are tiny random Llamas on CPU; references are DynamicCache runs, the model's own attention weights, a plain
Python loop of Algorithm 1 and values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import llm_compress.kv.kvmerger as km
from llm_compress.errors import InputError
from llm_compress.kv import build_cache
from llm_compress.kv.kvmerger import KVMergerCache, merging_sets
from llm_compress.kv.measure import compare, stepwise_logits
from tests.test_kv_merger import _logits_steps

VOCAB = 96


def _llama(attn: str = "sdpa", **kw) -> LlamaForCausalLM:
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      attn_implementation=attn, **kw)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _llama()


def _rows(*rows) -> torch.Tensor:
    """Hand-written states: rows of D values -> [1, 1, len(rows), D] float32."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def _algorithm_1(keys: torch.Tensor, length: int, sinks: int, window: int, threshold: float) -> list[list[int]]:
    """Algorithm 1 as a plain loop over one head's keys [N, D]: the sets, each a list of slots in order."""
    unit = F.normalize(keys.float(), dim=-1)
    sets, anchor = [], length - 1
    while anchor >= 0:
        j = anchor - 1
        if sinks <= anchor < length - window:  # a protected slot is a set of one
            while j >= sinks and float(unit[j] @ unit[anchor]) > threshold:
                j -= 1
        sets.append(list(range(j + 1, anchor + 1)))
        anchor = j
    return sets[::-1]


def _sets(ends: torch.Tensor, length: int) -> list[list[int]]:
    """One head's anchors bool [N] -> its sets."""
    out, start = [], 0
    for i in range(length):
        if ends[i]:
            out.append(list(range(start, i + 1)))
            start = i + 1
    return out


def _walk(n: int, heads: int, step: float, seed: int) -> torch.Tensor:
    """Random-walk keys [1, heads, n, 16]: neighbours alike, to a degree set by ``step`` per head."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, heads, n, 16, generator=g) * torch.tensor(step).view(1, -1, 1, 1)
    return torch.randn(1, heads, 1, 16, generator=g) + noise.cumsum(2)


# ---------------------------------------------------------------------------------------------------------------
# merging sets (Algorithm 1)


@pytest.mark.parametrize("threshold", [0.5, 0.75, 0.9])
def test_sets_are_algorithm_1_and_never_hold_a_member_at_or_below_the_threshold(threshold):
    keys = _walk(160, 3, [0.2, 0.4, 0.8], seed=1)
    lengths = torch.tensor([[160, 150, 131]])
    ends = merging_sets(keys, lengths, sinks=3, window=5, threshold=threshold)
    merged = 0
    for h in range(3):
        n = int(lengths[0, h])
        sets = _sets(ends[0, h], n)
        assert sets == _algorithm_1(keys[0, h], n, 3, 5, threshold) and not ends[0, h, n:].any()
        unit = F.normalize(keys[0, h], dim=-1)
        for s in sets:
            anchor = s[-1]
            assert all(float(unit[i] @ unit[anchor]) > threshold for i in s[:-1])  # never at or below it
            assert len(s) == 1 or (s[0] >= 3 and anchor < n - 5)  # sinks and window stay alone
            merged += len(s) - 1
    assert merged > 20  # not vacuous: the walks do have similar neighbours


def test_a_budget_caps_merging_and_never_lowers_the_threshold():
    keys = _walk(120, 2, [0.1, 0.3], seed=2)
    lengths = torch.tensor([[120, 120]])
    free = merging_sets(keys, lengths, 2, 4, 0.5).sum(-1)  # [1, 2] sets per head with the threshold alone
    keep = torch.tensor([[60, 60]])
    assert (free < keep).any()  # the cap binds
    capped = merging_sets(keys, lengths, 2, 4, 0.5, keep=keep)
    assert (capped.sum(-1) >= keep).all() and (capped.sum(-1) >= free).all()
    unit = F.normalize(keys[0], dim=-1)
    for h in range(2):
        for s in _sets(capped[0, h], 120):
            assert all(float(unit[h, i] @ unit[h, s[-1]]) > 0.5 for i in s[:-1])
    # the raised threshold is the least that keeps the cap: a little lower merges below it
    assert merging_sets(keys, lengths, 2, 4, 0.5, keep=torch.tensor([[1, 1]])).sum(-1).tolist() == free.tolist()


def test_compression_differs_between_heads_and_nbytes_counts_what_each_holds():
    """Head 0: a slow drift (every key close to its neighbours); head 1: one-hot keys cycling (cosine 0)."""
    n, d = 40, 16
    drift = _walk(n, 1, [0.02], seed=3)[0, 0]
    onehot = torch.eye(d).repeat(3, 1)[:n]
    keys = torch.stack([drift, onehot])[None].half()  # [1, 2, 40, 16]
    cache = KVMergerCache(1, pivot="mean_key", sinks=2, window=4)
    cache.update(keys, keys, 0)
    layer = cache.layers[0]
    assert layer.lengths.tolist() == [[2 + 1 + 4, n]]  # head 0's middle merges into one state, head 1 keeps all
    k, _ = layer.past()
    assert torch.equal(k[0, 1], onehot.half()) and torch.equal(k[0, 0, :2], drift[:2].half())
    held = (7 + n) * d * 2  # K's 47 states of 16 halves
    assert cache.nbytes() == 2 * held + 2 * 8  # K, V and the counts, long [1, 2]
    assert cache.nbytes() < 2 * 2 * n * d * 2  # less than both heads at the longest head's count


# ---------------------------------------------------------------------------------------------------------------
# the pivot and the merge (Gaussian kernel weights, |S| on values)

# Set {1, 2, 3}: keys a = (1, .5), b = (1, 1), c = (.5, 1); the anchor c has cosine .948 to b and .8 to a (> .7), so
# all three merge. Slot 4 is orthogonal to c, slot 0 a sink, slot 5 the window.
KEYS = _rows([5, 0, 0, 1], [1, .5, 0, 0], [1, 1, 0, 0], [.5, 1, 0, 0], [0, 0, 0, 1], [3, 3, 3, 3])
VALUES = _rows([9, 9, 9, 9], [1, 0, 0, 2], [0, 0, 0, 2], [4, 0, 0, 2], [7, 7, 7, 7], [8, 8, 8, 8])


def _merged(pivot: str, query: torch.Tensor | None = None) -> KVMergerCache:
    cache = KVMergerCache(1, threshold=0.7, pivot=pivot, sinks=1, window=1)
    if query is not None:  # what the attention hook hands the layer: [B, H_q, w, D] post-RoPE, and the scale
        cache.layers[0].queries = (query, 1.0)
    cache.update(KEYS, VALUES, 0)
    return cache


def test_the_attention_pivot_is_the_most_attended_member_not_the_mean_key_one():
    # mean key (2.5/3, 2.5/3): closest to b. A query along (1, -1) attends a most (q.a = 5, q.b = 0, q.c = -5).
    by_mean = _merged("mean_key").layers[0].past()[0]
    cache = _merged("attention", torch.tensor([[[[10.0, -10.0, 0, 0]]]]))
    by_attention = cache.layers[0].past()[0]
    assert cache.layers[0].lengths.tolist() == [[4]]
    # around b: squared distances .25, 0, .25 -> sigma^2 = 1/6, g = exp(-.75) for a and c
    e = math.exp(-0.75)
    torch.testing.assert_close(by_mean[0, 0, 1], torch.tensor([(1 + 1.5 * e) / (1 + 2 * e)] * 2 + [0.0, 0.0]))
    # around a: squared distances 0, .25, .5 -> sigma^2 = .25, g = exp(-.5) for b, exp(-1) for c
    gb, gc = math.exp(-0.5), math.exp(-1.0)
    key = [(1 + gb + .5 * gc) / (1 + gb + gc), (.5 + gb + gc) / (1 + gb + gc), 0.0, 0.0]
    torch.testing.assert_close(by_attention[0, 0, 1], torch.tensor(key))
    assert not torch.allclose(by_mean, by_attention)
    # the merged state's accumulated attention is its members' sum: softmax over the 6 keys of q.k
    weights = torch.softmax(KEYS[0, 0] @ torch.tensor([10.0, -10.0, 0, 0]), 0)
    scores = cache.layers[0].s_flat
    torch.testing.assert_close(scores, torch.stack([weights[0], weights[1:4].sum(), weights[4], weights[5]]))


def test_values_merge_with_the_key_weights_rescaled_by_the_set_size():
    v = _merged("mean_key").layers[0].past()[1]
    e = math.exp(-0.75)  # pivot b, weights e, 1, e: v* = |S| sum_i w_i v_i with |S| = 3
    torch.testing.assert_close(v, _rows([9, 9, 9, 9], [3 * 5 * e / (1 + 2 * e), 0, 0, 6], [7, 7, 7, 7],
                                        [8, 8, 8, 8]))


def test_the_attention_hook_records_the_models_own_attention_weights():
    """Eager attention with output_attentions gives the reference: the last ``observe`` queries' weights, summed over
    queries and each KV head's query heads; then one decode step adds its query's weights."""
    model = _llama("eager")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9))
    cache = build_cache({"method": "kvmerger", "threshold": 1.0, "observe": 5}, model)
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(), output_attentions=True).attentions
        model(ids, past_key_values=cache)
    for layer, att in zip(cache.layers, ref):  # att [B, H_q, 12, 12]
        expected = att[:, :, -5:].sum(2).view(2, 2, 2, 12).sum(2)  # [B, H_kv, 12]
        torch.testing.assert_close(km.unpack(layer.s_flat, layer.lengths, 12), expected)
    full = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=full)
        step = model(ids[:, :1], past_key_values=full, output_attentions=True).attentions
        before = [km.unpack(layer.s_flat, layer.lengths, 12) for layer in cache.layers]
        model(ids[:, :1], past_key_values=cache)
    for layer, prev, att in zip(cache.layers, before, step):  # att [B, H_q, 1, 13]
        added = att[:, :, 0].view(2, 2, 2, 13).sum(2)
        torch.testing.assert_close(km.unpack(layer.s_flat, layer.lengths, 13),
                                   torch.cat([prev, torch.zeros(2, 2, 1)], -1) + added)


# ---------------------------------------------------------------------------------------------------------------
# on a model: exactness where nothing merges, masks over ragged storage, what merging costs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("setting", [{"threshold": 1.0}, {"threshold": -1.0, "budget": 1.0}])
def test_threshold_one_or_budget_one_is_the_full_cache(attn, setting):
    model = _llama(attn)
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(6))
    cache = build_cache({"method": "kvmerger", "sinks": 1, "window": 2, "interval": 1, **setting}, model)
    for got, ref in zip(_logits_steps(model, ids, cache, 6), _logits_steps(model, ids, DynamicCache(), 6)):
        assert torch.equal(got, ref)
    assert all(layer.lengths.tolist() == [[19, 19]] * 2 for layer in cache.layers)


@pytest.mark.parametrize("setting", [{"threshold": 1.0}, {"threshold": -1.0, "budget": 1.0}])
def test_threshold_one_or_budget_one_generates_the_full_cache_tokens_in_a_padded_batch(model, setting):
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5], ids[1, :5] = 0, 0
    cache = build_cache({"method": "kvmerger", "interval": 3, **setting}, model, attention_mask=mask)
    kw = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, **kw)
        ref = model.generate(ids, past_key_values=DynamicCache(), **kw)
    assert torch.equal(out, ref)
    assert [layer.lengths.tolist() for layer in cache.layers] == [[[29, 29], [24, 24]]] * 3  # pads never held


def _noisy_unpack(unpack):
    """``unpack`` with 1e3 instead of zeros in the empty slots."""
    def noisy(flat, lengths, width):
        out = unpack(flat, lengths, width)
        held = km.slots(lengths, width)
        return torch.where(held.view(*held.shape, *[1] * (out.dim() - 3)), out, torch.full_like(out, 1e3))
    return noisy


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_heads_empty_slots_are_hidden_from_attention(attn, monkeypatch):
    model = _llama(attn)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    spec = {"method": "kvmerger", "threshold": 0.2, "sinks": 2, "window": 3, "interval": 2}
    cache = build_cache(spec, model)
    clean = _logits_steps(model, ids, cache, 5)
    assert any(len(set(layer.lengths.flatten().tolist())) > 1 for layer in cache.layers)  # ragged
    monkeypatch.setattr(km, "unpack", _noisy_unpack(km.unpack))
    noisy = _logits_steps(model, ids, build_cache(spec, model), 5)
    for a, b in zip(clean, noisy):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_model_without_the_hook_is_refused():
    model = _llama()  # fresh: the hooks stay on a model once any KVMerger cache was attached to it
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(8))
    with pytest.raises(InputError, match="attach"), torch.no_grad():
        model(ids, past_key_values=KVMergerCache(3))  # the attention pivot has no queries
    cache = KVMergerCache(3, pivot="mean_key")
    with torch.no_grad():
        model(ids, past_key_values=cache)  # the prompt pass attends to its own states
        with pytest.raises(InputError, match="attention hook"):
            model(ids[:, :1], past_key_values=cache)
        assert cache.attach(model) is cache
        model(ids[:, :1], past_key_values=cache)


def test_merging_everything_costs_more_kl_than_the_papers_rule():
    """Runs of 6 equal tokens give neighbouring keys to merge; the broken merger (threshold -1) merges every
    unprotected state into one per head, the paper's rule (threshold 0.75) only similar ones."""
    model = _llama(initializer_range=0.1)
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5)).repeat_interleave(6, dim=1)
    full = stepwise_logits(model, ids, 64, DynamicCache())
    kl, held = {}, {}
    for name, threshold in (("paper", 0.75), ("broken", -1.0)):
        cache = build_cache({"method": "kvmerger", "threshold": threshold, "window": 8, "interval": 8}, model)
        kl[name] = compare(stepwise_logits(model, ids, 64, cache), full, ids[:, 64:])["kl_to_full"]
        held[name] = sum(int(layer.lengths.sum()) for layer in cache.layers) / (3 * 4 * 2 * 95)
    assert 0.2 < held["paper"] < 0.9 and held["broken"] < held["paper"]  # both merged, the broken one more
    assert kl["broken"] > 1.5 * kl["paper"] > 0
