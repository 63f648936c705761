"""What ships after quantization: each export of one GPTQ-quantized bench model against the quantized model itself.

    python bench/bench_packed.py [--model demo|wide] [--method gptq|rtn] [--group 32] [--rows 32] [--threads 1]
                                 [--genai PATH]

The bench model's full-precision teacher (see bench_quant.py; same pinned world) is quantized by the quantize stage
(W4A16, symmetric, groups of ``--group``, 128 calibration rows), then exported through the export stage in every
format that can hold a W4A16 model. Each export is reloaded from disk and compared with the quantized model on
``--rows`` held-out rows (their logits: max |diff|, KL(quantized || export) per token, top-1 agreement). Two
re-rounded exports are scored the same way, to show what the checks must tell apart:
- "onnx-int4 re-rounded": the old path, onnxruntime's MatMulNBits quantizer (RTN, blocks of 32) run over the
  dequantized weights (the model folder without its codes);
- with ``--genai PATH`` (a folder holding onnxruntime-genai 0.15.2, e.g. ``pip install --target PATH --no-deps
  onnxruntime-genai==0.15.2``): its model builder's int4 (``-p int4 -e cpu``, blocks of 32, accuracy level 4 and
  lm_head int4 by default; run also with ``accuracy_level=1`` and lm_head kept float) over the same dequantized
  folder: the int4 ONNX a user gets from the builder.
Sizes: bytes of each folder; for compressed-tensors also the quantized layers' packed bytes vs float32. Speed only
for real low-bit kernels: the ONNX graphs (forward over [1, 128] tokens, median of 20, and tokens/s of that
forward); compressed-tensors on CPU unpacks to dense float weights in transformers, so its speed is a float model's
and is not reported.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_export import timed  # noqa: E402
from bench.bench_quant import RECIPES, pinned_base, prepare  # noqa: E402

FORMATS = ["safetensors", "compressed-tensors", "onnx-int4", "bnb-nf4"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(RECIPES), default="demo")
    ap.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--rows", type=int, default=32, help="held-out check rows (of the recipe's seq_len tokens)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--genai", default=None, help="folder holding onnxruntime-genai 0.15.2 (pip --target)")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from llm_compress.config import parse_recipe

    from llm_compress.export_support import ExportConfig
    from llm_compress.data import load_tokens
    from llm_compress.export import compare_logits, run_export
    from llm_compress.modeling import load_causal_lm
    from llm_compress.quantize.apply import run as quantize
    from llm_compress.quantize.codes import CODES_FILE

    torch.set_num_threads(args.threads)
    base = pinned_base(args.model)  # the pinned world of bench_quant.py
    base["quantize"]["scheme"] = {"method": args.method, "setting": "W4A16", "group_size": args.group,
                                  **({"calibration": {"samples": 128}} if args.method == "gptq" else {})}
    base["export"]["formats"] = FORMATS
    recipe = parse_recipe(base)
    root = Path(args.artifacts).resolve()
    done = prepare(recipe, root, f"bench-packed-{args.model}")
    out = lambda s, o: Path(done[s]["outputs"][o]["path"])  # noqa: E731
    ids = load_tokens(out("data", "eval"))[: args.rows].long()  # [rows, T]

    work = Path(tempfile.mkdtemp(prefix="bench-packed-"))
    t = time.perf_counter()
    quantize(recipe.quantize, recipe.models, recipe.runtime, model_dir=out("bootstrap", "teacher"),
             out_dir=work / "q", calib_path=out("data", "train"))
    quant_s = time.perf_counter() - t
    qdir = work / "q" / "model"
    source = load_causal_lm(str(qdir))
    fp = load_causal_lm(str(out("bootstrap", "teacher")))
    float32_weights = sum(f.stat().st_size for f in qdir.glob("model*.safetensors"))

    @torch.no_grad()
    def logits(model, ort: bool = False) -> torch.Tensor:
        kw = {"attention_mask": torch.ones_like(ids[:8]), "use_cache": False} if ort else {}
        return torch.cat([model(input_ids=ids[i:i + 8], **kw).logits.float() for i in range(0, len(ids), 8)])

    def ppl(lg: torch.Tensor) -> float:
        nll = torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return math.exp(nll.item())

    ref = logits(source)
    rows = [{"format": "float teacher (before quantization)", **_round(compare_logits(ref, logits(fp))),
             "ppl": round(ppl(logits(fp)), 3)},
            {"format": f"quantized model ({args.method} W4A16 g{args.group}, float32 on disk)",
             "bytes": float32_weights, "ppl": round(ppl(ref), 3)}]
    res = run_export(ExportConfig(formats=FORMATS), qdir, work / "exports", check_ids=ids, progress=False)
    bare = work / "no-codes"
    shutil.copytree(qdir, bare)
    (bare / CODES_FILE).unlink()
    (bare / "quantization.json").unlink()
    rerounded = run_export(ExportConfig(formats=["onnx-int4"]), bare, work / "rerounded", check_ids=ids,
                           progress=False)
    speed = {}
    one = ids[:1, :128]

    def ort_speed(folder: Path) -> dict:
        from optimum.onnxruntime import ORTModelForCausalLM

        m = ORTModelForCausalLM.from_pretrained(str(folder), use_cache=True)
        s = timed(lambda: m(input_ids=one, attention_mask=torch.ones_like(one), use_cache=False), 20, 3)
        return {"forward_ms": round(1000 * s, 2), "tokens_per_s": round(one.numel() / s)}

    with torch.no_grad():
        s = timed(lambda: source(input_ids=one), 20, 3)
    speed["eager"] = {"forward_ms": round(1000 * s, 2), "tokens_per_s": round(one.numel() / s)}
    for fmt, m in [*((f, res.metrics[f]) for f in FORMATS), ("onnx-int4 re-rounded", rerounded.metrics["onnx-int4"])]:
        row = {"format": fmt, "bytes": m["bytes"], **_round(m), "passed": m["passed"],
               "from_codes": m.get("from_codes", False), "weights": m.get("weights", "")}
        for k in ("quantized_layer_bytes", "quantized_layer_float32_bytes", "quantized_layer_size_ratio"):
            if k in m:
                row[k] = m[k]
        if fmt.startswith("onnx"):
            folder = work / ("rerounded/onnx-int4" if "re-rounded" in fmt else f"exports/{fmt}")
            row.update(ort_speed(folder))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.genai:
        rows += genai_rows(args.genai, bare, work, ids, ref, one)
    meta = {"model": args.model, "method": args.method, "group_size": args.group, "params": sum(
        p.numel() for p in source.parameters()), "check_tokens": int(ids.numel()),
        "quantize_seconds": round(quant_s, 1), "eager_float32": speed["eager"], "machine": platform.platform(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(args.out or ROOT / "bench" / f"packed_{args.model}.json")
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}")


def _round(m: dict) -> dict:
    return {"max_abs_diff": float(f"{m['max_abs_diff']:.3g}"), "kl": float(f"{m['kl']:.3g}"),
            "top1_agreement": round(m["top1_agreement"], 4)}


_GENAI = r"""
import json, sys, time, statistics
import numpy as np, onnxruntime as ort, torch
folder, ids_path, out_path = sys.argv[1:4]
ids = torch.load(ids_path).numpy()
sess = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
names = {i.name: i for i in sess.get_inputs()}
head = json.load(open(f"{folder}/genai_config.json"))["model"]["decoder"]["head_size"]
def feed(x):
    b, t = x.shape
    f = {"input_ids": x.astype(np.int64), "attention_mask": np.ones_like(x, dtype=np.int64)}
    for n, i in names.items():
        if n.startswith("past_key_values"):  # empty past: [batch, kv heads, 0, head size]
            dims = {"batch_size": b, "past_sequence_length": 0, "kv_cache_dim": head}
            shape = [dims[d] if isinstance(d, str) else d for d in i.shape]
            f[n] = np.zeros(shape, dtype=np.float32)
    if "position_ids" in names:
        f["position_ids"] = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
    return f
logits = np.concatenate([sess.run(["logits"], feed(ids[i:i + 8]))[0] for i in range(0, len(ids), 8)])
np.save(out_path, logits.astype(np.float32))
one = ids[:1, :128]
ts = []
for k in range(23):
    t = time.perf_counter(); sess.run(["logits"], feed(one)); ts.append(time.perf_counter() - t)
s = statistics.median(ts[3:])
print(json.dumps({"forward_ms": round(1000 * s, 2), "tokens_per_s": round(one.size / s)}))
"""


def genai_rows(genai: str, dense: Path, work: Path, ids, ref, one) -> list[dict]:
    """onnxruntime-genai's builder (int4, CPU) over the dequantized model folder, scored like the exports."""
    import os

    import numpy as np
    import torch

    from llm_compress.export import compare_logits
    from llm_compress.io import path_size

    env = {**os.environ, "PYTHONPATH": f"{genai}:{os.environ.get('PYTHONPATH', '')}"}
    torch.save(ids, work / "ids.pt")
    rows = []
    for label, extra in (("onnxruntime-genai int4 (builder defaults)", []),
                         ("onnxruntime-genai int4 (accuracy_level=1, lm_head float)",
                          ["--extra_options", "accuracy_level=1", "nodes_to_exclude=/lm_head/MatMul"])):
        dst = work / f"genai-{len(rows)}"
        t = time.perf_counter()
        b = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(dense), "-o",
                            str(dst), "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache"), *extra],
                           env=env, capture_output=True, text=True, timeout=1800)
        if b.returncode != 0:
            rows.append({"format": label, "error": (b.stderr or b.stdout)[-800:]})
            continue
        build_s = time.perf_counter() - t
        r = subprocess.run([sys.executable, "-c", _GENAI, str(dst), str(work / "ids.pt"), str(work / "g.npy")],
                           env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            rows.append({"format": label, "error": r.stderr[-800:]})
            continue
        lg = torch.from_numpy(np.load(work / "g.npy"))
        onnx_bytes = sum(f.stat().st_size for f in dst.iterdir() if ".onnx" in f.name)
        rows.append({"format": label, "bytes": path_size(dst), "onnx_bytes": onnx_bytes,
                     **_round(compare_logits(ref, lg)), "build_seconds": round(build_s, 1),
                     **json.loads(r.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
