"""Which divergence distils the demo student best? Same student, same data, same token budget.

    python bench/bench_distill.py [--steps 150] [--out bench/distill_divergences.json]

Runs the demo recipe's bootstrap, select and data stages (reused from ``artifacts/`` when the demo has
run), then trains the demo's 2-layer student (every other teacher layer, teacher init) once per
divergence for the demo's steps x batch x seq_len tokens: cross-entropy only (``ce_weight: 1``), each of
the 11 divergences with its default parameters (``ce_weight: 0``), and three trainer variants of forward
KL: on-policy share 0.5 (GKD), cached top-32 teacher, and the demo's own 0.9 KL + 0.1 CE mix. Each student
is scored on the same held-out tokens (up to 16,384) against the teacher: perplexity, KL(teacher || student)
per token and top-1 agreement. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_quant import pinned_base, prepare  # noqa: E402

VARIANTS: list[tuple[str, dict]] = [
    ("ce only", {"ce_weight": 1.0}),
    ("forward_kl", {"divergence": "forward_kl"}),
    ("reverse_kl", {"divergence": "reverse_kl"}),
    ("js", {"divergence": "js"}),
    ("gjsd (beta 0.5)", {"divergence": "gjsd"}),
    ("tvd", {"divergence": "tvd"}),
    ("skew_kl (0.1)", {"divergence": "skew_kl"}),
    ("skew_reverse_kl (0.1)", {"divergence": "skew_reverse_kl"}),
    ("akl (mu 0.5)", {"divergence": "akl"}),
    ("alpha_divergence (0.5)", {"divergence": "alpha_divergence"}),
    ("bdkd (tau 1)", {"divergence": "bdkd"}),
    # SinKD's cost grows with the square of the tokens per batch (three N x N x V L1 cost matrices and their
    # backward per step: 150 steps at N = 2,048 ran > 40 min here), so it gets the same tokens as 600 x 4 rows.
    ("sinkhorn (600 steps x 4 rows)", {"divergence": "sinkhorn", "batch_size": 4, "steps": 600, "eval_every": 200}),
    ("forward_kl + 0.1 CE (demo)", {"divergence": "forward_kl", "ce_weight": 0.1}),
    ("forward_kl, on-policy 0.5", {"divergence": "forward_kl", "on_policy": {"share": 0.5, "prompt_tokens": 32}}),
    ("forward_kl, cached top-32", {"divergence": "forward_kl", "teacher": {"source": "cached_topk", "topk": 32}}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="distillation steps (default: the demo's)")
    ap.add_argument("--only", nargs="*", help="run only these variant labels")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "distill_divergences.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from llm_compress import evaluate
    from llm_compress.distill import apply as distill
    from llm_compress.config import parse_recipe
    from llm_compress.data import load_tokens
    from llm_compress.modeling import load_causal_lm
    from llm_compress.pipeline import make_call
    from llm_compress.pipeline.distill import teacher_topk_key

    torch.set_num_threads(args.threads)
    base = pinned_base("demo")  # the world these figures were measured in (bench/RESULTS.md)
    if args.steps:
        base["distill"]["steps"] = args.steps
    root = Path(args.artifacts).resolve()
    recipe = parse_recipe(base)
    done = prepare(recipe, root, "bench-distill")  # content-keyed: reused from an earlier demo run
    out = lambda s, o: done[s]["outputs"][o]["path"]  # noqa: E731
    teacher_ref, tok_ref = out("bootstrap", "teacher"), out("bootstrap", "tokenizer")
    eval_ids = load_tokens(Path(out("data", "eval")))
    eval_ids = eval_ids[: max(1, 16384 // eval_ids.shape[1])]
    teacher = load_causal_lm(teacher_ref, what="teacher")
    results = []
    for label, change in VARIANTS:
        if args.only and label not in args.only:
            continue
        d = json.loads(json.dumps(base))
        d["distill"].update({"ce_weight": 0.0, "checkpoint_every": 0, **change})
        r = parse_recipe(d)
        call = make_call(r, "distill", done)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = distill.run(r.distill, r.models, r.runtime, teacher_ref=teacher_ref, student_ref="derive",
                              tokenizer_ref=tok_ref, train_path=Path(out("data", "train")),
                              eval_path=Path(out("data", "eval")), out_dir=Path(tmp),
                              teacher_cache_dir=root / ".cache" / "teacher-topk" / teacher_topk_key(r, call))
            secs = time.perf_counter() - t0
            student = load_causal_lm(str(Path(tmp) / "model"), what="student")
            with torch.no_grad():
                s = evaluate.score({"student": student, "teacher": teacher}, teacher, eval_ids, 8,
                                   torch.device("cpu"), progress=False)
        row = {"variant": label, "student_ppl": round(s["student"]["ppl"], 2),
               "teacher_ppl": round(s["teacher"]["ppl"], 2),
               "kl_to_teacher": round(s["student"]["kl_to_teacher"], 4),
               "top1_agreement": round(s["student"]["top1_agreement"], 4), "train_seconds": round(secs, 1),
               "tokens_seen": res.metrics["tokens_seen"], "on_policy_batches": res.metrics["on_policy_batches"]}
        results.append(row)
        print(f"{label:30s} ppl {row['student_ppl']:8.2f}  KL {row['kl_to_teacher']:.4f}  "
              f"top-1 {row['top1_agreement']:.4f}  {secs:6.1f} s", flush=True)
    meta = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": base["distill"]["steps"],
            "batch_size": base["distill"]["batch_size"], "seq_len": base["data"]["seq_len"],
            "eval_tokens": int(eval_ids.numel()), "when": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
