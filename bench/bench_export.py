"""Size on disk and latency of every export format against PyTorch eager, on the same model and tokens.

    python bench/bench_export.py [--model demo|wide] [--out bench/export_<model>.json]

Takes the full-precision teacher of a bench model (see bench_quant.py), exports it in every format through the
export stage (each reloaded from disk and checked against the source), then times each reloaded artifact on the
same held-out rows: one forward pass over [1, 128] tokens (median of 20, after 3 warm-ups) and greedy generation of
32 tokens with the KV cache (ms per new token, median of 5). PyTorch eager (float32) is the reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_quant import RECIPES  # noqa: E402


def timed(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(RECIPES), default="demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from llm_compress.config import load_recipe

    from llm_compress.export_support import ExportConfig
    from llm_compress.data import load_tokens
    from llm_compress.evaluate import latency_per_token
    from llm_compress.export import FORMATS, run_export
    from llm_compress.modeling import load_causal_lm
    from llm_compress.pipeline import make_call, run_call

    torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPES[args.model])
    root = Path(args.artifacts).resolve()
    done: dict = {}
    for stage in ("bootstrap", "select", "data"):
        if stage == "select" and not recipe.select.enabled:
            continue
        done[stage] = run_call(recipe, make_call(recipe, stage, done), root / f"bench-export-{args.model}", root)
    teacher_dir = Path(done["bootstrap"]["outputs"]["teacher"]["path"])
    ids = load_tokens(Path(done["data"]["outputs"]["eval"]["path"]))[:1].long()  # [1, 128]
    prompt = ids[:, :16]

    def measure(model, is_ort: bool) -> dict:
        kw = {"attention_mask": torch.ones_like(ids), "use_cache": False} if is_ort else {}

        @torch.no_grad()
        def fwd():
            model(input_ids=ids, **kw)

        with torch.no_grad():  # generation timed as the evaluate stage times it (1 warm-up, median of 5)
            per_token = latency_per_token(model, prompt, 32, 5)
        return {"forward_ms": round(1000 * timed(fwd, 20, 3), 2), "generate_ms_per_token": round(per_token, 2)}

    rows = []
    eager = load_causal_lm(str(teacher_dir))
    base = measure(eager, False)
    weights = sum(f.stat().st_size for f in teacher_dir.glob("*.safetensors"))
    rows.append({"format": "pytorch eager (float32)", "bytes": weights, **base})
    with tempfile.TemporaryDirectory() as tmp:
        formats = [f for f in FORMATS if f != "compressed-tensors"]  # that one packs codes: bench_packed.py
        res = run_export(ExportConfig(formats=formats), teacher_dir, Path(tmp), progress=False)
        for fmt in formats:
            d = Path(tmp) / fmt
            m = res.metrics[fmt]
            if fmt.startswith("onnx"):
                from optimum.onnxruntime import ORTModelForCausalLM

                model, ort = ORTModelForCausalLM.from_pretrained(str(d), use_cache=True), True
            elif fmt.startswith("bnb"):
                model, ort = AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", dtype=torch.float32,
                                                                  use_safetensors=True).eval(), False
            else:
                model, ort = load_causal_lm(str(d)), False
            t = measure(model, ort)
            rows.append({"format": fmt, "bytes": m["bytes"], **t,
                         "forward_vs_eager": round(t["forward_ms"] / base["forward_ms"], 3),
                         "generate_vs_eager": round(t["generate_ms_per_token"] / base["generate_ms_per_token"], 3),
                         "max_abs_diff": m["max_abs_diff"], "top1_agreement": m["top1_agreement"],
                         **({"quantized_ops": m["quantized_ops"]} if "quantized_ops" in m else {})})
            print(json.dumps(rows[-1]), flush=True)
            del model
    meta = {"model": args.model, "params": sum(p.numel() for p in eager.parameters()), "tokens": list(ids.shape),
            "machine": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(args.out or ROOT / "bench" / f"export_{args.model}.json")
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
