"""Data-parallel distillation on this machine's CPU: tokens/s with 1 and 2 processes on the same global batch.

    python bench/bench_ddp.py [--steps 60] [--out bench/ddp_cpu.json]

The demo recipe's teacher, tokenizer and tokens (its bootstrap, select and data stages, reused from ``artifacts/``
when the demo has run); its 2-layer student distilled for ``--steps`` steps of the demo's global batch (16 rows x
128 tokens), forward KL + 0.1 CE, the teacher run on every batch, by ``stages.distill.run`` with
``runtime.distributed.processes`` 1 (with 1, then 2 torch threads) and 2 (torchrun, gloo, 1 thread each: torchrun's
default). Reports the training loop's tokens/s (rank 0's clock, from the first step to the last) and the stage's wall
time (with torchrun's start, the model loads and the save), and checks that the runs end with the same weights.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--runs", nargs="*", default=["1x1", "1x2", "2x1"], help="PROCESSESxTHREADS each")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "ddp_cpu.json"))
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from stages import distill
    from stages.config import load_recipe, parse_recipe
    from stages.pipeline import make_call, run_call

    torch.set_num_threads(2)
    base = load_recipe(ROOT / "configs" / "demo.yaml").model_dump(mode="json")
    base["runtime"]["progress"] = False
    base["distill"].update({"steps": args.steps, "checkpoint_every": 0, "eval_every": args.steps,
                            "teacher": {"source": "online"}})
    root = Path(args.artifacts).resolve()
    recipe = parse_recipe(base)
    done: dict = {}
    for stage in ("bootstrap", "select", "data"):  # content-keyed: reused from an earlier demo run
        done[stage] = run_call(recipe, make_call(recipe, stage, done), root / "bench-ddp", root)
    out = lambda s, o: done[s]["outputs"][o]["path"]  # noqa: E731
    rows, weights = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            n, threads = map(int, run.split("x"))
            torch.set_num_threads(threads)  # this process's (1 process); ranks get OMP_NUM_THREADS from runtime.threads
            r = json.loads(json.dumps(base))
            r["runtime"]["distributed"] = {"processes": n}
            r["runtime"]["threads"] = threads if n > 1 else None
            rec = parse_recipe(r)
            t0 = time.perf_counter()
            res = distill.run(rec.distill, rec.models, rec.runtime, teacher_ref=out("bootstrap", "teacher"),
                              student_ref="derive", tokenizer_ref=out("bootstrap", "tokenizer"),
                              train_path=Path(out("data", "train")), eval_path=Path(out("data", "eval")),
                              out_dir=Path(tmp) / run)
            wall = time.perf_counter() - t0
            weights[run] = load_file(str(Path(tmp) / run / "model" / "model.safetensors"))
            rows.append({"run": run, "processes": n, "threads_per_process": threads,
                         "tokens_per_s": res.metrics["tokens_per_s"], "stage_wall_s": round(wall, 1),
                         "tokens": res.metrics["tokens_seen"], "eval_ppl_after": res.metrics["eval_ppl_after"],
                         "devices": res.compute["devices"]})
            print(f"{n} process(es) x {threads} thread(s): {res.metrics['tokens_per_s']:8.0f} tokens/s in the loop, stage {wall:6.1f} s, "
                  f"held-out ppl {res.metrics['eval_ppl_after']}", flush=True)
    first = rows[0]
    for row in rows[1:]:
        row[f"speedup_vs_{first['run']}"] = round(row["tokens_per_s"] / first["tokens_per_s"], 3)
        row[f"max_weight_diff_vs_{first['run']}"] = max((weights[row["run"]][k] - weights[first["run"]][k])
                                                        .abs().max().item() for k in weights[first["run"]])
    meta = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": __import__("os").cpu_count(), "torch": torch.__version__, "steps": args.steps,
            "global_batch": base["distill"]["batch_size"], "seq_len": base["data"]["seq_len"],
            "student": "demo: 2 of the teacher's 4 layers", "teacher_signal": "online",
            "when": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
