"""Peak memory and time of a whole distillation training step at LLM vocabulary size: plain vs chunked vs fused.

    python bench/bench_step_memory.py [--tokens 4096] [--seq-len 512] [--vocab 128000] [--hidden 256]
        [--layers 1] [--teacher-layers 2] [--cases forward_kl:0,forward_kl:0.1] [--repeats 2] [--write-results]

The step is the trainer's: ``StepLoss`` (llm_compress/distill/step.py) for one micro-batch of ``tokens`` tokens
(student forward, online teacher forward, KD + CE), backward, gradient clipping and an AdamW step, on a
small random Llama student (``layers`` decoder layers, hidden size ``hidden``, untied lm_head) and a teacher
of the same width with ``teacher-layers`` layers, both float32 on the CPU. Each case is a divergence and a
CE weight (``name:ce_weight``); each (case, path) runs in a fresh subprocess, the path forced:

- plain: the student's and the teacher's logits [tokens, V], the divergence and ``F.cross_entropy`` on them;
- chunked: the same logits, KD + CE over token chunks (``chunk_tokens`` automatic: 32 at V = 128k);
- fused: hidden states only, each chunk's logits made from the lm_head weights inside the loss.

Memory: the worker builds the models and the optimiser's state (one AdamW step on zero gradients, lr 0),
then takes the resident set (RSS) as the baseline, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``
5) and runs ``repeats`` steps; peak extra = the peak RSS (VmHWM) minus the baseline, i.e. everything the
step allocates: activations, logits, loss intermediates, parameter gradients, AdamW's temporaries.
(``tracemalloc`` does not see torch's allocations; like bench_divergences.py this reads the kernel's RSS.)
Time = fastest step. Check: the plain path's loss and a sample of parameter gradients (every 1,000th row of the
lm_head's and the embeddings', all of the first layer's q_proj) are compared with the other paths'.

``--write-results`` replaces (or adds, after "## Distillation losses") the "## Distillation step memory"
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_divergences import run_json, write_section  # bench/ is this script's folder, so it is on sys.path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Distillation step memory"
PATHS = ("plain", "chunked", "fused")


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _models(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(layers: int, seed: int):
        import torch

        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=args.seq_len, tie_word_embeddings=False))

    return make(args.layers, 1), make(args.teacher_layers, 2)


def worker(args) -> None:
    """One (case, path) measurement; prints one JSON line and saves the loss and gradient sample."""
    sys.path.insert(0, str(ROOT))
    import torch

    from llm_compress.distill.config import DistillConfig
    from llm_compress.distill.step import StepLoss

    torch.set_num_threads(args.threads)
    name, ce_weight = args.case.split(":")
    cfg = DistillConfig(divergence=name, ce_weight=float(ce_weight), chunk="always")
    student, teacher = _models(args)
    teacher.eval().requires_grad_(False)
    cpu = torch.device("cpu")
    step = StepLoss(cfg, student, teacher, device=cpu, path=args.path)
    opt = torch.optim.AdamW(student.parameters(), lr=0.0)
    for p in student.parameters():  # the optimiser's state exists before the measured steps, as in training
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for group in opt.param_groups:
        group["lr"] = 1e-4
    ids = torch.randint(0, args.vocab, (args.tokens // args.seq_len, args.seq_len),
                        generator=torch.Generator().manual_seed(0))  # [B, T]
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    times, sample = [], None
    for i in range(args.repeats):
        t0 = time.perf_counter()
        total, kd, ce = step(ids)
        total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        if i == 0:  # the first step's loss and gradients, before any update
            sample = {"loss": total.item(), "kd": kd.item(), "ce": ce.item(),
                      "lm_head": student.lm_head.weight.grad[::1000].clone(),
                      "embed": student.model.embed_tokens.weight.grad[::1000].clone(),
                      "q_proj": student.model.layers[0].self_attn.q_proj.weight.grad.clone()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        del total, kd, ce
    peak = _status_kib("VmHWM")
    torch.save(sample, args.sample_out)
    print(json.dumps({"case": args.case, "path": step.path, "base_mib": base / 1024,
                      "peak_extra_mib": (peak - base) / 1024, "time_s": min(times), "times_s": times,
                      "chunk_tokens": step.chunk_tokens, "loss": sample["loss"]}))


def run_worker(args, case: str, path: str, sample_out: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--case", case, "--path", path,
           "--sample-out", sample_out] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                          ("tokens", "seq_len", "vocab", "hidden", "layers", "teacher_layers",
                                           "repeats", "threads")]
    return run_json(cmd, f"{case}/{path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (rows x seq-len)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1, help="student decoder layers")
    ap.add_argument("--teacher-layers", type=int, default=2)
    ap.add_argument("--cases", default="forward_kl:0,forward_kl:0.1", help="divergence:ce_weight, comma-separated")
    ap.add_argument("--repeats", type=int, default=2, help="steps per subprocess")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--sample-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        for case in args.cases.split(","):
            res, samples = {}, {}
            for path in PATHS:
                out = os.path.join(tmp, f"{case}-{path}.pt")
                res[path] = run_worker(args, case, path, out)
                samples[path] = torch.load(out)
                print(json.dumps(res[path]), flush=True)
            for path in PATHS:
                ref, got = samples["plain"], samples[path]
                grad_rel = max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max())
                               for k in ("lm_head", "embed", "q_proj"))
                rows.append({"case": case, "path": path, "mib": res[path]["peak_extra_mib"],
                             "ratio": res[path]["peak_extra_mib"] / res["plain"]["peak_extra_mib"],
                             "time_s": res[path]["time_s"], "loss_diff": abs(got["loss"] - ref["loss"]),
                             "grad_rel": grad_rel, "base_mib": res[path]["base_mib"]})
    chunk = res["chunked"]["chunk_tokens"]
    table = ["| divergence, CE weight | path | peak extra (MiB) | vs plain | step (s) | loss diff vs plain "
             "| max grad diff / max grad |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name, w = r["case"].split(":")
        table.append(f"| {name}, {w} | {r['path']} | {r['mib']:.0f} | {r['ratio']:.3f} | {r['time_s']:.1f} | "
                     f"{r['loss_diff']:.1e} | {r['grad_rel']:.1e} |")
    table = "\n".join(table)
    print(table)
    if args.write_results:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores ({args.threads} threads), torch "
                   f"{torch.__version__}, Python {platform.python_version()}")
        cmd = (f"python bench/bench_step_memory.py --tokens {args.tokens} --seq-len {args.seq_len} --vocab "
               f"{args.vocab} --hidden {args.hidden} --layers {args.layers} --teacher-layers {args.teacher_layers} "
               f"--cases {args.cases} --repeats {args.repeats} --threads {args.threads} --write-results")
        logits_mib = args.tokens * args.vocab * 4 / 2**20
        section = (
            f"{SECTION}\n\n"
            f"The whole training step (llm_compress/distill/step.py `StepLoss` + backward + gradient clipping + AdamW "
            f"step) for one micro-batch of {args.tokens} tokens ({args.tokens // args.seq_len} rows x "
            f"{args.seq_len}), V = {args.vocab}, float32 on the CPU: a random Llama student ({args.layers} layer, "
            f"hidden {args.hidden}, untied lm_head) and an online teacher ({args.teacher_layers} layers), "
            f"chunk_tokens = {chunk} (automatic); {machine}.\n\n"
            f"Command: `{cmd}`\n\n"
            f"Peak extra = peak RSS (VmHWM, reset through /proc/self/clear_refs once the models and AdamW's state "
            f"exist; fresh subprocess per row) minus the RSS at that point (about {rows[0]['base_mib']:.0f} MiB): "
            f"everything the step allocates, parameter gradients and optimiser temporaries included. One float32 "
            f"[tokens, V] tensor is {logits_mib:.0f} MiB. Step = fastest of {args.repeats}. Check against the "
            f"plain path: first step's loss, and every 1,000th row of the lm_head and embedding gradients plus "
            f"the first q_proj gradient.\n\n{table}\n\n"
            "- plain holds the student's logits, their gradient, the teacher's logits and the divergence's float32 "
            "intermediates (with CE weight > 0 also the CE's float32 copy and log-softmax) at once.\n"
            "- chunked still holds the student's logits and their gradient buffer (2 x "
            f"{logits_mib:.0f} MiB) plus one chunk's intermediates; the teacher's lm_head is fused (its logits are "
            "made chunk by chunk) on both the chunked and the fused path.\n"
            "- fused holds no [tokens, V] tensor: hidden states, the lm_head's float32 gradient accumulator "
            f"({args.vocab * args.hidden * 4 / 2**20:.0f} MiB), parameter gradients, AdamW's temporaries and one "
            "chunk's logits and intermediates.\n"
            "- Times come from a shared 2-core machine (other jobs' tests ran alongside), so they are only "
            "indicative; the memory figures are per process and do not depend on that.\n")
        print(f"wrote {write_section(SECTION, section, after='## Distillation losses')}")


if __name__ == "__main__":
    main()
