"""Data selection's throughput with 1, 2 and 4 workers: local processes vs a Dask vs a Ray local cluster.

    python bench/bench_scaleout.py [--gb 1.0] [--workers 1 2 4] [--kinds local dask ray] [--out ...]

The raw pool (at least ``--gb`` GB of JSONL) is made from the embedded corpus read with the installed packages'
sources (llm_compress.embedded.build_corpus with site_packages): its code, docstring and prose documents, written again
with a copy number in each text until the size is reached, so every shard's content (the shard cache's key) is
distinct. The target is the corpus' prose. Each (executor, workers) pair selects k documents into a fresh shard
cache, so every shard is computed; the figure is the end-to-end wall time of ``run_selection`` (fit, featurize +
weight every shard, resample) and the pool's MB/s, with the speed-up over one local worker and its efficiency
(speed-up / workers). A cluster's start-up is timed apart (``make_executor``) and not in the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_pool(work: Path, gb: float) -> tuple[Path, Path, dict]:
    """pool.jsonl of at least ``gb`` GB and target.jsonl (prose) under ``work``."""
    from llm_compress.embedded import build_corpus

    shutil.rmtree(work / "corpus", ignore_errors=True)
    (work / "corpus").mkdir()
    corpus = build_corpus(work / "corpus", max_mb=600, eval_fraction=0.01, seed=0, site_packages=True)
    docs = []
    for domain in corpus:
        with open(corpus[domain]["train"], encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f]
    pool, target = work / "pool.jsonl", Path(corpus["prose"]["eval"])
    size, copy = 0, 0
    with open(pool, "w", encoding="utf-8") as f:
        while size < gb * 1e9:
            for text in docs:
                line = json.dumps({"text": f"{text}\n# copy {copy}"}) + "\n"
                f.write(line)
                size += len(line.encode())
            copy += 1
    return pool, target, {"pool_bytes": pool.stat().st_size, "distinct_docs": len(docs), "copies": copy}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--kinds", nargs="*", default=["local", "ray", "dask"])
    ap.add_argument("-k", type=int, default=20_000)
    ap.add_argument("--work", default=None, help="folder for the pool (kept when given)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "scaleout.json"))
    args = ap.parse_args()

    from llm_compress.schema import ExecutorConfig
    from llm_compress.dsir import DSIRConfig, run_selection
    from llm_compress.dsir.executors import make_executor

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scaleout-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if (work / "pool.json").is_file():  # a pool made by an earlier run in this --work folder
        meta = json.loads((work / "pool.json").read_text())
        pool, target = work / "pool.jsonl", Path(meta.pop("target"))
    else:
        pool, target, meta = make_pool(work, args.gb)
        (work / "pool.json").write_text(json.dumps({**meta, "target": str(target)}))
        meta["build_seconds"] = round(time.perf_counter() - t, 1)
    mb = meta["pool_bytes"] / 1e6
    print(json.dumps(meta), flush=True)

    rows = []
    for kind in args.kinds:
        for n in args.workers:
            cache = work / f"cache-{kind}-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            cfg = DSIRConfig(k=args.k, processes=n, shard_bytes=32 * 2**20)
            t = time.perf_counter()
            ex = make_executor(ExecutorConfig(kind=kind, workers=n), [pool, target, cache])
            start_s = time.perf_counter() - t
            try:
                t = time.perf_counter()
                m = run_selection(cfg, [pool], [target], work / f"out-{kind}-{n}", cache_dir=cache, progress=False,
                                  executor=ex).metrics
                secs = time.perf_counter() - t
            finally:
                if ex is not None:
                    ex.close()
            rows.append({"executor": kind, "workers": n, "seconds": round(secs, 2), "mb_per_s": round(mb / secs, 1),
                         "startup_seconds": round(start_s, 2), "shards": m["shards"],
                         "ran_as": m["executor"], "processes": m["processes"]})
            shutil.rmtree(cache, ignore_errors=True)
            print(json.dumps(rows[-1]), flush=True)
    base = next((r["seconds"] for r in rows if r["executor"] == "local" and r["workers"] == 1), None)
    for r in rows:
        if base:
            r["speedup_vs_1_local"] = round(base / r["seconds"], 2)
            r["efficiency"] = round(base / r["seconds"] / r["workers"], 2)
    meta.update(machine=platform.platform(), cores=os.cpu_count(), k=args.k, when=time.strftime("%Y-%m-%d %H:%M"))
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
