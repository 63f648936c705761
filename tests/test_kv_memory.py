"""Memory accounting of the KV caches (llm_compress.kv.base, llm_compress.kv.measure): held bytes in a 16-bit
deployment whatever the run's dtype, sampled after every decode step, every held tensor counted; and the report's
KV tables showing the mean and worst-step figures. Tiny random Llama models on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from llm_compress.kv import build_cache
from llm_compress.kv.config import KV_METHODS
from llm_compress.kv.measure import MemoryTrace, full16_bytes, measure, reachable_tensors, stepwise_logits

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, VOCAB, R = 4, 128, 16  # head_dim 16; R: KIVI's group size and residual window in these tests


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _rows(n: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


# Caches that keep every token exact: none may score better than a 16-bit full cache (ratio 1).
IDLE = {
    "kivi 16 bits": {"method": "kivi", "bits": [16, 16], "group_size": R, "residual": R},
    "sink wider than the rows": {"method": "sink", "sinks": 4, "window": 64},
    "kvmerger budget 1": {"method": "kvmerger", "budget": 1.0, "sinks": 4, "window": 8},
    "minicache retaining all, 16 bits": {"method": "minicache", "gamma": 1.0, "bits": [16, 16]},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kivi_at_16_bits_is_a_full_cache_in_float32_and_bfloat16(model, dtype):
    """The figure is the 16-bit deployment's, so the run's dtype does not change it; the run's own bytes are
    reported beside it (twice as many in float32). The old accounting (run-dtype bytes against 16-bit full)
    would have said 0.5 in float32."""
    m = model.to(dtype)
    try:
        rows = _rows(2, 40)
        got = measure(m, rows, IDLE["kivi 16 bits"], prefill=20)
    finally:
        model.float()
    assert got["memory_ratio_mean"] == 1.0 and got["memory_ratio_min"] == 1.0
    assert got["bytes_mean"] == got["full_bytes_mean"] and got["memory_steps"] == 40 - 1 - 20
    assert got["bytes_max"] == full16_bytes(model.config, 2, 39)  # the last step: 39 tokens seen
    assert got["run_dtype_bytes_mean"] == got["bytes_mean"] * (2 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cache_that_holds_everything_scores_1_never_better(model, dtype):
    """DynamicCache and 16-bit KIVI hold exactly a full cache; the others keep every token too, plus bookkeeping
    (pad counts, magnitudes, masks), so they hold a little more: ratio <= 1 with every tensor counted."""
    m = model.to(dtype)
    try:
        rows = _rows(2, 40, seed=1)
        trace = MemoryTrace(m.config, 2)
        stepwise_logits(m, rows, 20, DynamicCache(config=m.config), on_step=trace)
        assert trace.summary()["memory_ratio_mean"] == 1.0 == trace.summary()["memory_ratio_min"]
        ratios = {name: measure(m, rows, spec, prefill=20) for name, spec in IDLE.items()}
    finally:
        model.float()
    assert ratios["kivi 16 bits"]["memory_ratio_mean"] == 1.0
    assert ratios["sink wider than the rows"]["memory_ratio_mean"] == 1.0  # no eviction, no pads declared: K/V only
    for name, got in ratios.items():
        assert 0.5 < got["memory_ratio_min"] <= got["memory_ratio_mean"] <= 1.0, name
    assert ratios["minicache retaining all, 16 bits"]["memory_ratio_mean"] < 1.0  # magnitudes and masks on top


def test_kivi_2bit_mean_over_decoding_is_below_the_after_prefill_snapshot(model):
    """The sawtooth: after a prompt of a multiple of R tokens every key is quantized and the key window is empty,
    the cache's best moment. Each decode step adds an exact key (and quantizes one value), so the ratio falls until
    the window reaches R keys and is flushed into codes, where it jumps back up. Over 31 steps the mean ratio is
    below the snapshot and the worst step (just before the flush) below the mean."""
    spec = {"method": "kivi", "bits": [2, 2], "group_size": R, "residual": R}
    rows, prefill = _rows(2, 8 * R + 32, seed=2), 8 * R
    snapshot = build_cache(spec, model)
    with torch.no_grad():
        model(input_ids=rows[:, :prefill], past_key_values=snapshot, use_cache=True)
    trace = MemoryTrace(model.config, 2)
    stepwise_logits(model, rows, prefill, build_cache(spec, model), on_step=trace)
    ratio = [f / h for f, h in zip(trace.full, trace.held)]
    seen = [prefill + i for i in range(1, len(ratio) + 1)]
    assert len(ratio) == 31 and seen[-1] == rows.shape[1] - 1
    for i in range(1, len(ratio)):  # up exactly where the key window is flushed, down everywhere else
        assert (ratio[i] > ratio[i - 1]) == (seen[i] % R == 0), (seen[i], ratio[i - 1], ratio[i])
    s = trace.summary()
    assert s["memory_ratio_min"] == min(ratio) == ratio[seen.index(prefill + R - 1)]  # the window holds R - 1 keys
    assert s["memory_ratio_min"] < s["memory_ratio_mean"] < snapshot.memory_ratio()
    assert s["bytes_max"] == max(trace.held) > s["bytes_mean"]


def test_sink_pads_are_counted():
    """Declared left padding leaves one long pad count per row in every layer: 8 bytes a row, in both sums (the
    other caches' pads: test_every_tensor_a_cache_references_is_counted)."""
    x = torch.randn(2, 2, 30, 16, generator=torch.Generator().manual_seed(3)).half()
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :3] = 0
    cache = KV_METHODS["sink"].load()(2, sinks=3, window=5).set_padding(mask)
    for layer_idx in range(2):
        cache.update(x, x, layer_idx)
    layer = cache.layers[0]
    assert layer.pads is not None and layer.pads.dtype == torch.long
    kv = 2 * (2 * 2 * (3 + 5) * 16 * 2)  # per layer: K and V [B, H, 8, D] in fp16
    assert cache.nbytes() == cache.nbytes16() == 2 * (kv + 2 * 8)


# Every cache method, with settings a 4-layer model of head_dim 16 runs; a new method must add its spec here.
EVERY_METHOD = {
    "kivi": {"method": "kivi", "bits": [2, 4], "group_size": R, "residual": R},
    "sink": {"method": "sink", "sinks": 2, "window": 8},
    "minicache": {"method": "minicache", "gamma": 0.3, "bits": [4, 4], "group_size": R, "residual": R},
    "kvmerger": {"method": "kvmerger", "budget": 0.5, "threshold": 0.0, "sinks": 2, "window": 4, "interval": 4},
    "cskv": {"method": "cskv", "init": "svd", "k_rank": 8, "v_rank": 16, "window": 4},  # svd: bases from the weights
}


@pytest.mark.parametrize("name", sorted(EVERY_METHOD))
def test_every_tensor_a_cache_references_is_counted(model, name):
    """Between forward passes, the storages reachable from the cache object (attributes, lists, dicts) are exactly
    those ``held_tensors`` counts: nothing held is left out (the sink and KVMerger pads once were), nothing counted
    is not held. Left-padded rows, so the eviction caches hold their pad counts."""
    ids = _rows(2, 30, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    cache = build_cache(EVERY_METHOD[name], model, attention_mask=mask)
    storages = lambda ts: {(str(t.device), t.untyped_storage().data_ptr()) for t in ts}  # noqa: E731
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        for step in range(12):
            assert storages(reachable_tensors(cache)) == storages(cache.held_tensors()), (name, step)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            logits = model(input_ids=logits[:, -1:].argmax(-1), attention_mask=mask, past_key_values=cache,
                           use_cache=True).logits
    assert storages(reachable_tensors(cache)) == storages(cache.held_tensors())


def test_every_registered_cache_method_is_checked():
    """A new cache method in KV_METHODS gets its accounting checked only once it has a spec in EVERY_METHOD."""
    assert {n for n, m in KV_METHODS.items() if m.runs is not None} <= set(EVERY_METHOD)


def test_report_kv_tables_show_the_mean_and_worst_step_ratios():
    from llm_compress.report import KV_COLUMNS, KV_EVAL_COLUMNS, build, markdown

    figures = {"method": "kivi", "memory_ratio_mean": 4.855, "memory_ratio_min": 4.722, "bytes_mean": 431.5,
               "bytes_max": 444, "full_bytes_mean": 2095.0, "ppl_ratio": 1.001}
    done = {"kv": {"metrics": figures},
            "evaluate": {"metrics": {"models": {"teacher": {"kv": figures}, "other": {"kv": {"skipped": "gpt2"}}}}}}
    report = build("r", "t", done, [], "completed", None, True)
    for cols in (KV_COLUMNS, KV_EVAL_COLUMNS):
        assert {"memory_ratio_mean", "memory_ratio_min", "bytes_mean", "bytes_max"} <= set(cols)
        assert "memory_ratio" not in cols and "bytes" not in cols  # the old after-the-rows snapshot keys are gone
    assert report["kv_cache"]["memory_ratio_min"] == 4.722 and report["kv_evaluation"][0]["bytes_max"] == 444
    md = markdown(report)
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert "| memory_ratio_mean | memory_ratio_min | bytes_mean | bytes_max |" in header
    assert "| kivi | 4.855 | 4.722 | 431.5 | 444 |" in md
    assert "| teacher | 4.855 | 4.722 | 431.5 | 444 |" in md and "not measured: gpt2" in md
    assert "*more*" not in md


def test_bench_kv_measures_memory_over_the_scored_decode_steps(model, tmp_path):
    """bench/bench_kv.py's measurement takes its memory from the same trace, per row, over the S scored steps: the
    full cache is 1.000 in float32 (the old snapshot said 2.000, run-dtype bytes over 16-bit full), 2-bit KIVI's
    worst step is below its mean; the RESULTS table shows both, and an old run's rows (snapshots) are refused."""
    from types import SimpleNamespace

    from bench import bench_kv

    rows, context = _rows(3, 48, seed=5), 48
    args = SimpleNamespace(score_tokens=2 * R - 1, new_tokens=2, repeats=1)
    full = bench_kv.measure(model, rows, context, args, lambda: DynamicCache(config=model.config), None)
    kivi = bench_kv.measure(model, rows, context, args, lambda: build_cache(
        {"method": "kivi", "bits": [2, 2], "group_size": R, "residual": R}, model), full.pop("_scores"))
    assert full["memory_ratio_mean"] == full["memory_ratio_min"] == 1.0 and full["bits_per_element"] == 16.0
    assert full["bytes_max"] == full16_bytes(model.config, 1, context - 1)  # per row, at the last step
    assert full["run_dtype_bytes_mean"] == 2 * full["bytes_mean"] and full["memory_steps"] == 2 * R - 1
    assert 1 < kivi["memory_ratio_min"] < kivi["memory_ratio_mean"] and kivi["bytes_max"] > kivi["bytes_mean"]
    meta = {"config": {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                              "num_attention_heads", "num_key_value_heads",
                                                              "vocab_size")},
            "versions": {"transformers": "x", "optimum-quanto": None, "hqq": None}, "torch": "x", "threads": 1,
            "machine": "x", "python": "x", "when": "x", "recipe": "r", "train_seq_len": 48, "head_dim": 16,
            "params": 1, "teacher_steps": 1, "bootstrap_eval_ppl": 1, "rows_ppl": 1, "rows": 3, "rows_unigram_ppl": 1,
            "score_tokens": 31, "new_tokens": 2, "repeats": 1, "caches": ["full", "kivi"], "dtypes": ["float32"],
            "skipped": {}}
    results = [{"dtype": "float32", "cache": "full", **full}, {"dtype": "float32", "cache": "kivi", **kivi}]
    table = bench_kv.results_section(meta, results, "cmd")
    assert "| held KiB mean | held KiB max | x smaller mean | x smaller min |" in table
    kib = lambda n: f"{n / 1024:,.1f}"  # noqa: E731
    assert f"| full | 48 | {kib(full['bytes_mean'])} | {kib(full['bytes_max'])} | 1.000 | 1.000 |" in table
    bench_kv.pareto_plot(results, tmp_path / "pareto.png", {**meta, "model": "tiny"})  # x: the mean ratio
    assert (tmp_path / "pareto.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="snapshots after the prompt"):
        bench_kv.over_decoding([{"memory_ratio": 0.2}], "old.json")
