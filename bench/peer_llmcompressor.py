"""llm-compressor's GPTQ on a float checkpoint and fixed calibration token rows (run in the peer virtualenv).

    /work/peers/llmc/bin/python bench/peer_llmcompressor.py --model-dir DIR --rows ROWS.safetensors --out OUT
        [--bits 4] [--group-size 128] [--damp 0.01] [--actorder none|static] [--batch-size 8] [--threads 1]

Started by bench/bench_gptq_peer.py (the main virtualenv cannot import llmcompressor 0.14: it pins transformers 5).
The rows (``input_ids`` [n, T] in ROWS) go to ``oneshot`` as a datasets.Dataset with an ``input_ids`` column, which
it uses without tokenizing, unshuffled, all n of them, at their length T. Recipe: one GPTQModifier, int weights,
symmetric, group strategy, every Linear but lm_head, dampening_frac = --damp, actorder as given (``none`` turns off
the library's default static order), block_size 128.
Timed separately (wall seconds): imports, model + tokenizer load (+ building the dataset), the ``oneshot`` call
alone (no output_dir, so nothing is saved inside it), the compressed save. Writes OUT/checkpoint (pack-quantized
compressed-tensors, as ``save_pretrained(save_compressed=True)`` makes it), OUT/fakequant.safetensors (the dense
fake-quantized Linear weights oneshot left in the model, to check the reloaded checkpoint against) and
OUT/peer.json (timings, versions, per-layer ||W - Q|| / ||W||, the quantization config written).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--rows", required=True, help="safetensors file with input_ids [n, T]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--actorder", choices=["none", "static"], default="none")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    import compressed_tensors
    import transformers
    from datasets import Dataset
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rows = load_file(args.rows)["input_ids"].long()  # [n, T]
    ds = Dataset.from_dict({"input_ids": rows.tolist()})
    load_s = time.perf_counter() - t0

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    orig = {n: m.weight.detach().clone() for n, m in linears.items()}
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": args.group_size}}},
        ignore=["lm_head"], dampening_frac=args.damp, block_size=args.block_size,
        actorder=None if args.actorder == "none" else "static")

    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(rows),
            max_seq_length=rows.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
    oneshot_s = time.perf_counter() - t0

    rel = {}
    fq = {}
    for n, m in linears.items():
        w = m.weight.detach().float()
        rel[n] = round(((orig[n].float() - w).norm() / orig[n].float().norm().clamp_min(1e-12)).item(), 6)
        fq[n + ".weight"] = m.weight.detach().clone().contiguous()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(fq, str(out / "fakequant.safetensors"))

    t0 = time.perf_counter()
    model.save_pretrained(str(out / "checkpoint"), save_compressed=True)
    tok.save_pretrained(str(out / "checkpoint"))
    save_s = time.perf_counter() - t0

    qcfg = json.loads((out / "checkpoint" / "config.json").read_text()).get("quantization_config")
    versions = {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
    res = {"versions": versions,
           "threads": torch.get_num_threads(), "samples": len(rows), "seq_len": int(rows.shape[1]),
           "batch_size": args.batch_size, "damp": args.damp, "actorder": args.actorder, "bits": args.bits,
           "group_size": args.group_size, "block_size": args.block_size,
           "seconds": {"import": round(import_s, 2), "load": round(load_s, 2), "oneshot": round(oneshot_s, 2),
                       "save": round(save_s, 2)},
           "layers": rel, "mean_rel_error": round(sum(rel.values()) / len(rel), 6), "quantization_config": qcfg}
    (out / "peer.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("versions", "seconds", "mean_rel_error")}))


if __name__ == "__main__":
    main()
