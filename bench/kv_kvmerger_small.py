"""Small KVMerger measurements for the notes (tiny random Llama, CPU, one thread): run from /work/main with
    . .venv/bin/activate && python bench/kv_kvmerger_small.py
Rows: 4 x 96 tokens made of 16 random tokens each repeated 6 times (so neighbouring keys are alike); prompt 64,
then 31 teacher-forced decode steps; window 8, interval 8, sinks 4. KL / top-1 against DynamicCache."""
import inspect
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import llm_compress.kv.kvmerger as km
from llm_compress.kv import build_cache
from llm_compress.kv.measure import compare, stepwise_logits

torch.set_num_threads(1)
torch.manual_seed(3)
cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, attn_implementation="sdpa", initializer_range=0.1)
m = LlamaForCausalLM(cfg).eval()
ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(5)).repeat_interleave(6, dim=1)
plain = torch.randint(3, 96, (4, 96), generator=torch.Generator().manual_seed(5))
full = stepwise_logits(m, ids, 64, DynamicCache())
full_plain = stepwise_logits(m, plain, 64, DynamicCache())
scaled = km.merge_sets
ns = dict(vars(km))
exec(inspect.getsource(km.merge_sets).replace("(members * set_sum(g * v)", "(set_sum(g * v)"), ns)
unscaled = ns["merge_sets"]
real_attention = km.KVMergerLayer._attention


def random_attention(self, keys, valid, real):  # the pivot's scores replaced by noise: a random pivot
    return torch.rand(keys.shape[:3])


def run(label, spec, rows=ids, ref=full, merge=scaled, attention=real_attention):
    km.merge_sets, km.KVMergerLayer._attention = merge, attention
    try:
        cache = build_cache({"method": "kvmerger", "window": 8, "interval": 8, **spec}, m)
        t = time.time()
        r = compare(stepwise_logits(m, rows, 64, cache), ref, rows[:, 64:])
        secs = time.time() - t
    finally:
        km.merge_sets, km.KVMergerLayer._attention = scaled, real_attention
    held = [layer.lengths.float() / (95 - 0) for layer in cache.layers]  # share of the 95 tokens seen, per (row, head)
    per_layer = " ".join(f"{float(h.mean()):.2f}" for h in held)
    spread = max(float(h.max() - h.min()) for h in held)
    print(f"| {label} | {r['kl_to_full']:.4f} | {r['top1_agreement']:.3f} | {r['ppl_ratio']:.3f} | {per_layer} | "
          f"{spread:.2f} | {cache.memory_ratio():.2f} | {secs:.2f} |")


print("| setting | KL(full‖cache) | top-1 | ppl ratio | held share per layer | widest head spread | "
      "memory ratio after | s |")
print("|---|---|---|---|---|---|---|---|")
run("threshold 1.0 (nothing merges)", {"threshold": 1.0})
for thr in (0.9, 0.75, 0.5):
    run(f"threshold {thr}, attention pivot, |S| values", {"threshold": thr})
run("threshold 0.75, mean-key pivot", {"threshold": 0.75, "pivot": "mean_key"})
run("threshold 0.75, random pivot", {"threshold": 0.75}, attention=random_attention)
run("threshold 0.75, values without |S|", {"threshold": 0.75}, merge=unscaled)
run("threshold 0.5, budget 0.7 (cap)", {"threshold": 0.5, "budget": 0.7})
run("broken: threshold -1 (merges everything)", {"threshold": -1.0})
run("threshold 0.75 on plain random tokens", {"threshold": 0.75}, rows=plain, ref=full_plain)
