"""KVTuner as the paper searches it (issue #23, section 3), on tiny random Llama models (CPU): the authors' candidate
pairs, value-heavier ones included, so which side needs the bits is measured; the calibration pass that quantizes
the prompt too (force_quant); layers clustered by sensitivity into groups with one pair per group and pruned
candidates; and a search whose objective is broken not finding what the real one finds."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm_compress.kv import kvtuner
from llm_compress.kv.config import AUTHORS_CANDIDATES, KVTunerConfig
from llm_compress.kv.kvtuner import cluster_layers, make_objective, prune_candidates, search
from llm_compress.kv.spec import average_bits, normalize_spec, parse_pair
from tests.test_kvtuner import _spec, rows  # noqa: F401 (rows: the same module-scoped fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(layers: int, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 96,
           qk_scale: float = 1.0) -> LlamaForCausalLM:
    """A random tiny Llama; ``qk_scale`` multiplies every layer's q and k projections, so attention logits grow by
    its square and attention turns sharp (a random model's attention is nearly uniform, where keys barely matter)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model


def _outlier_values(model: LlamaForCausalLM, layer: int, factor: float, group_size: int) -> None:
    """Make ``layer`` very sensitive to value quantization without changing what the model computes: the first
    channel of every value group (``group_size`` channels of a token) is multiplied by ``factor`` in v_proj and the
    o_proj columns that read it are divided by it. The outlier then sets the group's min-max range, and the other
    channels of the group round to a few levels."""
    attn = model.model.layers[layer].self_attn
    d, rep = attn.head_dim, attn.num_key_value_groups
    with torch.no_grad():
        for ch in range(0, attn.v_proj.out_features, group_size):  # ch = kv_head * d + channel
            attn.v_proj.weight[ch] *= factor
            kv_head, c = divmod(ch, d)
            for q_head in range(kv_head * rep, (kv_head + 1) * rep):  # the query heads sharing this kv head
                attn.o_proj.weight[:, q_head * d + c] /= factor


def test_default_candidates_are_the_authors_value_heavier_pairs_included():
    defaults = KVTunerConfig().candidates
    # the authors' KIVI-mode lists: the standard one and the per-group ones with K4V8 / K2V4 (search_optuna_adaptive)
    assert defaults == list(AUTHORS_CANDIDATES) == normalize_spec({"method": "kvtuner"})["candidates"]
    assert set(defaults) == {"KV8", "K8V4", "KV4", "K4V2", "KV2", "K4V8", "K2V4"}
    assert {n for n in defaults if parse_pair(n)[0] < parse_pair(n)[1]} == {"K4V8", "K2V4"}
    spec = normalize_spec({"method": "kvtuner"})
    assert spec["force_quant"] is True and spec["prune"] is True and spec["groups"] == 6


def test_which_side_gets_the_bits_is_measured_not_forced(rows):
    """The same default candidates: a random model's flat attention makes values the sensitive side, sharp
    attention (q and k x20) makes keys; the search finds each, in its pruned options and in its choice."""
    found = {}
    for name, model in (("flat", _model(2)), ("sharp", _model(2, qk_scale=20.0))):
        result = search(model, rows, _spec(budget=4.5), prefill=32)
        rec = result["spec"]["search"]
        assert rec["strategy"] == "exact" and rec["groups"] == [[0], [1]]
        found[name] = (result["sensitivity"], rec["group_candidates"], result["spec"]["bits"])
    table, options, bits = found["flat"]
    assert all(r["K4V8"] < r["K8V4"] and r["K2V4"] < r["K4V2"] for r in table)
    assert all("K8V4" not in o and "K4V2" not in o for o in options)  # pruned: the key-heavier pairs lose
    assert all(k <= v for k, v in bits) and any(k < v for k, v in bits)
    table, options, bits = found["sharp"]
    assert all(r["K8V4"] < r["K4V8"] and r["K4V2"] < r["K2V4"] for r in table)
    assert all("K4V8" not in o and "K2V4" not in o for o in options)
    assert all(k >= v for k, v in bits) and any(k > v for k, v in bits)


def test_force_quant_calibration_sees_the_prompt_damage(rows):
    model = _model(2)
    quantized_prompt = make_objective(model, rows, 32, "kl", 16, 16, force_quant=True)
    exact_prompt = make_objective(model, rows, 32, "kl", 16, 16, force_quant=False)
    for pairs in (((4, 4), (4, 4)), ((2, 2), (8, 8)), ((8, 4), (4, 2))):
        assert quantized_prompt(pairs) > 3 * exact_prompt(pairs) > 0
    # nothing quantized, nothing to see: the held-states layers return the exact states
    assert quantized_prompt(((16, 16), (16, 16))) < 1e-9 and exact_prompt(((16, 16), (16, 16))) < 1e-9
    # the search runs with it by default and records it
    rec = search(model, rows, _spec(budget=6.0, candidates=["KV8", "KV4"]), prefill=32)["spec"]["search"]
    assert rec["force_quant"] is True
    assert rec["value"] == pytest.approx(quantized_prompt(tuple(parse_pair(n) for n in rec["chosen"])))


def test_cluster_layers_groups_by_sensitivity_not_position():
    levels = {0: 1e-3, 1: 1e-5, 2: 1e-7}  # three kinds of layers, interleaved
    table = [{"KV4": levels[i % 3] * (1 + 0.1 * i), "KV2": 10 * levels[i % 3]} for i in range(9)]
    assert cluster_layers(table, 3, "kl") == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert cluster_layers(table, 1, "kl") == [list(range(9))]
    assert cluster_layers(table, 9, "kl") == cluster_layers(table, 20, "kl") == [[i] for i in range(9)]
    # ppl ratios: damage is ratio - 1, noise below 1 floored (no log of a negative), still grouped by level
    ppl = [{name: 1 + v for name, v in row.items()} for row in table]
    ppl[2]["KV4"] = 0.9999999
    assert cluster_layers(ppl, 3, "ppl") == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_prune_keeps_the_pairs_no_other_beats_on_bits_and_sensitivity():
    row = {"KV8": 1e-7, "K8V4": 5e-6, "K4V8": 1e-7, "KV4": 6e-6, "K4V2": 1e-4, "K2V4": 6e-6, "KV2": 1e-4}
    # KV8 ties K4V8 with more bits, K8V4 loses to K4V8 at equal bits, KV4 ties K2V4 and K4V2 ties KV2 with more
    assert prune_candidates(row) == ["K4V8", "K2V4", "KV2"]
    row = {"KV8": 0.0, "K8V4": 1e-6, "K4V8": 2e-6, "KV4": 3e-6, "K4V2": 1e-5, "K2V4": 2e-5, "KV2": 1e-4}
    assert prune_candidates(row) == ["KV8", "K8V4", "KV4", "K4V2", "KV2"]  # one per bit width, as the authors' lists


def test_grouped_search_of_a_32_layer_model_is_per_group_and_maps_back_per_layer():
    model = _model(32, hidden=32, heads=2, kv_heads=1, vocab=64)  # head_dim 16
    _outlier_values(model, 20, 300.0, 16)
    calib = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(3))
    result = search(model, calib, _spec(budget=3.0, groups=4, strategy="optuna", trials=6), prefill=32)
    spec, rec = result["spec"], result["spec"]["search"]
    groups, options = rec["groups"], rec["group_candidates"]
    assert len(groups) == 4 and sorted(i for g in groups for i in g) == list(range(32))
    # the search space is the groups' (at most one pair per bit width each after pruning), not 7 ** 32
    assert rec["space"] == math.prod(len(o) for o in options) <= 5 ** 4
    assert rec["layer_space"] == 7 ** 32 and rec["trials"] == 6 and rec["measured"] <= 6
    # the result is a per-layer kivi spec whose layers share their group's pair, in every measured configuration
    assert spec["method"] == "kivi" and len(spec["bits"]) == 32 and average_bits(spec["bits"]) <= 3.0
    for names in [rec["chosen"]] + [t["candidates"] for t in result["trials"]]:
        for group, opts in zip(groups, options):
            assert len({names[i] for i in group}) == 1 and names[group[0]] in opts
    assert [parse_pair(n) for n in rec["chosen"]] == [tuple(p) for p in spec["bits"]]
    # the layer made sensitive is grouped with sensitive layers only, and its group gets the most value bits
    table = result["sensitivity"]
    mine = next(g for g in groups if 20 in g)
    assert all(table[i]["KV2"] > 10 * sorted(r["KV2"] for r in table)[16] for i in mine)
    assert spec["bits"][20][1] == max(v for _, v in spec["bits"])


def test_a_broken_objective_does_not_find_the_better_configuration(rows, monkeypatch):
    """Layer 2 of 4 is made very sensitive (function unchanged): the real search gives it 8-bit values and beats
    every uniform configuration within the budget; a search whose objective is a constant picks the cheapest
    configuration, whose true objective is several times worse."""
    model = _model(4)
    _outlier_values(model, 2, 30.0, 16)
    true = make_objective(model, rows, 32, "kl", 16, 16)
    real = search(model, rows, _spec(budget=3.5), prefill=32)["spec"]
    assert real["search"]["strategy"] == "exact" and real["bits"][2][1] == 8
    real_value = true(tuple(map(tuple, real["bits"])))
    uniform = [true((parse_pair(c),) * 4) for c in AUTHORS_CANDIDATES if average_bits([parse_pair(c)]) <= 3.5]
    assert real_value < min(uniform)
    monkeypatch.setattr(kvtuner, "make_objective", lambda *args, **kwargs: (lambda pairs: 1.0))
    broken = search(model, rows, _spec(budget=3.5), prefill=32)["spec"]
    assert broken["bits"][2][1] != 8
    assert true(tuple(map(tuple, broken["bits"]))) > 3 * real_value
