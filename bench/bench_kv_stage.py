"""The project's KV caches measured as the KV stage measures them (``stages.kv.measure``), on a trained model.

    python bench/bench_kv_stage.py --model DIR --eval EVAL.safetensors [--rows 16] [--dtype bfloat16]
        [--contexts 256 512 1024] [--scored 128] [--out bench/kv_stage_kvlong.json]

For each context C and cache spec: the first C tokens of ``--rows`` held-out rows; the first C - scored tokens are the
prompt (one pass through the cache), the last ``scored`` tokens are decoded one step at a time through it and scored
against the same procedure on the full cache (perplexity ratio, KL, top-1); memory is what the cache holds after the
whole rows (``KVCache.nbytes``) against a 16-bit full cache of the same tokens (``full_bytes``). The model is the
kvlong bench model (``bench/recipes/kvlong.yaml``, trained by ``bench/bench_kv.py``'s bootstrap), given by path so
that this script never retrains it. Prints one JSON line per (context, spec) and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SPECS = [
    {"method": "kivi", "bits": [16, 16], "group_size": 32, "residual": 128},  # compression off: the reference
    {"method": "kivi", "bits": [4, 4], "group_size": 32, "residual": 128},
    {"method": "kivi", "bits": [2, 2], "group_size": 32, "residual": 128},
    {"method": "kivi", "bits": [2, 2], "group_size": 32, "residual": 32},
    {"method": "minicache", "bits": [2, 2], "group_size": 32, "residual": 32},
    {"method": "minicache", "bits": [4, 4], "group_size": 32, "residual": 32},
    {"method": "minicache", "bits": [16, 16]},
    {"method": "sink", "sinks": 4, "window": 124},
]


def main() -> None:
    from stages.data import load_tokens
    from stages.kv.measure import measure
    from stages.modeling import load_causal_lm

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--scored", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "kv_stage_kvlong.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_causal_lm(args.model, dtype=args.dtype)
    rows = load_tokens(args.eval)[: args.rows]
    results = []
    for context in args.contexts:
        for spec in SPECS:
            t0 = time.perf_counter()
            r = measure(model, rows[:, :context], spec, prefill=context - args.scored)
            results.append({"spec": spec, "dtype": args.dtype, "seconds": round(time.perf_counter() - t0, 1), **r})
            print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
