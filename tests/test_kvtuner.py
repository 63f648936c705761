"""KVTuner (llm_compress.kv.kvtuner): the per-layer bit search on tiny random Llama models (CPU), its budget, its table
and plot, the spec it writes, and its bad-input errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm_compress.errors import InputError
from llm_compress.kv import build_cache, load_kv_cache, normalize_spec, save_kv_cache_json
from llm_compress.kv.kivi import KIVICache
from llm_compress.kv.kvtuner import additive_best, pareto_front, plot_pareto, search
from llm_compress.kv.spec import average_bits, parse_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def rows():
    return torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(3))


def _spec(**kw) -> dict:
    return {"method": "kvtuner", "group_size": 16, "residual": 16, **kw}


def test_parse_pair_and_average_bits():
    assert parse_pair("KV4") == (4, 4) and parse_pair("K8V4") == (8, 4) and parse_pair("K16V2") == (16, 2)
    assert average_bits([(8, 4), (2, 2)]) == 4.0
    for bad in ("K4", "kv4", "KV4V2", 4):
        with pytest.raises(InputError, match="KV<bits> or K<bits>V<bits>"):
            parse_pair(bad)


def test_exact_search_respects_the_budget_and_is_the_best_measured(rows):
    model = _model(2)  # 7 ** 2 = 49 configurations unpruned: auto searches exactly
    result = search(model, rows, _spec(budget=3.0, prune=False), prefill=32)
    spec, rec = result["spec"], result["spec"]["search"]
    assert rec["strategy"] == "exact" and rec["measured"] == 49 == len(result["trials"])
    assert spec["method"] == "kivi" and len(spec["bits"]) == 2
    assert average_bits(spec["bits"]) <= 3.0 and rec["avg_bits"] == average_bits(spec["bits"])
    feasible = [t["objective"] for t in result["trials"] if t["avg_bits"] <= 3.0]
    assert rec["value"] == min(feasible)
    # more bits never lose on a full search: the all-KV8 configuration beats all-KV2
    by_names = {tuple(t["candidates"]): t["objective"] for t in result["trials"]}
    assert by_names[("KV8", "KV8")] < by_names[("KV2", "KV2")]
    # the sensitivity table has a row per layer and a column per candidate, KV2 worse than KV8 in each
    assert [sorted(r) for r in result["sensitivity"]] == [sorted(rec["candidates"])] * 2
    assert all(r["KV2"] > r["KV8"] >= 0 for r in result["sensitivity"])


def test_optuna_search_respects_the_budget(rows):
    model = _model(4)
    result = search(model, rows, _spec(budget=3.5, strategy="optuna", trials=8, objective="ppl"), prefill=32, seed=1)
    spec, rec = result["spec"], result["spec"]["search"]
    assert rec["strategy"] == "optuna" and rec["trials"] == 8 and 1 <= rec["measured"] <= 8  # repeats measured once
    assert average_bits(spec["bits"]) <= 3.5 and len(spec["bits"]) == 4
    # the first enqueued trial is the table's additive optimum, so the winner is at least as good as it
    seeded = additive_best(result["sensitivity"], 3.5)
    assert result["trials"][0]["candidates"] == seeded and rec["value"] <= result["trials"][0]["objective"]
    # the chosen spec builds the per-layer KIVI cache
    cache = build_cache(spec, model)
    assert isinstance(cache, KIVICache)
    assert [[layer.k_bits, layer.v_bits] for layer in cache.layers] == spec["bits"]


def test_additive_best_is_the_knapsack_optimum():
    table = [{"KV8": 0.0, "KV4": 1.0, "KV2": 5.0}, {"KV8": 0.0, "KV4": 0.1, "KV2": 0.2}]
    assert additive_best(table, 5.0) == ["KV8", "KV2"]  # 10 of 10 bits; sum 0.2, where KV4+KV4 costs 1.1
    assert additive_best(table, 3.0) == ["KV4", "KV2"]
    assert additive_best(table, 8.0) == ["KV8", "KV8"]
    assert additive_best(table, 1.0) is None


def test_pareto_front_and_plot(tmp_path, rows):
    trials = [{"avg_bits": 2.0, "objective": 0.5}, {"avg_bits": 3.0, "objective": 0.6},
              {"avg_bits": 4.0, "objective": 0.1}, {"avg_bits": 3.0, "objective": 0.2}]
    assert [(t["avg_bits"], t["objective"]) for t in pareto_front(trials)] == [(2.0, 0.5), (3.0, 0.2), (4.0, 0.1)]
    result = search(_model(2), rows, _spec(budget=4.0, candidates=["KV8", "KV2"]), prefill=32)
    png = plot_pareto(result, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chosen_spec_round_trips_with_its_search_record(tmp_path, rows):
    model = _model(2)
    spec = search(model, rows, _spec(budget=6.0, candidates=["KV8", "KV4"]), prefill=32)["spec"]
    path = save_kv_cache_json(tmp_path, spec)
    assert normalize_spec(__import__("json").loads(path.read_text())) == spec
    cache = load_kv_cache(tmp_path, model)
    assert cache.spec["search"]["budget"] == 6.0


def test_bad_kvtuner_specs_are_refused_by_name(rows):
    with pytest.raises(InputError, match="below the cheapest candidate"):
        normalize_spec(_spec(budget=1.5))
    with pytest.raises(InputError, match="objective"):
        normalize_spec(_spec(objective="acc"))
    with pytest.raises(InputError, match="KIVI key bits must be one of"):
        normalize_spec(_spec(candidates=["KV3"]))
    with pytest.raises(InputError, match="distinct"):
        normalize_spec(_spec(candidates=["KV4", "KV4"]))
    with pytest.raises(InputError, match="describes a search"):
        build_cache(_spec(), _model(2))
    with pytest.raises(InputError, match="residual window"):  # a 16-token prompt inside a 16-token window
        search(_model(2), rows, _spec(), prefill=16)
