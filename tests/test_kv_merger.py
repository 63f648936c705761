"""The KVMerger cache (llm_compress.kv.kvmerger): merges by hand, the budget (a cap) and the protected rows, padding,
memory, specs (tests/test_kvmerger_paper.py: the paper's sets, pivot and values, the attention hook, ragged masks).

Models are tiny random Llamas on CPU; references are DynamicCache runs and values worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from llm_compress.config import parse_recipe
from llm_compress.errors import InputError, RecipeError
from llm_compress.kv import build_cache, load_kv_cache, normalize_spec, save_kv_cache_json
from llm_compress.kv.kvmerger import KVMergerCache

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, VOCAB, PADS = 3, 96, 5


def _llama(attn: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       attn_implementation=attn)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = LlamaForCausalLM(_llama()).eval()
    assert m.config._attn_implementation == "sdpa"
    return m


@pytest.fixture(scope="module")
def padded():
    """Two 20-token prompts, the second left-padded by PADS; ids avoid pad/bos/eos."""
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :PADS] = 0
    ids[1, :PADS] = 0
    return ids, mask


def _new_tokens(model, ids, mask, cache, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[:, ids.shape[1]:]


def _rows(*rows) -> torch.Tensor:
    """Hand-written states: rows of D values -> [1, 1, len(rows), D] float32."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# ---------------------------------------------------------------------------------------------------------------
# merges worked out by hand: one row, one head, sinks 1, window 1, 6 tokens, budget 0.6 -> at least ceil(3.6) = 4
# kept; token 4 is dissimilar to token 3 (cosine 0), so it stays alone. Pivot: the mean-key option (no model here).


def test_a_set_of_equal_keys_merges_with_equal_weights():
    keys = _rows([5, 0, 0, 1], [2, 0, 2, 0], [2, 0, 2, 0], [2, 0, 2, 0], [0, 3, 0, 0], [1, 1, 1, 1])
    values = _rows([9, 9, 9, 9], [1, 0, 0, 0], [2, 0, 4, 0], [6, 0, -1, 0], [7, 7, 7, 7], [8, 8, 8, 8])
    cache = KVMergerCache(1, budget=0.6, threshold=0.9, pivot="mean_key", sinks=1, window=1)
    cache.update(keys, values, 0)
    k, v = cache.layers[0].past()
    assert torch.equal(k, _rows([5, 0, 0, 1], [2, 0, 2, 0], [0, 3, 0, 0], [1, 1, 1, 1]))
    # |S| times the plain mean of the set's values (the paper's value rule): 3 * (1 + 2 + 6) / 3 = 9,
    # 3 * (0 + 4 - 1) / 3 = 3
    assert torch.equal(v, _rows([9, 9, 9, 9], [9, 0, 3, 0], [7, 7, 7, 7], [8, 8, 8, 8]))


def test_a_set_merges_into_the_gaussian_weighted_combination_around_its_pivot():
    # Set {1, 2, 3}: keys a = (1, .5), b = (1, 1), c = (.5, 1) (cosines to the anchor c: .8 and .948, > 0.7). Its
    # mean key is (2.5/3, 2.5/3), closest to b: pivot b. Squared distances to b: .25, 0, .25, so sigma^2 = 1/6 and
    # the weights are exp(-.25 / (1/3)) = exp(-0.75) =: e for a and c, 1 for b.
    keys = _rows([5, 0, 0, 1], [1, .5, 0, 0], [1, 1, 0, 0], [.5, 1, 0, 0], [0, 0, 0, 1], [3, 3, 3, 3])
    values = _rows([9, 9, 9, 9], [1, 0, 0, 2], [0, 0, 0, 2], [4, 0, 0, 2], [7, 7, 7, 7], [8, 8, 8, 8])
    cache = KVMergerCache(1, budget=0.6, threshold=0.7, pivot="mean_key", sinks=1, window=1)
    cache.update(keys, values, 0)
    k, v = cache.layers[0].past()
    e = math.exp(-0.75)
    key = (1 + 1.5 * e) / (1 + 2 * e)  # (e * 1 + 1 * 1 + e * .5) / (1 + 2e), the same in both channels
    value = 5 * e / (1 + 2 * e)  # (e * 1 + 1 * 0 + e * 4) / (1 + 2e), then times |S| = 3
    torch.testing.assert_close(k, _rows([5, 0, 0, 1], [key, key, 0, 0], [0, 0, 0, 1], [3, 3, 3, 3]))
    torch.testing.assert_close(v, _rows([9, 9, 9, 9], [3 * value, 0, 0, 6], [7, 7, 7, 7], [8, 8, 8, 8]))
    assert 0 < value < 4 and 0.5 < key < 1  # inside the set's ranges: a convex combination (before the |S|)


def test_each_layer_row_and_head_merges_its_own_candidates_and_no_others():
    """Random 16-d keys are nowhere near cosine 0.99; copies planted in place make the only candidates."""
    keys = torch.randn(2, 2, 2, 24, 16, generator=torch.Generator().manual_seed(5))  # [layer, B, H, N, D]
    copies = {(0, 0, 0): 5, (0, 0, 1): 4, (0, 1, 0): 6, (0, 1, 1): 4, (1, 0, 0): 5, (1, 0, 1): 5, (1, 1, 0): 3,
              (1, 1, 1): 6}
    for (layer, b, h), n_copies in copies.items():
        for i in range(n_copies):
            keys[layer, b, h, 4 + 2 * i + 1] = keys[layer, b, h, 4 + 2 * i]  # tokens 4 + 2i, 5 + 2i: a candidate
    # the threshold alone: every (layer, row, head) merges all its candidates and nothing else, so the counts differ;
    # a budget is a cap, not a quota: at 0.25 (6 of 24 would do) nothing more merges
    for budget in (None, 0.25):
        cache = KVMergerCache(2, budget=budget, threshold=0.99, pivot="mean_key", sinks=2, window=4)
        cache.update(keys[0], keys[0], 0)
        cache.update(keys[1], keys[1], 1)
        for layer in (0, 1):
            assert cache.layers[layer].lengths.tolist() == [[24 - copies[layer, b, h] for h in (0, 1)]
                                                            for b in (0, 1)]
            k, _ = cache.layers[layer].past()
            for b in (0, 1):
                for h in (0, 1):  # only identical copies merged: every held key is one of the originals, exactly
                    n = int(cache.layers[layer].lengths[b, h])
                    assert all(any(torch.equal(row, orig) for orig in keys[layer, b, h]) for row in k[b, h, :n])
                    assert torch.equal(k[b, h, :2], keys[layer, b, h, :2])  # sinks and window exact
                    assert torch.equal(k[b, h, n - 4:n], keys[layer, b, h, -4:])
    keep = [i for i in range(24) if i not in (5, 7, 9)]  # the head with exactly 3 candidates merges those
    assert torch.equal(cache.layers[1].past()[0][1, 0], keys[1, 1, 0, keep])


def test_the_whole_middle_merges_into_one_state_at_most():
    keys = torch.arange(1.0, 21.0).view(1, 1, 20, 1).expand(1, 2, 20, 8)  # all parallel: cosine 1
    cache = KVMergerCache(1, budget=0.1, threshold=0.5, pivot="mean_key", sinks=3, window=5)
    cache.update(keys, keys, 0)
    k, _ = cache.layers[0].past()  # at least ceil(0.1 * 20) = 2 kept; the 12 middle tokens merge into one
    assert k.shape[-2] == 9 and cache.get_seq_length() == 20
    assert torch.equal(k[..., :3, :], keys[..., :3, :]) and torch.equal(k[..., -5:, :], keys[..., -5:, :])
    assert 4 <= float(k[0, 0, 3, 0]) <= 15  # inside the merged keys' range


# ---------------------------------------------------------------------------------------------------------------
# on a model


def _logits_steps(model, ids, cache, steps: int) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for i in range(steps + 1):
            out.append(model(ids if i == 0 else out[-1][:, -1:].argmax(-1), past_key_values=cache,
                             use_cache=True).logits)
    return out


def test_budget_one_is_the_full_cache(model):
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(6))
    cache = build_cache({"method": "kvmerger", "budget": 1.0, "sinks": 1, "window": 2, "interval": 1}, model)
    for got, ref in zip(_logits_steps(model, ids, cache, 6), _logits_steps(model, ids, DynamicCache(), 6)):
        assert torch.equal(got, ref)
    assert all(layer.held == 19 for layer in cache.layers)


def _last(x: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """The last n held states of every (row, head) of a left-aligned [B, H, held, D] -> [B, H, n, D]."""
    return torch.stack([torch.stack([x[b, h, int(m) - n:int(m)] for h, m in enumerate(row)])
                        for b, row in enumerate(lengths)])


def test_merging_keeps_the_budget_cap_and_sinks_and_window_exact(model):
    """Teacher-forced: both caches see the same tokens, so layer 0's states of every token match the full cache.
    Threshold -1 would merge every unprotected neighbour; the budget 0.5 caps that at half the tokens per head."""
    sinks, window, interval = 2, 4, 3
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(7))
    cache, full = KVMergerCache(LAYERS, budget=0.5, threshold=-1.0, sinks=sinks, window=window,
                                interval=interval).attach(model), DynamicCache()
    differs = False
    with torch.no_grad():
        assert torch.equal(model(ids, past_key_values=cache).logits, model(ids, past_key_values=full).logits)
        for layer, ref in zip(cache.layers, full.layers):  # the prompt's states are exact in every layer
            assert (layer.lengths >= 10).all() and (layer.lengths < 20).any()  # ceil(0.5 * 20) at least
            assert torch.equal(layer.keys[..., :sinks, :], ref.keys[..., :sinks, :])
            assert torch.equal(_last(layer.values, layer.lengths, window), ref.values[..., -window:, :])
        for step in range(9):
            nxt = ids[:, step:step + 1]
            differs |= not torch.allclose(model(nxt, past_key_values=cache).logits,
                                          model(nxt, past_key_values=full).logits, atol=1e-4)
            seen = 21 + step
            assert all((layer.lengths >= math.ceil(seen / 2)).all() for layer in cache.layers)
            assert cache.get_seq_length() == seen
            layer = cache.layers[0]
            k, v = layer.past()
            assert torch.equal(k[..., :sinks, :], full.layers[0].keys[..., :sinks, :])
            assert torch.equal(_last(k, layer.lengths, window), full.layers[0].keys[..., -window:, :])
            assert torch.equal(_last(v, layer.lengths, window), full.layers[0].values[..., -window:, :])
    assert layer.held < seen and differs  # it compressed during decoding, and the merge changed the logits


def test_left_padded_batch_with_budget_one_generates_the_full_cache_tokens(model, padded):
    ids, mask = padded
    cache = build_cache({"method": "kvmerger", "budget": 1.0}, model, attention_mask=mask)
    assert torch.equal(_new_tokens(model, ids, mask, cache, 10), _new_tokens(model, ids, mask, DynamicCache(), 10))
    assert cache.get_seq_length() == 29


@pytest.mark.parametrize("threshold", [-1.0, 0.3])  # 0.3: layers have different candidate counts
def test_left_padded_batch_with_merging_never_holds_pads(model, padded, threshold):
    ids, mask = padded
    spec = {"method": "kvmerger", "budget": 0.5, "threshold": threshold, "sinks": 2, "window": 4, "interval": 2}
    cache = build_cache(spec, model, attention_mask=mask)
    out, ref = _new_tokens(model, ids, mask, cache, 12), _new_tokens(model, ids, mask, DynamicCache(), 12)
    assert out.shape == ref.shape and torch.equal(out[:, 0], ref[:, 0])  # the prompt pass is exact
    for layer in cache.layers:  # each row keeps at most its real tokens (no pads), at least half of them
        real = torch.tensor([31, 31 - PADS])[:, None]
        assert layer.held < layer.seen == 31 and layer.pads.tolist() == [0, PADS]
        assert (layer.lengths <= real).all() and (layer.lengths >= torch.ceil(real / 2)).all()
    with pytest.raises(InputError, match="set_padding"):
        _new_tokens(model, ids, mask, KVMergerCache(LAYERS, threshold=-1.0, sinks=2, window=4), 2)


def test_nbytes_counts_the_held_rows():
    x = torch.randn(2, 2, 40, 8, generator=torch.Generator().manual_seed(8)).half()
    cache = KVMergerCache(1, budget=0.5, threshold=-1.0, pivot="mean_key", sinks=2, window=4)
    cache.update(x, x, 0)
    held = int(cache.layers[0].lengths.sum())  # every (row, head)'s own count, at least 20 each
    assert held >= 4 * 20 and cache.layers[0].keys.dtype == torch.float16
    counts = 2 * 2 * 8  # the held count per (row, head), long [B, H]
    assert cache.nbytes() == 2 * held * 8 * 2 + counts and cache.full_bytes() == 2 * 2 * 2 * 40 * 8 * 2


# ---------------------------------------------------------------------------------------------------------------
# specs, kv_cache.json and the recipe


@pytest.mark.parametrize("spec, match", [
    ({"budget": 0}, r"budget must lie in \(0, 1\], got 0"),
    ({"budget": 1.5}, "budget"),
    ({"threshold": 1.2}, r"threshold must lie in \[-1, 1\]"),
    ({"sinks": -1}, "sinks must be an integer >= 0"),
    ({"window": 0}, "window must be an integer >= 1"),
    ({"interval": 2.5}, "interval must be an integer >= 1"),
    ({"pivot": "random"}, "pivot: Input should be 'attention' or 'mean_key'"),
    ({"observe": 0}, "observe must be an integer >= 1"),
    ({"merge": "all"}, r"unknown kvmerger parameter\(s\) \['merge'\]"),
])
def test_bad_specs_name_the_field(model, spec, match):
    with pytest.raises(InputError, match=match):
        build_cache({"method": "kvmerger", **spec}, model)


def test_flash_attention_is_refused():
    with pytest.raises(InputError, match="KVMerger cache needs eager or sdpa attention"):
        build_cache({"method": "kvmerger"}, _llama("flash_attention_2"))


def test_kv_cache_json_round_trips(tmp_path, model):
    written = save_kv_cache_json(tmp_path, {"method": "kvmerger", "budget": 0.3, "window": 8})
    assert json.loads(written.read_text()) == {"method": "kvmerger", "threshold": 0.75, "budget": 0.3,
                                               "pivot": "attention", "observe": 32, "sinks": 4, "window": 8,
                                               "interval": 32}
    cache = load_kv_cache(tmp_path, model)
    assert isinstance(cache, KVMergerCache) and cache.spec == normalize_spec(json.loads(written.read_text()))
    assert {(layer.budget, layer.threshold, layer.pivot, layer.observe, layer.sinks, layer.window, layer.interval)
            for layer in cache.layers} == {(0.3, 0.75, "attention", 32, 4, 8, 32)}


def test_recipe_takes_kvmerger():
    r = parse_recipe({"kv": {"enabled": True, "cache": {"method": "kvmerger"}}})
    assert r.kv.cache.method == "kvmerger" and (r.kv.cache.budget, r.kv.cache.window) == (None, 32)
    with pytest.raises(RecipeError, match="threshold"):
        parse_recipe({"kv": {"enabled": True, "cache": {"method": "kvmerger", "threshold": 2}}})
