"""Data-parallel distillation and GPTQ calibration on this machine's CPU, with 1 and 2 processes.

    python bench/bench_ddp.py [--steps 60] [--repeat 3] [--out bench/ddp_cpu.json]

The demo recipe's teacher, tokenizer and tokens (its bootstrap, select and data stages, reused from ``artifacts/``
when the demo has run); its 2-layer student distilled for ``--steps`` steps of the demo's global batch (16 rows x
128 tokens), forward KL + 0.1 CE, the teacher run on every batch, by ``llm_compress.distill.run`` with
``runtime.distributed.processes`` 1 (with 1, then 2 torch threads) and 2 (torchrun, gloo, 1 thread each: torchrun's
default), DDP and FSDP. Reports the training loop's tokens/s (rank 0's clock, from the first step to the last) and the
stage's wall time (with torchrun's start, the model loads and the save), and checks that the runs end with the same
weights; each run is repeated (interleaved) and the median taken. Then GPTQ W4A16 g32 of the demo teacher on 128
calibration rows of the same tokens, with 1 process (2 threads) and 2 (1 thread each): the quantize stage's wall time
and how many codes agree.
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

from bench.bench_quant import prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--runs", nargs="*", default=["1x1", "1x2", "2x1", "2x1:fsdp"],
                    help="PROCESSESxTHREADS[:STRATEGY] each")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "ddp_cpu.json"))
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from llm_compress.distill import apply as distill
    from llm_compress.config import load_recipe, parse_recipe

    torch.set_num_threads(2)
    base = load_recipe(ROOT / "configs" / "demo.yaml").model_dump(mode="json")
    base["runtime"]["progress"] = False
    base["distill"].update({"steps": args.steps, "checkpoint_every": 0, "eval_every": args.steps,
                            "teacher": {"source": "online"}})
    # content-keyed: reused from an earlier demo run
    done = prepare(parse_recipe(base), Path(args.artifacts).resolve(), "bench-ddp")
    out = lambda s, o: done[s]["outputs"][o]["path"]  # noqa: E731
    ap_runs = [(run, *run.partition(":")[::2]) for run in args.runs]
    samples: dict[str, list] = {run: [] for run in args.runs}
    weights, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):  # interleaved, so a slow spell of the machine touches every run alike
            for run, shape, strategy in ap_runs:
                n, threads = map(int, shape.split("x"))
                torch.set_num_threads(threads)  # this process's (1 process); ranks get OMP_NUM_THREADS=threads
                r = json.loads(json.dumps(base))
                r["runtime"]["distributed"] = {"processes": n, "strategy": strategy or "ddp"}
                r["runtime"]["threads"] = threads if n > 1 else None
                rec = parse_recipe(r)
                t0 = time.perf_counter()
                res = distill.run(rec.distill, rec.models, rec.runtime, teacher_ref=out("bootstrap", "teacher"),
                                  student_ref="derive", tokenizer_ref=out("bootstrap", "tokenizer"),
                                  train_path=Path(out("data", "train")), eval_path=Path(out("data", "eval")),
                                  out_dir=Path(tmp) / f"{run}-{rep}")
                wall = time.perf_counter() - t0
                weights[run] = load_file(str(Path(tmp) / f"{run}-{rep}" / "model" / "model.safetensors"))
                samples[run].append((res.metrics["tokens_per_s"], round(wall, 1)))
                results[run] = res
                print(f"{run:9s} #{rep + 1}: {res.metrics['tokens_per_s']:8.0f} tokens/s in the loop, "
                      f"stage {wall:6.1f} s, held-out ppl {res.metrics['eval_ppl_after']}", flush=True)
    rows = []
    for run, shape, strategy in ap_runs:
        n, threads = map(int, shape.split("x"))
        tps = sorted(t for t, _ in samples[run])
        res = results[run]
        rows.append({"run": run, "processes": n, "threads_per_process": threads, "strategy": strategy or "-",
                     "tokens_per_s_median": tps[len(tps) // 2], "tokens_per_s_all": [t for t, _ in samples[run]],
                     "stage_wall_s_all": [w for _, w in samples[run]], "tokens": res.metrics["tokens_seen"],
                     "eval_ppl_after": res.metrics["eval_ppl_after"], "devices": res.compute["devices"]})
    first = rows[0]
    for row in rows[1:]:
        row[f"speedup_vs_{first['run']}"] = round(row["tokens_per_s_median"] / first["tokens_per_s_median"], 3)
        row[f"max_weight_diff_vs_{first['run']}"] = max((weights[row["run"]][k] - weights[first["run"]][k])
                                                        .abs().max().item() for k in weights[first["run"]])
    gptq = []
    codes = {}
    from llm_compress.quantize.apply import run as quantize
    from llm_compress.quantize.codes import load_codes

    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            torch.set_num_threads(2 if n == 1 else 1)
            r = json.loads(json.dumps(base))
            r["quantize"]["scheme"] = {"method": "gptq", "setting": "W4A16", "group_size": 32,
                                       "calibration": {"samples": 128}}
            r["runtime"]["distributed"] = {"processes": n}
            rec = parse_recipe(r)
            out_dir = Path(tmp) / f"q{n}"
            out_dir.mkdir()
            t0 = time.perf_counter()
            res = quantize(rec.quantize, rec.models, rec.runtime, model_dir=Path(out("bootstrap", "teacher")),
                           out_dir=out_dir, calib_path=Path(out("data", "train")))
            wall = time.perf_counter() - t0
            codes[n] = load_codes(out_dir / "model").layers
            gptq.append({"processes": n, "threads_per_process": 2 if n == 1 else 1, "stage_wall_s": round(wall, 1),
                         "calibration_rows": res.metrics["calibration_rows"],
                         "mean_rel_error": res.metrics["mean_rel_error"]})
            print(f"GPTQ, {n} process(es): {wall:6.1f} s, mean rel error {res.metrics['mean_rel_error']}", flush=True)
    gptq[1]["codes_equal_to_1"] = round(sum(int((codes[1][k].codes == codes[2][k].codes).sum()) for k in codes[1])
                                        / sum(c.codes.numel() for c in codes[1].values()), 6)
    meta = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": __import__("os").cpu_count(), "torch": torch.__version__, "steps": args.steps,
            "global_batch": base["distill"]["batch_size"], "seq_len": base["data"]["seq_len"],
            "student": "demo: 2 of the teacher's 4 layers", "teacher_signal": "online",
            "when": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows, "gptq": gptq}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
