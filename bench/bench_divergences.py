"""Peak memory and time of distillation losses, plain vs chunked, at LLM vocabulary size.

    python bench/bench_divergences.py [--tokens 4096] [--vocab 128000] [--chunk-tokens 0 (= automatic)]
        [--names forward_kl,reverse_kl,js,skew_kl] [--repeats 3] [--rounds 2] [--write-results]

Every (divergence, variant) runs in a fresh subprocess, so one variant's allocations cannot hide another's
peak. The worker allocates float32 student logits (a leaf that requires grad) and teacher logits, both
[tokens, V], then times loss + backward ``repeats`` times (reporting the fastest; the first run includes
the page faults of fresh allocations), and each variant runs in ``rounds`` subprocesses alternating with the
other variant. Memory: ``ru_maxrss`` (the process's peak resident set) minus the
resident set just before the first loss, i.e. the peak extra memory of loss + backward over the inputs,
including the [tokens, V] gradient of the student logits that autograd must produce in both variants.
(``tracemalloc`` does not see torch's allocations.) Gradients: every 16th row of the student gradient is
saved by each worker and compared across the two variants (max |difference| over max |gradient|).

``--write-results`` replaces (or appends) the "## Distillation losses" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Distillation losses"
GRAD_ROW_STRIDE = 16  # rows of the gradient kept for the cross-variant comparison
NOTES = """\
- Why 4096 tokens, not 8192: at 8192 tokens the plain skew_kl worker was killed by the kernel's OOM killer on
  this 24 GB machine (8 GB of input logits, and the plain loss needs about twice its 16 GB at 4096 tokens).
- The chunked loss is also faster on CPU: its 16 MiB chunk intermediates are reused from glibc's heap, while
  the plain loss's multi-GB intermediates are fresh mmaps whose page faults dominate (high system time).
- Chunked peak extra is almost all the student-logit gradient buffer (one [tokens, V] float32 copy); the rest
  is a 32-token chunk's intermediates. The plain loss holds 5 (forward/reverse KL) to 9 (js) such copies."""


def _rss_kib() -> int:
    """Current resident set size of this process, KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def write_section(title: str, section: str, after: str | None = None) -> Path:
    """Put ``section`` (starting with its ``title`` line) into bench/RESULTS.md: in place of the section with that
    title (up to the next "## " heading), else right after the section titled ``after``, else at the end."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    anchor = title if title in text else after if after and after in text else None
    if anchor is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        head, rest = text.split(anchor, 1)
        nxt = rest.find("\n## ")
        if anchor == title:  # replace our own section only
            tail = rest[nxt + 1:] if nxt >= 0 else ""
            text = head + section + ("\n" + tail if tail else "")
        else:  # insert after that section
            body, tail = (rest[:nxt + 1], rest[nxt + 1:]) if nxt >= 0 else (rest.rstrip("\n") + "\n", "")
            text = head + anchor + body.rstrip("\n") + "\n\n" + section + ("\n" + tail if tail else "")
    path.write_text(text)
    return path


def worker(args) -> None:
    """One (divergence, variant) measurement; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from llm_compress.distill.chunked import chunked_divergence
    from llm_compress.distill.divergences import DIVERGENCES

    torch.manual_seed(0)
    # inputs built in place: no temporary [tokens, V] copy may raise the peak before the measurement starts
    student = torch.randn(args.tokens, args.vocab).mul_(2.0).requires_grad_()  # [N, V]
    teacher = torch.randn(args.tokens, args.vocab).mul_(3.0)  # [N, V]
    if args.variant == "plain":
        def loss_fn():
            return DIVERGENCES[args.name](student, teacher)
    else:
        def loss_fn():
            return chunked_divergence(args.name, student, teacher, chunk_tokens=args.chunk_tokens or None)
    base = _rss_kib()
    times, loss = [], None
    for _ in range(args.repeats):
        student.grad = None
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    torch.save({"loss": loss.item(), "grad_rows": student.grad[::GRAD_ROW_STRIDE].clone()}, args.grad_out)
    print(json.dumps({"name": args.name, "variant": args.variant, "base_mib": base / 1024,
                      "peak_extra_mib": (peak - base) / 1024, "time_s": min(times), "times_s": times,
                      "loss": loss.item()}))


def run_variant(args, name: str, variant: str, grad_out: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--name", name, "--variant", variant,
           "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--chunk-tokens", str(args.chunk_tokens),
           "--repeats", str(args.repeats), "--grad-out", grad_out]
    return run_json(cmd, f"{name}/{variant}")


def run_json(cmd: list[str], what: str) -> dict:
    """Run a worker subprocess and return the JSON record on its last stdout line; exit with its stderr if it failed."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{what} failed (rc {p.returncode}; -9 = killed, out of memory?)\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--chunk-tokens", type=int, default=0, help="0: chunked_divergence's automatic choice")
    ap.add_argument("--names", default="forward_kl,reverse_kl,js,skew_kl")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per subprocess")
    ap.add_argument("--rounds", type=int, default=2, help="subprocesses per variant, alternating plain/chunked")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=("plain", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--grad-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    sys.path.insert(0, str(ROOT))
    from llm_compress.distill.chunked import auto_chunk_tokens

    chunk = args.chunk_tokens or auto_chunk_tokens(args.vocab, torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-div-") as tmp:
        for name in args.names.split(","):
            res, grads = {}, {}
            for _ in range(args.rounds):  # alternate the variants so load from other processes hits both alike
                for variant in ("plain", "chunked"):
                    out = os.path.join(tmp, f"{name}-{variant}.pt")
                    r = run_variant(args, name, variant, out)
                    print(json.dumps(r), flush=True)
                    grads[variant] = torch.load(out)
                    if variant in res:  # keep the fastest time and the highest peak over the rounds
                        r["time_s"] = min(r["time_s"], res[variant]["time_s"])
                        r["peak_extra_mib"] = max(r["peak_extra_mib"], res[variant]["peak_extra_mib"])
                    res[variant] = r
            g0, g1 = grads["plain"]["grad_rows"], grads["chunked"]["grad_rows"]
            rows.append({
                "name": name,
                "plain_mib": res["plain"]["peak_extra_mib"], "chunked_mib": res["chunked"]["peak_extra_mib"],
                "plain_s": res["plain"]["time_s"], "chunked_s": res["chunked"]["time_s"],
                "loss_diff": abs(res["plain"]["loss"] - res["chunked"]["loss"]),
                "grad_rel": float((g0 - g1).abs().max() / g0.abs().max()),
            })
    grad_mib = args.tokens * args.vocab * 4 / 2**20
    header = ("| divergence | plain peak extra (MiB) | chunked peak extra (MiB) | memory ratio | plain fwd+bwd (s) "
              "| chunked fwd+bwd (s) | time ratio | loss diff | max grad diff / max grad |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        lines.append(f"| {r['name']} | {r['plain_mib']:.0f} | {r['chunked_mib']:.0f} | "
                     f"{r['chunked_mib'] / r['plain_mib']:.2f} | {r['plain_s']:.2f} | {r['chunked_s']:.2f} | "
                     f"{r['chunked_s'] / r['plain_s']:.2f} | {r['loss_diff']:.1e} | {r['grad_rel']:.1e} |")
    table = "\n".join(lines)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python " \
              f"{platform.python_version()}"
    print(table)
    if args.write_results:
        cmd = (f"python bench/bench_divergences.py --tokens {args.tokens} --vocab {args.vocab} "
               f"--chunk-tokens {args.chunk_tokens} --names {args.names} --repeats {args.repeats} "
               f"--rounds {args.rounds} --write-results")
        how = f"{chunk} (automatic)" if not args.chunk_tokens else str(chunk)
        section = (f"{SECTION}\n\n"
                   f"Plain (`llm_compress.distill.divergences`) vs chunked "
                   f"(`llm_compress.distill.chunked.chunked_divergence`, "
                   f"chunk_tokens={how}) loss + backward, float32 logits [{args.tokens} tokens, "
                   f"V = {args.vocab}], T = 1, no mask; {machine}.\n\n"
                   f"Command: `{cmd}`\n\n"
                   f"Peak extra = peak RSS (`ru_maxrss`, fresh subprocess per row and variant) minus RSS before the "
                   f"first loss (highest over the rounds); it includes the student-logit gradient ({grad_mib:.0f} "
                   f"MiB) that both variants must produce. Time = fastest of {args.rounds} x {args.repeats} runs "
                   f"(subprocesses alternating plain/chunked; the machine is shared, so times are noisy). Gradient "
                   f"check on every {GRAD_ROW_STRIDE}th row.\n\n{table}\n\n{NOTES}\n")
        print(f"wrote {write_section(SECTION, section)}")


if __name__ == "__main__":
    main()
