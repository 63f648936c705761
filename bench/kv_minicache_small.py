"""MiniCache's retained share and memory on a small trained model (issue 23 section 1 measurement).

    python bench/kv_minicache_small.py [--steps-only]

Trains (or reuses) the bootstrap teacher of bench/recipes/kvsmall.yaml (bench/recipes/kvlong.yaml with 250 steps of
2 x 512 tokens instead of 600 of 2 x 1,024) through the pipeline's cached bootstrap and data stages, then for each
cache: prefill 448 tokens of 8 held-out rows, 63 teacher-forced decode steps (llm_compress.kv.measure), memory
ratio vs a 16-bit full cache after prefill and mean over the decode steps, retained share, ppl ratio, KL, top-1.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HERE = ROOT  # artifacts/kvsmall, cached like any stage


def main() -> None:
    from transformers import DynamicCache

    from llm_compress.config import load_recipe, parse_recipe
    from llm_compress.data import load_tokens
    from llm_compress.kv import build_cache
    from llm_compress.kv.measure import MemoryTrace, compare, stepwise_logits
    from llm_compress.kv.minicache import merge_states, retention_mask
    from llm_compress.modeling import load_causal_lm
    from llm_compress.pipeline import make_call, run_call

    torch.set_num_threads(1)
    base = load_recipe(ROOT / "bench" / "recipes" / "kvsmall.yaml").model_dump(mode="json")
    base["runtime"]["progress"] = False
    base["runtime"]["threads"] = 1
    recipe = parse_recipe(base)
    done: dict = {}
    t0 = time.perf_counter()
    for stage in ("bootstrap", "data"):
        done[stage] = run_call(recipe, make_call(recipe, stage, done), HERE / "artifacts" / "kvsmall",
                               HERE / "artifacts")
    print(f"stages {time.perf_counter() - t0:.0f} s; bootstrap metrics {done['bootstrap'].get('metrics')}",
          flush=True)
    out = lambda s, o: done[s]["outputs"][o]["path"]  # noqa: E731
    model = load_causal_lm(out("bootstrap", "teacher"), what="teacher").eval()
    rows = load_tokens(Path(out("data", "eval")))[:8, :512]
    context, score = rows.shape[1], 63
    prefill = context - 1 - score

    # adjacent layers' angular distance on this model (4 rows, whole context)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=rows[:4], past_key_values=cache, use_cache=True)
    q = torch.tensor([0.1, 0.5, 0.9])
    distances = []
    for i in range(len(cache.layers) - 1):
        for name, a, b in (("K", cache.layers[i].keys, cache.layers[i + 1].keys),
                           ("V", cache.layers[i].values, cache.layers[i + 1].values)):
            d = merge_states(a, b)[3]
            lo, hi = d.amin(-1), d.amax(-1)
            distances.append({"layers": [i, i + 1], "states": name,
                              "d_quantiles": [round(float(x), 3) for x in torch.quantile(d.flatten(), q)],
                              "cosine_median": round(float(torch.quantile(torch.cos(d * math.pi).flatten(), 0.5)), 3),
                              "retained_default": round(float(retention_mask(d, lo, hi, 0.05, 0.5).float().mean()), 4),
                              "retained_alone": round(float(retention_mask(d, lo, hi, 0.05, 1.0).float().mean()), 4)})
    for row in distances:
        print(row, flush=True)

    specs = {
        "full": None,
        "kivi k4v4 g32 r32": {"method": "kivi", "bits": [4, 4], "residual": 32},
        "minicache k16v16 (defaults)": {"method": "minicache"},
        "minicache k16v16 max_distance 1 (paper rule alone)": {"method": "minicache", "max_distance": 1.0},
        "minicache k16v16 gamma 1 (lossless)": {"method": "minicache", "gamma": 1.0},
        "minicache k4v4 r32": {"method": "minicache", "bits": [4, 4], "residual": 32},
        "minicache k4v4 r32 max_distance 1": {"method": "minicache", "bits": [4, 4], "residual": 32,
                                              "max_distance": 1.0},
        "minicache k4v4 r32 start 2": {"method": "minicache", "bits": [4, 4], "residual": 32, "start_layer": 2},
    }
    results, ref = [], None
    for label, spec in specs.items():
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config) if spec is None else build_cache(spec, model)
        trace = MemoryTrace(model.config, len(rows))
        with torch.no_grad():
            logits = stepwise_logits(model, rows, prefill, cache, on_step=trace)
        scored, target = logits[:, 1:], rows[:, prefill + 1:]
        r = {"cache": label, "spec": spec, **{k: (round(v, 4) if isinstance(v, float) else v)
                                             for k, v in trace.summary().items()}}
        if spec is not None:
            r["retained_share"] = round(cache.retained_fraction(), 4) if hasattr(cache, "retained_fraction") else None
        if ref is None:
            ref = scored
        else:
            c = compare(scored, ref, target)
            r.update(ppl_ratio=round(c["ppl_ratio"], 4), kl=round(c["kl_to_full"], 5),
                     top1=round(c["top1_agreement"], 4))
        r["seconds"] = round(time.perf_counter() - t0, 1)
        print(r, flush=True)
        results.append(r)
    (ROOT / "bench" / "kv_minicache_small.json").write_text(json.dumps({"distances": distances, "caches": results,
                                                   "bootstrap": done["bootstrap"].get("metrics")}, indent=1))


if __name__ == "__main__":
    main()
