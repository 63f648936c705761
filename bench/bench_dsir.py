"""DSIR: this project's ``llm_compress.dsir`` against the reference package ``data-selection`` 1.0.3, side by side.

    python bench/bench_dsir.py --ref-python /tmp/venv_dsir/bin/python [--k 5000] [--buckets 10000] [--write-results]
    python bench/bench_dsir.py --ref-python /tmp/venv_dsir/bin/python --e2e [--e2e-docs 30000] [--repeats 5] \
        [--before DIR]

The reference package needs nltk, so it runs in its own virtualenv (``--ref-python``; made with
``python -m venv V && V/bin/pip install data-selection==1.0.3``) through a subprocess; without it only this
project's numbers are measured.

Corpus (built from the running interpreter's standard library, so every machine with the same Python builds the
same bytes): the raw pool is the stdlib's ``.py`` sources cut into 20-line chunks (domain ``code``) plus every
module/class/function docstring (domain ``docstring``); the target is the reference manual in
``pydoc_data.topics`` cut into ~600-character paragraph groups. A good selection for that target is mostly
docstrings ("precision" below).

Measured for each tool on the same files, the same k, buckets, ``min_length`` and machine: the fit (target + raw
bag-of-n-grams) and the featurize+weight pass over the pool, each as documents/s and MB/s of JSONL per core (one
process), plus wall time with all cores; the KL reduction of each tool's selection, computed by one function in
both hashed feature spaces; and the largest |difference| of log weights between ``hash="dsir-compat"`` and the
reference package.

``--e2e`` measures whole commands instead, each a fresh process pinned to one core (``sched_setaffinity``, as
``taskset -c 0``), from process start to exit (``selected.jsonl`` written): ``python -m llm_compress.flows.cli select``
against a minimal script that does the same with the reference package's ``HashedNgramDSIR`` (``num_proc=1``: fit,
weigh, resample), and with ``--before DIR`` the same command in another source tree (an earlier commit), on the first
``--e2e-docs`` documents of the pool; the commands alternate, after one unmeasured run each (page cache),
``--repeats`` times; medians.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_compress.dsir import DSIRConfig, Featurizer, kl_div, run_selection  # noqa: E402

MIN_LENGTH = 20
_REFERENCE = r'''
import json, sys, time, tempfile
from pathlib import Path
import numpy as np
from data_selection import HashedNgramDSIR
pool, target, out, k, buckets, min_len, nproc, seed = sys.argv[1:9]
k, buckets, min_len, nproc, seed = int(k), int(buckets), int(min_len), int(nproc), int(seed)
cache = tempfile.mkdtemp(prefix="dsir-ref-")
d = HashedNgramDSIR([pool], [target], cache, num_proc=nproc, num_buckets=buckets, min_example_length=min_len)
t0 = time.perf_counter(); d.fit_importance_estimator(num_tokens_to_fit="all"); fit = time.perf_counter() - t0
t0 = time.perf_counter(); d.compute_importance_weights(); weigh = time.perf_counter() - t0
# Virtual shard j holds records j, j + nproc, ...: interleave back into pool order.
parts = [np.load(Path(cache) / "log_importance_weights" / f"{j}.npy") for j in range(nproc)]
w = np.empty(sum(map(len, parts)))
for j, p in enumerate(parts):
    w[j::nproc] = p
np.random.seed(seed)
t0 = time.perf_counter()
d.resample(out_dir=out + "/sel", num_to_sample=k, cache_dir=out + "/selcache")
res = time.perf_counter() - t0
ids = sorted(json.loads(line)["i"] for f in sorted(Path(out, "sel").glob("*.jsonl")) for line in open(f))
np.save(out + "/weights.npy", w); np.save(out + "/ids.npy", np.asarray(ids, dtype=np.int64))
print(json.dumps({"fit_s": fit, "weights_s": weigh, "resample_s": res}))
'''

# End to end: what a user of the reference package runs to get a selection (the same settings as `compress select`).
_REFERENCE_E2E = r'''
import sys
import numpy as np
from data_selection import HashedNgramDSIR
pool, target, cache, out, k, buckets, min_len, seed = sys.argv[1:9]
d = HashedNgramDSIR([pool], [target], cache, num_proc=1, num_buckets=int(buckets), min_example_length=int(min_len))
d.fit_importance_estimator(num_tokens_to_fit="all")
d.compute_importance_weights()
np.random.seed(int(seed))
d.resample(out_dir=out, num_to_sample=int(k))
'''


# -- corpus -----------------------------------------------------------------------------------


def build_corpus(work: Path) -> dict:
    """Write pool.jsonl ({"text", "domain", "i"}) and target.jsonl; return sizes."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    pool = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        lines = source.splitlines()
        for a in range(0, len(lines), 20):
            chunk = "\n".join(lines[a:a + 20]).strip()
            if chunk:
                pool.append((chunk, "code"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    pool.append((doc.strip(), "docstring"))
    target = []
    for name in sorted(topics):
        cur = ""
        for para in re.split(r"\n\s*\n", topics[name]):
            if para.strip():
                cur = f"{cur}\n\n{para.strip()}" if cur else para.strip()
                if len(cur) >= 600:
                    target.append(cur)
                    cur = ""
        if cur:
            target.append(cur)
    with open(work / "pool.jsonl", "w", encoding="utf-8") as f:
        for i, (text, domain) in enumerate(pool):
            f.write(json.dumps({"text": text, "domain": domain, "i": i}) + "\n")
    with open(work / "target.jsonl", "w", encoding="utf-8") as f:
        for text in target:
            f.write(json.dumps({"text": text}) + "\n")
    domains = [d for _, d in pool]
    return {"pool_docs": len(pool), "pool_mb": (work / "pool.jsonl").stat().st_size / 1e6,
            "docstring_docs": domains.count("docstring"), "target_docs": len(target),
            "target_mb": (work / "target.jsonl").stat().st_size / 1e6}


# -- measurements -----------------------------------------------------------------------------


def load_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


class KLJudge:
    """KL(target || pool) - KL(target || selection) in both hashed feature spaces (unsmoothed target), with the
    pool and target distributions computed once."""

    def __init__(self, pool: list[str], target: list[str], buckets: int) -> None:
        self.pool = pool
        self.spaces = {}
        for mode in ("fast", "dsir-compat"):
            fz = Featurizer(buckets, 2, mode)
            self.spaces[mode] = (fz, _dist(fz, pool), _dist(fz, target))

    def __call__(self, ids: np.ndarray) -> dict[str, float]:
        out = {}
        for mode, (fz, p_raw, p_tgt) in self.spaces.items():
            p_sel = _dist(fz, [self.pool[i] for i in ids.tolist()])
            out[mode] = kl_div(p_tgt, p_raw) - kl_div(p_tgt, p_sel)
        return out


def _dist(fz: Featurizer, texts: list[str]) -> np.ndarray:
    counts = np.zeros(fz.num_buckets, dtype=np.int64)
    for i in range(0, len(texts), 2000):
        counts += fz.counts(texts[i:i + 2000])
    return counts / counts.sum()


def run_ours(work: Path, name: str, k: int, buckets: int, processes: int, mode: str, seed: int) -> dict:
    # keep_features_bytes=0: the weights pass featurizes the pool again, as the reference does, so 'weigh' times
    # the same work on both sides (in-process runs otherwise reuse the fit's features; see --e2e).
    cfg = DSIRConfig(k=k, num_buckets=buckets, min_length=MIN_LENGTH, processes=processes, hash=mode, seed=seed,
                     shard_bytes=4 << 20, keep_features_bytes=0)
    out = work / f"ours-{name}"
    t0 = time.perf_counter()
    res = run_selection(cfg, [work / "pool.jsonl"], [work / "target.jsonl"], out, cache_dir=None, progress=False)
    wall = time.perf_counter() - t0
    m = res.metrics
    return {"fit_s": m["timings"]["fit_s"], "weights_s": m["timings"]["weights_s"], "total_s": wall,
            "ids": np.load(out / "selected_ids.npy"), "weights": np.load(out / "weights.npy"),
            "kl_own": m["kl_reduction"], "processes": processes}


def run_reference(ref_python: str, work: Path, name: str, k: int, buckets: int, processes: int, seed: int) -> dict:
    out = work / f"ref-{name}"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    p = subprocess.run([ref_python, "-c", _REFERENCE, str(work / "pool.jsonl"), str(work / "target.jsonl"), str(out),
                        str(k), str(buckets), str(MIN_LENGTH), str(processes), str(seed)],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"reference package failed:\n{p.stderr[-3000:]}")
    times = json.loads(p.stdout.strip().splitlines()[-1])
    return {**times, "total_s": wall, "ids": np.load(out / "ids.npy"), "weights": np.load(out / "weights.npy"),
            "processes": processes}


def _timed(cmd: list[str], cpu: int, cwd: Path = ROOT) -> float:
    """Wall seconds of ``cmd`` as a fresh process pinned to core ``cpu``, from start to exit."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{p.stderr[-3000:]}")
    return wall


def run_e2e(args: argparse.Namespace, work: Path) -> dict:
    """Alternate `compress select` (this tree, and ``--before``'s if given) and the reference script on one core,
    ``args.repeats`` times after a warm-up round."""
    pool, target = work / "pool_e2e.jsonl", work / "target.jsonl"
    docs = 0
    with open(work / "pool.jsonl", "rb") as f, open(pool, "wb") as out:
        for line in f:
            if docs == args.e2e_docs:
                break
            out.write(line)
            docs += 1
    cpu = min(os.sched_getaffinity(0))

    def select(out: Path) -> list[str]:
        return [sys.executable, "-m", "llm_compress.flows.cli", "select", "--raw", str(pool), "--target", str(target),
                "--out", str(out), "-k", str(args.k), "--buckets", str(args.buckets), "--min-length", str(MIN_LENGTH),
                "--seed", str(args.seed), "--cache", str(out.with_name(out.name + "-cache"))]

    def reference(out: Path) -> list[str]:
        return [args.ref_python, "-c", _REFERENCE_E2E, str(pool), str(target), str(out.with_name(out.name + "-cache")),
                str(out), str(args.k), str(args.buckets), str(MIN_LENGTH), str(args.seed)]

    runs = [("ours", select, ROOT), ("reference", reference, ROOT)]
    if args.before:
        runs.insert(1, ("before", select, Path(args.before).resolve()))
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    inside: list[dict[str, float]] = []  # ours: selection.json timings, and the wall time around them
    for rep in range(args.repeats + 1):  # round 0 warms the page cache and is not counted
        for name, make, cwd in runs:
            out = work / f"e2e-{name}-{rep}"
            wall = _timed(make(out), cpu, cwd)
            if name == "reference":
                selected = sum(1 for f in out.glob("*.jsonl") for _ in open(f, "rb"))
            else:
                selected = sum(1 for _ in open(out / "selected.jsonl", "rb"))
                if name == "ours" and rep:
                    inside.append({**json.loads((out / "selection.json").read_text())["timings"], "wall": wall})
            assert selected == args.k, (name, selected)
            for d in (out, out.with_name(out.name + "-cache")):
                shutil.rmtree(d, ignore_errors=True)
            if rep:
                times[name].append(wall)
            print(f"round {rep}{' (warm-up)' if not rep else ''}: {name} {wall:.2f} s", flush=True)
    return {"docs": docs, "mb": pool.stat().st_size / 1e6, "times": times, "inside": inside, "cpu": cpu}


def e2e_report(res: dict, args: argparse.Namespace) -> str:
    """Markdown: a row per command (median, min, max, speed-up = reference median / its median), and where ours
    spends its time."""
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    labels = {"ours": "`python -m llm_compress.flows.cli select` (this tree; defaults, so automatic processes)",
              "before": f"the same command in `--before` ({args.before})",
              "reference": "data-selection 1.0.3 `HashedNgramDSIR`, `num_proc=1` (fit, weigh, resample)"}
    lines = ["| command (one core, fresh process, start to exit) | median s | min s | max s | runs | speed-up |",
             "|---|---|---|---|---|---|"]
    for key, t in res["times"].items():
        lines.append(f"| {labels[key]} | {med[key]:.2f} | {min(t):.2f} | {max(t):.2f} | {len(t)} | "
                     f"{med['reference'] / med[key]:.1f}x |")

    def part(fn) -> float:
        return statistics.median(fn(r) for r in res["inside"])

    phases = part(lambda r: r["fit_s"] + r["weights_s"] + r["select_s"] + r["write_s"])
    return "\n".join([
        *lines,
        "",
        f"- end to end, `compress select` takes **{med['ours']:.2f} s** against the reference package's "
        f"{med['reference']:.1f} s: **{med['reference'] / med['ours']:.1f}x** (median / median) on a "
        f"{res['docs']:,}-document pool ({res['mb']:.1f} MB JSONL, the first documents of the pool above), k={args.k}, "
        f"buckets={args.buckets}, min_length={MIN_LENGTH}, seed {args.seed}, a fresh cache folder per run.",
        f"- where ours spends it (medians over its runs, from selection.json): fit {part(lambda r: r['fit_s']):.2f} s "
        f"(the one pass that reads and featurizes the pool), weights {part(lambda r: r['weights_s']):.2f} s (from "
        f"the fit's features), select + write {part(lambda r: r['select_s'] + r['write_s']):.2f} s, weights.npy + "
        f"histogram {part(lambda r: r['total_s']) - phases:.2f} s; outside the selection (interpreter, imports, "
        f"argument checks, manifest) {part(lambda r: r['wall'] - r['total_s']):.2f} s.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref-python", default=None, help="python of a venv with data-selection==1.0.3 installed")
    ap.add_argument("--k", type=int, default=5000)
    ap.add_argument("--buckets", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for the corpus and outputs (default: a temporary one)")
    ap.add_argument("--write-results", action="store_true", help="write the DSIR section of bench/RESULTS.md")
    ap.add_argument("--e2e", action="store_true", help="time whole commands (ours vs the reference), one core")
    ap.add_argument("--e2e-docs", type=int, default=30_000, help="--e2e: pool documents (the first ones)")
    ap.add_argument("--repeats", type=int, default=5, help="--e2e: measured runs of each command")
    ap.add_argument("--before", help="--e2e: also time `python -m llm_compress.flows.cli select` in this source tree "
                    "(e.g. an earlier commit: git archive REV | tar -x -C DIR)")
    args = ap.parse_args()
    if args.e2e and not args.ref_python:
        ap.error("--e2e needs --ref-python")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-dsir-"))
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    corpus = build_corpus(work)
    print(f"corpus: {corpus}", flush=True)
    if args.e2e:
        res = run_e2e(args, work)
        text = e2e_report(res, args)
        print(text)
        if args.write_results:
            cmd = "python bench/bench_dsir.py " + " ".join(sys.argv[1:])
            _write_section(ROOT / "bench" / "RESULTS.md", "\n".join([
                E2E_HEADING, "",
                f"Command: `{cmd}`. {_machine(cores, load_before)} Each command is a fresh process pinned to core "
                f"{res['cpu']} (`os.sched_setaffinity`, as `taskset -c {res['cpu']}`), timed from start to exit "
                "(`selected.jsonl` written); the commands alternate, after one unmeasured run of each.", "",
                text, ""]), E2E_HEADING)
        return
    pool = load_texts(work / "pool.jsonl")
    target = load_texts(work / "target.jsonl")
    domain = np.array([json.loads(line)["domain"] == "docstring" for line in open(work / "pool.jsonl")])

    runs: dict[str, dict] = {}
    runs["ours fast, 1 proc"] = run_ours(work, "fast1", args.k, args.buckets, 1, "fast", args.seed)
    runs[f"ours fast, {cores} procs"] = run_ours(work, f"fast{cores}", args.k, args.buckets, cores, "fast", args.seed)
    runs["ours dsir-compat, 1 proc"] = run_ours(work, "compat1", args.k, args.buckets, 1, "dsir-compat", args.seed)
    if args.ref_python:
        runs["data-selection 1.0.3, 1 proc"] = run_reference(args.ref_python, work, "p1", args.k, args.buckets, 1,
                                                             args.seed)
        runs[f"data-selection 1.0.3, {cores} procs"] = run_reference(args.ref_python, work, f"p{cores}", args.k,
                                                                     args.buckets, cores, args.seed)
    judge = KLJudge(pool, target, args.buckets)
    for name, r in runs.items():
        r["kl"] = judge(r["ids"])
        r["precision"] = float(domain[r["ids"]].mean())
        print(name, {k: v for k, v in r.items() if k not in ("ids", "weights")}, flush=True)

    mb = corpus["pool_mb"]
    n = corpus["pool_docs"]
    # Reference timings by process count, for the speed-ratio column (same machine, same process count).
    ref_by_procs = {r["processes"]: r for name, r in runs.items() if name.startswith("data-selection")}
    lines = ["| run | weigh docs/s | weigh MB/s per core | weigh speed vs reference (same procs) | fit+weigh docs/s "
             "| fit s | weigh s | KL red. (fast feats) | KL red. (sha256 feats) | precision |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        ref = ref_by_procs.get(r["processes"])
        ratio = f"{ref['weights_s'] / r['weights_s']:.1f}x" if ref is not None else "n/a"
        lines.append(f"| {name} | {n / r['weights_s']:,.0f} | {mb / r['weights_s'] / r['processes']:.2f} | {ratio} | "
                     f"{n / (r['fit_s'] + r['weights_s']):,.0f} | {r['fit_s']:.1f} | {r['weights_s']:.1f} | "
                     f"{r['kl']['fast']:.3f} | {r['kl']['dsir-compat']:.3f} | {r['precision']:.3f} |")
    ref1 = ref_by_procs.get(1)
    ours1 = runs["ours fast, 1 proc"]
    summary = []
    if ref1 is not None:
        speed = ref1["weights_s"] / ours1["weights_s"]
        speed_all = (ref1["fit_s"] + ref1["weights_s"]) / (ours1["fit_s"] + ours1["weights_s"])
        compat = runs["ours dsir-compat, 1 proc"]["weights"]
        ref_w = ref1["weights"]
        finite = np.isfinite(compat)
        diff = float(np.abs(compat[finite] - ref_w[finite]).max())
        summary += [f"- featurize+weight throughput ratio (1 process, ours fast / reference): **{speed:.1f}x**; "
                    f"fit+weight: **{speed_all:.1f}x**; ours in dsir-compat mode: "
                    f"{ref1['weights_s'] / runs['ours dsir-compat, 1 proc']['weights_s']:.1f}x.",
                    f"- max |log weight (ours, dsir-compat) - log weight (reference)| over {int(finite.sum()):,} "
                    f"documents: **{diff:.2e}** (largest |log weight| {float(np.abs(ref_w).max()):.1f}).",
                    "- the two dsir-compat selections (ours, reference) differ only through the Gumbel noise (the "
                    "reference draws it from numpy's legacy global stream): KL reduction (sha256 features) "
                    f"{runs['ours dsir-compat, 1 proc']['kl']['dsir-compat']:.4f} vs {ref1['kl']['dsir-compat']:.4f}, "
                    f"precision {runs['ours dsir-compat, 1 proc']['precision']:.4f} vs {ref1['precision']:.4f}."]
    table = "\n".join(lines)
    print(table)
    print("\n".join(summary))
    if args.write_results:
        cmd = "python bench/bench_dsir.py " + " ".join(a for a in sys.argv[1:])
        text = "\n".join([
            "## DSIR",
            "",
            f"Command: `{cmd}` (the reference package in its own virtualenv: `python -m venv V && "
            "V/bin/pip install data-selection==1.0.3`, which brings nltk 3.10).",
            "",
            f"{_machine(cores, load_before)} Corpus from this Python's stdlib: pool "
            f"{n:,} documents ({mb:.1f} MB JSONL; {corpus['docstring_docs']:,} docstrings, the rest 20-line code "
            f"chunks), target {corpus['target_docs']:,} reference-manual paragraph groups ({corpus['target_mb']:.2f}"
            f" MB). k={args.k}, buckets={args.buckets}, unigrams+bigrams, min_length={MIN_LENGTH} tokens, no "
            "smoothing, raw fit on the whole pool. 'weigh' = the featurize+weight pass over the pool (reading and "
            "parsing the JSONL included), 'fit' = target + raw n-gram counts. KL reduction = KL(target||pool) - "
            "KL(target||selection) in nats, computed by one function for every selection in both hashed feature "
            "spaces. Precision = share of the selection that is docstrings (prose) rather than code.",
            "",
            table,
            "",
            *summary,
            "",
        ])
        _write_section(ROOT / "bench" / "RESULTS.md", text, "## DSIR")


def _machine(cores: int, load_before: float) -> str:
    return (f"Machine: {platform.processor() or platform.machine()}, {cores} cores, Python "
            f"{platform.python_version()}, numpy {np.__version__}; 1-minute load average {load_before:.1f} before "
            f"and {os.getloadavg()[0]:.1f} after the runs (other jobs shared the machine).")


E2E_HEADING = "### DSIR end to end: `compress select` vs the reference package"


def _write_section(path: Path, section: str, heading: str) -> None:
    """Replace the part of ``path`` under ``heading`` (up to the next heading of its level or above), or add it: a
    '##' section at the end, the '###' end-to-end subsection at the end of the '## DSIR' section. Other parts are
    left as they are, and rewriting '## DSIR' keeps its end-to-end subsection."""
    old = path.read_text() if path.exists() else ""

    def find(head: str) -> re.Match | None:
        level = len(head.split(" ")[0])
        return re.search(rf"^{re.escape(head)}\n.*?(?=^#{{2,{level}}} |\Z)", old, flags=re.S | re.M)

    m = find(heading)
    if heading == "## DSIR" and (sub := find(E2E_HEADING)):
        section = section.rstrip("\n") + "\n\n" + sub.group(0).rstrip("\n") + "\n"
    if m:
        new = old[:m.start()] + section + ("\n" if old[m.end():] else "") + old[m.end():]
    elif heading == E2E_HEADING and (top := find("## DSIR")):
        new = old[:top.end()].rstrip("\n") + "\n\n" + section + ("\n" if old[top.end():] else "") + old[top.end():]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "# Benchmark results\n\n") + section
    path.write_text(new)


if __name__ == "__main__":
    main()
