"""CSKV on a small trained model: PCA vs weight-only SVD / ASVD bases, key vs value ranks, the exact window, against
2-bit KIVI (issue: KV caches that do what their papers do, section 4).

    python bench/kv_minicache_small.py     # first: trains bench/recipes/kvsmall.yaml's teacher into artifacts/kvsmall
    python bench/kv_cskv_small.py          # about a minute on one thread; prints a markdown table

Bases fitted on 16 training rows of 512 tokens; scored on 4 held-out rows of 512 tokens (prompt 448, 63
teacher-forced decode steps, llm_compress.kv.measure); memory = mean over the decode steps of a 16-bit full cache's
bytes / the cache's (the bases are model weights, not counted).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import DynamicCache

from llm_compress.data import load_tokens
from llm_compress.kv import build_cache
from llm_compress.kv.cskv import CSKVCache, fit_factors
from llm_compress.kv.measure import MemoryTrace, compare, stepwise_logits
from llm_compress.modeling import load_causal_lm

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "artifacts" / "kvsmall"  # bench/kv_minicache_small.py's run of bench/recipes/kvsmall.yaml
PREFILL = 448


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if not (RUN / "bootstrap" / "teacher").is_dir():
        raise SystemExit(f"{RUN} holds no trained teacher: run python bench/kv_minicache_small.py first")
    model = load_causal_lm(str(RUN / "bootstrap" / "teacher"), dtype="float32", device="cpu")
    calib = load_tokens(RUN / "data" / "train.safetensors")[:16].long()
    rows = load_tokens(RUN / "data" / "eval.safetensors")[:4].long()
    full = stepwise_logits(model, rows, PREFILL, DynamicCache(config=model.config))
    layers, d = model.config.num_hidden_layers, model.config.num_key_value_heads * model.config.head_dim
    fits: dict = {}

    def cskv(k_rank: int, v_rank: int, init: str = "pca", window: int = 32) -> CSKVCache:
        if (k_rank, v_rank, init) not in fits:
            fits[k_rank, v_rank, init] = fit_factors(model, calib, k_rank, v_rank, init)
        cache = CSKVCache(layers, k_rank=k_rank, v_rank=v_rank, window=window, init=init)
        return cache.attach(model, fits[k_rank, v_rank, init])

    def row(name: str, cache) -> None:
        trace, t0 = MemoryTrace(model.config, rows.shape[0]), time.time()
        got = stepwise_logits(model, rows, PREFILL, cache, on_step=trace)
        q, s = compare(got, full, rows[:, PREFILL:]), trace.summary()
        print(f"| {name} | {s['memory_ratio_mean']:.2f} | {q['ppl_ratio']:.4f} | {q['kl_to_full']:.4f} | "
              f"{q['top1_agreement']:.3f} | {time.time() - t0:.0f} s |", flush=True)

    half, fifth = d // 2, round(0.2 * d)
    print("| cache | x smaller (mean) | ppl ratio | KL to full | top-1 | time |\n|---|---|---|---|---|---|")
    row(f"cskv pca full rank {d}/{d}, w32", cskv(d, d))
    for share, r in (("50%", half), ("20%", fifth)):
        for init in ("pca", "svd", "asvd"):
            row(f"cskv {init} {share} ({r}/{r}), w32", cskv(r, r, init))
    for k, v in ((d // 8, d - d // 8), (d - d // 8, d // 8), (d // 4, d - d // 4), (d - d // 4, d // 4)):
        row(f"cskv pca K {k} / V {v}, w32", cskv(k, v))
    for w in (0, 128):
        row(f"cskv pca 20% ({fifth}/{fifth}), w{w}", cskv(fifth, fifth, window=w))
    row("kivi 2-bit g32 r32", build_cache({"method": "kivi", "bits": [2, 2], "group_size": 32, "residual": 32}, model))


if __name__ == "__main__":
    main()
