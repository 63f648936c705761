"""How alike adjacent layers' KV states and neighbouring tokens' keys are on a model: what MiniCache (cross-layer
merging) and KVMerger (merging neighbouring tokens) rely on.

    python bench/kv_layer_distance.py --model DIR --eval EVAL.safetensors [--rows 4] [--context 1024]
        [--out bench/kv_layer_distance.json]

One forward pass of ``--rows`` held-out rows of ``--context`` tokens through a full ``DynamicCache``, then, per
adjacent layer pair (l, l + 1) and for K and V: quantiles of MiniCache's angular distance d = angle / pi between the
two layers' states of each token and head (``llm_compress.kv.minicache.merge_states``; 0 = same direction, 0.5 =
orthogonal), and the share of tokens MiniCache's retention rule keeps unmerged at several gamma over the whole
context's range (``llm_compress.kv.minicache.retention_mask``: the top gamma of the range, with its 0.5 guard and
without it, "alone"); per layer: quantiles of the cosine similarity of consecutive tokens' keys (KVMerger merges
neighbours at or above its threshold, 0.8 by default). For the kvlong bench model: ``--model
artifacts/bench-kv/bootstrap/teacher --eval artifacts/bench-kv/data/eval.safetensors`` (made by
``bench/bench_kv.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

QUANTILES = (0.1, 0.5, 0.9)
GAMMAS = (0.05, 0.2, 0.4, 0.6)


def main() -> None:
    from transformers import DynamicCache

    from llm_compress.data import load_tokens
    from llm_compress.kv.minicache import merge_states, retention_mask
    from llm_compress.modeling import load_causal_lm

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "kv_layer_distance.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_causal_lm(args.model)
    rows = load_tokens(args.eval)[: args.rows, : args.context]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=rows, past_key_values=cache, use_cache=True)
    q = torch.tensor(QUANTILES)
    pairs, neighbours = [], []
    for i, layer in enumerate(cache.layers):
        sim = F.cosine_similarity(layer.keys[..., 1:, :].float(), layer.keys[..., :-1, :].float(), dim=-1)
        neighbours.append({"layer": i, "key_cosine_quantiles": [round(float(x), 3) for x in torch.quantile(sim, q)],
                           "share_at_or_above_0.8": round(float((sim >= 0.8).float().mean()), 4)})
        if i + 1 == len(cache.layers):
            break
        nxt = cache.layers[i + 1]
        for name, a, b in (("K", layer.keys, nxt.keys), ("V", layer.values, nxt.values)):
            d = merge_states(a, b)[3]  # [B, H, T]
            lo, hi = d.amin(-1), d.amax(-1)

            def share(g: float, guard: float) -> float:
                return round(float(retention_mask(d, lo, hi, g, guard).float().mean()), 4)

            pairs.append({"layers": [i, i + 1], "states": name,
                          "distance_quantiles": [round(float(x), 3) for x in torch.quantile(d.flatten(), q)],
                          "retained_share": {str(g): share(g, 0.5) for g in GAMMAS},
                          "retained_share_alone": {str(g): share(g, 1.0) for g in GAMMAS}})
    out = {"model": args.model, "rows": args.rows, "context": args.context, "quantiles": QUANTILES,
           "adjacent_layers": pairs, "neighbour_keys": neighbours}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for p in pairs:
        print(p)
    for n in neighbours:
        print(n)


if __name__ == "__main__":
    main()
