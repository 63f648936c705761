"""DSIR selection: fit bag-of-n-gram models, weigh every raw document, resample k of them, report.

Phases (each a map over shards, run by :func:`run_shard`; results cached on disk per shard):

1. ``counts``: hashed n-gram counts [num_buckets] of every target shard and of the raw shards (or of the first
   ``raw_sample_docs`` raw documents, spread over shards in proportion to their size).
2. ``weights``: for every raw record, its log importance weight ``counts(x) . (log p_t - log p_raw)`` per target
   t, its token count and its status (read, or the reason it was skipped).
3. ``write``: the selected records' original rows, and the n-gram counts of the selection (for the KL metric).

Selection runs in the calling process between phases 2 and 3 (Gumbel top-k over one float per record).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np

from llm_compress.dsir import sources
from llm_compress.dsir.config import DSIRConfig, TargetSpec
from llm_compress.dsir.features import ENGINE, Batch, Featurizer
from llm_compress.dsir.sources import OK, REASONS, TOO_SHORT, Shard
from llm_compress.errors import InputError
from llm_compress.io import stable_hash, write_json_atomic
from llm_compress.progress import report as report_progress
from llm_compress.result import StageResult

EPS = 1e-8  # added inside every log, as in the reference package (empty buckets stay finite)
FORMAT_VERSION = 1  # bump when a cached shard result's layout or meaning changes
_SRC = Path(__file__).resolve().parent
# Cache keys include the feature code itself, so editing the tokenizer/hash/readers invalidates old entries.
CODE_DIGEST = hashlib.sha256(b"".join((_SRC / f).read_bytes() for f in ("features.py", "sources.py"))).hexdigest()[:16]
# processes=None (automatic): worker processes only when this many input bytes could run beside the largest shard.
# Spawned workers take 0.3-0.7 s to their first shard (interpreter, numpy, this package; measured on 2 cores), the
# time one core featurizes 13-30 MB, and one shard's bytes run on one core however many workers there are: below
# this, workers would save less than they cost (a pool of one shard, a small pool with a small target).
POOL_MIN_BYTES = 32 << 20


# -- shard jobs -------------------------------------------------------------------------------


@dataclass
class ShardTask:
    """One unit of work, picklable: everything a worker (process, Dask worker) needs, no shared state."""

    op: Literal["counts", "weights", "write"]
    shard: Shard
    feat: dict[str, Any]  # num_buckets, ngrams, hash, text_field, max_doc_bytes, batch_chars
    out_path: str  # where the worker writes its result (.npz; a .jsonl next to it for "write")
    quota: int | None = None  # counts: stop after this many readable documents
    log_diff: np.ndarray | None = None  # weights: [T, num_buckets] float64
    picks: np.ndarray | None = None  # write: [m, 2] int64 (local record index ascending, target index)
    n_targets: int = 1
    dataset: Any = None  # the datasets.Dataset of an "hf" shard made from an in-memory object
    index: int = 0  # position in its phase, to put results back in order
    # In-process runs only (never sent to a worker): a "counts" task appends every batch's (statuses, positions of
    # the readable records, features or None) here, and the "weights" task of the same shard reads them back.
    kept: list[tuple[list[int], list[int], Batch | None]] | None = None


_FEATURIZERS: dict[tuple, Featurizer] = {}  # per process: the dsir-compat sha256 cache lives on across shards


def _featurizer(feat: dict[str, Any]) -> Featurizer:
    key = (feat["num_buckets"], feat["ngrams"], feat["hash"])
    if key not in _FEATURIZERS:
        _FEATURIZERS[key] = Featurizer(*key)
    return _FEATURIZERS[key]


def _batched(blocks: Iterable[list[tuple[int, str | None, str]]], batch_chars: int, quota: int | None = None
             ) -> Iterator[tuple[list[int], list[str], list[int]]]:
    """Regroup record blocks into (statuses, texts of the readable records, their positions in the statuses) of
    about ``batch_chars`` characters; with ``quota``, stop after that many readable records."""
    status: list[int] = []
    texts: list[str] = []
    where: list[int] = []
    chars = 0
    used = 0
    for block in blocks:
        for st, text, _ in block:
            if quota is not None and used >= quota:
                break
            status.append(st)
            if st == OK:
                texts.append(text)
                where.append(len(status) - 1)
                chars += len(text)
                used += 1
                if chars >= batch_chars:
                    yield status, texts, where
                    status, texts, where, chars = [], [], [], 0
        if quota is not None and used >= quota:
            break
    if status:
        yield status, texts, where


def run_shard(task: ShardTask) -> dict[str, Any]:
    """Compute one shard's result, write it atomically to ``task.out_path`` and return a small summary.

    A plain top-level function of picklable arguments: it runs the same in-process, in a spawned worker, or as a
    Prefect task on a Dask worker.
    """
    t0 = time.perf_counter()
    fz = _featurizer(task.feat)
    op = {"counts": _count_shard, "weights": _weigh_shard, "write": _write_shard}[task.op]
    _save_npz(task.out_path, op(task, fz))
    return {"index": task.index, "seconds": time.perf_counter() - t0, "bytes": task.shard.size}


def _blocks(task: ShardTask):
    return sources.iter_record_blocks(task.shard, task.feat["text_field"], task.feat["max_doc_bytes"], task.dataset)


def _count_shard(task: ShardTask, fz: Featurizer) -> dict[str, np.ndarray]:
    """n-gram counts [B] of the shard's readable records (the first ``quota`` of them) and status counts."""
    counts = np.zeros(fz.num_buckets, dtype=np.int64)
    status_hist = np.zeros(len(REASONS) + 1, dtype=np.int64)  # [status codes] records per status
    for status, texts, where in _batched(_blocks(task), task.feat["batch_chars"], task.quota):
        status_hist += np.bincount(status, minlength=len(status_hist))
        batch = fz.featurize(texts) if texts else None
        if batch is not None:
            counts += np.bincount(batch.bucket, minlength=fz.num_buckets)
        if task.kept is not None:  # int32 halves the memory; the weights come out the same
            small = None if batch is None else Batch(batch.doc.astype(np.int32), batch.bucket.astype(np.int32),
                                                     batch.n_words)
            task.kept.append((status, where, small))
    return {"counts": counts, "status_hist": status_hist}


def _weigh_shard(task: ShardTask, fz: Featurizer) -> dict[str, np.ndarray]:
    """Per record: status [n] uint8, token count [n] and log weights [n, T] (NaN where unreadable)."""
    assert task.log_diff is not None
    n_t = task.log_diff.shape[0]
    st_parts, nw_parts, lw_parts = [np.zeros(0, np.uint8)], [np.zeros(0, np.int64)], [np.zeros((0, n_t))]
    batches = task.kept if task.kept is not None else (
        (status, where, fz.featurize(texts) if texts else None)
        for status, texts, where in _batched(_blocks(task), task.feat["batch_chars"]))
    for status, where, batch in batches:
        st = np.asarray(status, dtype=np.uint8)
        nw = np.zeros(len(st), dtype=np.int64)
        lw = np.full((len(st), n_t), np.nan)
        if batch is not None:
            nw[where] = batch.n_words
            lw[where] = fz.log_weights(batch, task.log_diff, len(where))
        st_parts.append(st)
        nw_parts.append(nw)
        lw_parts.append(lw)
    return {"status": np.concatenate(st_parts), "n_words": np.concatenate(nw_parts), "logw": np.concatenate(lw_parts)}


def _write_shard(task: ShardTask, fz: Featurizer) -> dict[str, np.ndarray]:
    """Write the picked records' rows to ``out_path``.jsonl; count their n-grams per target ([T, B])."""
    picks = task.picks if task.picks is not None else np.zeros((0, 2), dtype=np.int64)
    sel_counts = np.zeros((task.n_targets, fz.num_buckets), dtype=np.int64)
    target_of = dict(zip(picks[:, 0].tolist(), picks[:, 1].tolist()))
    texts: list[list[str]] = [[] for _ in range(task.n_targets)]
    chars = [0] * task.n_targets
    feat = task.feat
    with open(task.out_path + ".jsonl", "w", encoding="utf-8") as f:
        for i, st, text, row in sources.iter_picked(task.shard, feat["text_field"], feat["max_doc_bytes"],
                                                    picks[:, 0].tolist(), task.dataset):
            if st != OK:  # the input changed between passes; the cache key should have prevented this
                raise InputError(f"{task.shard.path}: record {i} is no longer readable; the input changed during "
                                 "the selection (rerun)")
            t = target_of[i]
            f.write(row + "\n")
            texts[t].append(text)
            chars[t] += len(text)
            if chars[t] >= feat["batch_chars"]:
                sel_counts[t] += fz.counts(texts[t])
                texts[t], chars[t] = [], 0
    for t in range(task.n_targets):
        if texts[t]:
            sel_counts[t] += fz.counts(texts[t])
    return {"sel_counts": sel_counts}


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: an interrupted worker never leaves a truncated cache entry under the final name."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError):
        return None  # missing or unreadable: recompute


# -- executors --------------------------------------------------------------------------------

MapFn = Callable[[Callable[[ShardTask], dict], list[ShardTask]], Iterable[dict]]


def inline_map(fn: Callable[[ShardTask], dict], tasks: list[ShardTask]) -> Iterator[dict]:
    """Run tasks one after the other in this process (``processes=1``)."""
    for t in tasks:
        yield fn(t)


class _PoolMap:
    """Runs tasks on a spawned process pool, created on first use and reused across phases."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.pool = None  # a ProcessPoolExecutor once started

    def __call__(self, fn, tasks: list[ShardTask]) -> Iterator[dict]:
        if len(tasks) <= 1:
            yield from inline_map(fn, tasks)
            return
        # Imported here: a run that stays in-process never pays for the multiprocessing machinery.
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        if self.pool is None:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            self.pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=get_context("spawn"))
        pending = {self.pool.submit(fn, t) for t in tasks}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        yield fut.result()  # re-raises a worker's exception here
                    except BrokenProcessPool:
                        raise RuntimeError(
                            "a DSIR worker process died (out of memory, or the calling script has no "
                            "`if __name__ == '__main__':` guard, which spawned workers need); finished shards are "
                            "cached, rerun with processes=1 or fewer processes") from None
        finally:
            for fut in pending:
                fut.cancel()  # on failure: queued shards are dropped, running ones finish and stay cached

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- the selection ----------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    items: list[Any]
    proportion: float | None
    shards: list[tuple[Shard, Any]] = field(default_factory=list)  # (shard, in-memory dataset or None)


def _targets(cfg: DSIRConfig, targets: list[Any]) -> list[_Target]:
    if not targets:
        raise InputError("no target data given: pass at least one target file")
    out: list[_Target] = []
    for t in targets:
        if isinstance(t, TargetSpec):
            items, prop, name = list(t.paths), t.proportion, t.name
        elif isinstance(t, dict):
            spec = TargetSpec(**t)
            items, prop, name = list(spec.paths), spec.proportion, spec.name
        elif isinstance(t, (list, tuple)):
            items, prop, name = list(t), None, None
        else:
            items, prop, name = [t], None, None
        if not items:
            raise InputError("a target has no inputs")
        first = items[0]
        label = name or (Path(first).stem if isinstance(first, (str, os.PathLike)) else type(first).__name__)
        out.append(_Target(label, sources.expand_inputs(items, f"target '{label}'"), prop))
    if cfg.pool_targets and len(out) > 1:
        out = [_Target("+".join(t.name for t in out), [i for t in out for i in t.items], None)]
    props = [t.proportion for t in out]
    if cfg.target_proportions is not None:
        if any(p is not None for p in props):
            raise InputError("target proportions given twice: in target_proportions and in a target spec")
        if len(cfg.target_proportions) != len(out):
            raise InputError(f"target_proportions has {len(cfg.target_proportions)} values for {len(out)} "
                             f"target(s) ({', '.join(t.name for t in out)})")
        for t, p in zip(out, cfg.target_proportions):
            t.proportion = float(p)
    elif any(p is not None for p in props) and any(p is None for p in props):
        raise InputError("give a proportion for every target or for none")
    return out


def _skips(status_hist: np.ndarray) -> dict[str, int]:
    return {name: int(status_hist[code]) for code, name in REASONS.items()}


def _describe(status_hist: np.ndarray) -> str:
    skipped = ", ".join(f"{k}={v}" for k, v in _skips(status_hist).items() if v)
    return f"{int(status_hist.sum())} records" + (f"; skipped {skipped}" if skipped else "")


def kl_div(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats over hashed feature distributions (both [B], summing to 1), EPS inside the logs."""
    return float(np.sum(p * (np.log(p + EPS) - np.log(q + EPS))))


def gumbel_top_k(logw: np.ndarray, k: int, rng: np.random.Generator | None) -> np.ndarray:
    """Indices of k items drawn without replacement with probability ~ exp(logw): Gumbel-perturbed top-k.

    ``rng=None`` gives deterministic top-k. Ties (and ``-inf`` entries) are broken by lower index. Returns sorted [k].
    """
    w = logw if rng is None else logw + rng.gumbel(size=logw.shape)
    n = len(w)
    if k >= n:
        return np.arange(n)
    thr = np.partition(w, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(w > thr)
    ties = np.flatnonzero(w == thr)[: k - len(above)]
    return np.sort(np.concatenate([above, ties]))


@dataclass
class _Fit:
    """Phase 1 output: target counts [T, B], their status counts [T, S], raw counts [B], raw status counts [S],
    the distributions p_tgt [T, B] (smoothed) and p_raw [B], log_diff = log p_tgt - log p_raw [T, B], and the raw
    shards' kept features."""

    tgt_counts: np.ndarray
    tgt_hist: np.ndarray
    raw_counts: np.ndarray
    raw_hist: np.ndarray
    p_tgt: np.ndarray
    p_raw: np.ndarray
    log_diff: np.ndarray
    kept: list[list | None]  # [raw shards] the features a raw shard's counts task kept (ShardTask.kept), or None


@dataclass
class _Weights:
    """Phase 2 output over all N raw records: status [N] uint8, token counts [N], log weights [N, T], first record
    of each shard [shards + 1], and the records / input bytes computed (not loaded from the cache) in this run."""

    status: np.ndarray
    n_words: np.ndarray
    logw: np.ndarray
    offsets: np.ndarray
    computed_docs: int
    computed_bytes: int


@dataclass
class _Run:
    """What every phase needs: settings, inputs, cache folder, executor and counters."""

    cfg: DSIRConfig
    feat: dict[str, Any]
    feat_key: dict[str, Any]
    raw_items: list[Any]
    raw_shards: list[tuple[Shard, Any]]
    targets: list[_Target]
    root: Path
    executor: MapFn
    progress: bool
    cache: dict[str, int] = field(default_factory=lambda: {"counts_hits": 0, "counts_computed": 0,
                                                           "weights_hits": 0, "weights_computed": 0})

    def path(self, op: str, **parts: Any) -> str:
        """Cache file of one shard result: keyed by the op, the shard identity, the settings and ``parts``."""
        (self.root / op).mkdir(parents=True, exist_ok=True)
        return str(self.root / op / f"{stable_hash({'op': op, **parts, 'feat': self.feat_key})}.npz")


def run_selection(cfg: DSIRConfig, raw: list[str | Path], targets: list[Any], out_dir: Path,
                  cache_dir: Path | None = None, progress: bool = True, executor: MapFn | None = None) -> StageResult:
    """Select ``cfg.k`` documents of ``raw`` that resemble ``targets`` (importance resampling); write into ``out_dir``.

    ``raw``: JSONL / .txt / Parquet files (``.gz`` for JSONL/.txt), folders of them, ``save_to_disk`` dataset folders
    or ``datasets.Dataset`` objects. ``targets``: one entry per target: a path, a list of paths, a
    :class:`TargetSpec` (or its dict). ``cache_dir``: per-shard results, reused by a rerun (resume); ``None`` uses
    a temporary folder removed at the end. ``executor``: ``map(fn, tasks)`` replacement (e.g. Prefect + Dask);
    default: a spawned process pool of ``cfg.processes`` workers (in-process when that is 1); with
    ``cfg.processes=None``, all usable cores when the input is large enough to pay for starting them
    (:data:`POOL_MIN_BYTES`), in-process otherwise.

    Writes ``selected.jsonl`` (original rows, in pool order), ``selected_ids.npy`` ([k] int64 record indices),
    ``weights.npy`` ([N] float64, or [N, T] for several targets; NaN for unreadable records),
    ``weights_hist.png`` and ``selection.json`` (the metrics). Bad input raises :class:`InputError` or is counted.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processes = cfg.processes or usable_cores()
    feat = {"num_buckets": cfg.num_buckets, "ngrams": cfg.ngrams, "hash": cfg.hash, "text_field": cfg.text_field,
            "max_doc_bytes": cfg.max_doc_bytes, "batch_chars": cfg.batch_chars}
    # batch_chars changes speed only, so it stays out of cache keys; the code digest and regex engine go in.
    feat_key = {k: v for k, v in feat.items() if k != "batch_chars"} | \
        {"code": CODE_DIGEST, "engine": ENGINE, "v": FORMAT_VERSION}

    raw_items = sources.expand_inputs(list(raw), "raw pool")
    if not raw_items:
        raise InputError("empty raw pool: no raw input given")
    tgts = _targets(cfg, list(targets))
    raw_shards = _shards(raw_items, cfg.shard_bytes)
    for t in tgts:
        t.shards = _shards(t.items, cfg.shard_bytes)
    timings["plan_s"] = time.perf_counter() - t_start

    own_cache = cache_dir is None
    root = Path(tempfile.mkdtemp(prefix="dsir-cache-")) if own_cache else Path(cache_dir)
    pool = None
    if executor is None:
        if cfg.processes is None and _spare_bytes(raw_shards, tgts) < POOL_MIN_BYTES:
            processes = 1  # automatic: too little input beside the largest shard to pay for starting workers
        pool = _PoolMap(processes) if processes > 1 else None
        executor = pool or inline_map
    run = _Run(cfg, feat, feat_key, raw_items, raw_shards, tgts, root, executor, progress)
    try:
        t0 = time.perf_counter()
        fit = _fit(run)
        timings["fit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wts = _weigh(run, fit.log_diff, fit.kept)
        kept_shards = sum(k is not None for k in fit.kept)
        fit.kept = []  # free the features
        timings["weights_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assigned, k_per, props, raw_hist = _select(run, fit, wts)
        timings["select_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sel_counts = _write(run, wts.offsets, assigned, out_dir / "selected.jsonl")
        timings["write_s"] = time.perf_counter() - t0
    finally:
        if pool is not None:
            pool.close()
        if own_cache:
            shutil.rmtree(root, ignore_errors=True)

    selected = np.flatnonzero(assigned >= 0)  # [k] ascending
    n_t = len(tgts)
    eligible = wts.status == OK
    readable = eligible | (wts.status == TOO_SHORT)
    weights_out = np.where(readable[:, None], wts.logw, np.nan)  # [N, T]
    _save_npy(out_dir / "weights.npy", weights_out[:, 0] if n_t == 1 else weights_out)
    _save_npy(out_dir / "selected_ids.npy", selected.astype(np.int64))
    _histogram(out_dir / "weights_hist.png", wts.logw, eligible, assigned, [t.name for t in tgts])

    # KL(p_t || p_raw) - KL(p_t || p_selected): the paper's KL reduction, per target and averaged.
    p_sel = sel_counts.sum(axis=0) / max(int(sel_counts.sum()), 1)  # [B]
    per_target = []
    for ti, t in enumerate(tgts):
        own = sel_counts[ti] / max(int(sel_counts[ti].sum()), 1)
        kl_raw = kl_div(fit.p_tgt[ti], fit.p_raw)
        kl_sel = kl_div(fit.p_tgt[ti], p_sel)
        per_target.append({"name": t.name, "inputs": [str(i) for i in t.items], "proportion": float(props[ti]),
                           "k": int(k_per[ti]), "records": int(fit.tgt_hist[ti].sum()),
                           "skipped": _skips(fit.tgt_hist[ti]), "ngrams": int(fit.tgt_counts[ti].sum()),
                           "kl_target_raw": kl_raw, "kl_target_selected": kl_sel, "kl_reduction": kl_raw - kl_sel,
                           "kl_reduction_own_selection": kl_raw - kl_div(fit.p_tgt[ti], own)})
    timings["total_s"] = time.perf_counter() - t_start
    wsec = timings["weights_s"]
    metrics = {
        "k": cfg.k, "selected": int(len(selected)), "raw_records": int(len(wts.status)),
        "eligible": int(eligible.sum()), "skipped": _skips(raw_hist),
        "kl_reduction": float(np.mean([t["kl_reduction"] for t in per_target])),
        "targets": per_target,
        "raw_ngrams_fitted": int(fit.raw_counts.sum()),
        "log_weight_mean_eligible": [float(wts.logw[eligible, ti].mean()) for ti in range(n_t)],
        "log_weight_mean_selected": [float(wts.logw[assigned == ti, ti].mean()) if k_per[ti] else None
                                     for ti in range(n_t)],
        "shards": len(raw_shards),
        "executor": "pool" if pool is not None else (
            "inline" if executor is inline_map else getattr(executor, "kind", "custom")),
        "processes": processes if pool is not None else (
            1 if executor is inline_map else getattr(executor, "workers", None)),
        "cache": run.cache, "cache_dir": None if own_cache else str(root),
        "features_kept_shards": kept_shards,  # raw shards read and featurized once, not twice (in-process)
        "timings": timings,
        "weights_docs_per_s": wts.computed_docs / wsec if wts.computed_docs and wsec > 0 else None,
        "weights_mb_per_s": wts.computed_bytes / 1e6 / wsec if wts.computed_docs and wsec > 0 else None,
        "tokenizer_engine": ENGINE,
        "config": cfg.model_dump(),
    }
    write_json_atomic(out_dir / "selection.json", metrics)
    outputs = {"selected": "selected.jsonl", "selected_ids": "selected_ids.npy", "weights": "weights.npy",
               "histogram": "weights_hist.png", "summary": "selection.json"}
    return StageResult(outputs=outputs, metrics=metrics)


def _shards(items: list[Any], shard_bytes: int) -> list[tuple[Shard, Any]]:
    """(shard, in-memory dataset or None) for every input, in order."""
    return [(s, None if isinstance(i, (str, os.PathLike)) else i)
            for i in items for s in sources.plan_shards(i, shard_bytes)]


def _spare_bytes(raw_shards: list[tuple[Shard, Any]], tgts: list[_Target]) -> int:
    """Input bytes of the largest phase (the fit: targets and raw) that could run beside its largest shard."""
    sizes = [s.size for s, _ in raw_shards] + [s.size for t in tgts for s, _ in t.shards]
    return sum(sizes) - max(sizes, default=0)


def _fit(run: _Run) -> _Fit:
    """Phase 1: n-gram counts of every target shard and of the raw shards (or a size-proportional sample)."""
    cfg = run.cfg
    total = sum(s.size for s, _ in run.raw_shards) or 1
    jobs: list[tuple[int, Shard, Any, int | None]] = []  # (target index or -1 for raw, shard, dataset, quota)
    for ti, t in enumerate(run.targets):
        jobs += [(ti, s, ds, None) for s, ds in t.shards]
    for s, ds in run.raw_shards:
        quota = None if cfg.raw_sample_docs is None else max(1, math.ceil(cfg.raw_sample_docs * s.size / total))
        jobs.append((-1, s, ds, quota))
    tasks = [ShardTask("counts", s, run.feat, run.path("counts", shard=s.ident, quota=q), quota=q, dataset=ds, index=j)
             for j, (_, s, ds, q) in enumerate(jobs)]
    # In-process, the whole raw pool fitted: keep the features of the first shards (plain text, whose size bounds
    # the memory) for the weights pass, so those are read and featurized once.
    budget = cfg.keep_features_bytes if run.executor is inline_map and cfg.raw_sample_docs is None else 0
    first_raw = len(tasks) - len(run.raw_shards)
    raw_tasks = tasks[first_raw:]
    for t in raw_tasks:
        if t.shard.kind == "lines" and not t.shard.gz and t.shard.size <= budget:
            t.kept, budget = [], budget - t.shard.size
    results = _run_phase("counts", tasks, run)
    # A shard loaded from the cache filled nothing: its weights pass reads the input.
    kept = [None if r.get("_cached") else t.kept for t, r in zip(raw_tasks, results[first_raw:])]
    n_t, n_s = len(run.targets), len(REASONS) + 1
    tgt_counts = np.zeros((n_t, cfg.num_buckets), dtype=np.int64)
    tgt_hist = np.zeros((n_t, n_s), dtype=np.int64)
    raw_counts = np.zeros(cfg.num_buckets, dtype=np.int64)
    raw_hist = np.zeros(n_s, dtype=np.int64)
    for (ti, *_), res in zip(jobs, results):
        if ti >= 0:
            tgt_counts[ti] += res["counts"]
            tgt_hist[ti] += res["status_hist"]
        else:
            raw_counts += res["counts"]
            raw_hist += res["status_hist"]
    for ti, t in enumerate(run.targets):
        if tgt_counts[ti].sum() == 0:
            raise InputError(f"empty target '{t.name}' ({', '.join(map(str, t.items))}): no usable text "
                             f"({_describe(tgt_hist[ti])}; text_field='{cfg.text_field}')")
    if raw_counts.sum() == 0:
        raise InputError(f"empty raw pool ({', '.join(map(str, run.raw_items))}): no usable text "
                         f"({_describe(raw_hist)}; text_field='{cfg.text_field}')")
    p_raw = raw_counts / raw_counts.sum()  # [B], no smoothing (as the reference)
    smoothed = tgt_counts + cfg.laplace  # [T, B]
    p_tgt = smoothed / smoothed.sum(axis=1, keepdims=True)
    log_diff = np.log(p_tgt + EPS) - np.log(p_raw + EPS)  # [T, B]
    return _Fit(tgt_counts, tgt_hist, raw_counts, raw_hist, p_tgt, p_raw, log_diff, kept)


def _weigh(run: _Run, log_diff: np.ndarray, kept: list[list | None]) -> _Weights:
    """Phase 2: status, token count and log weight of every raw record, shard by shard (from the features the fit
    kept, where it kept them)."""
    digest = hashlib.sha256(np.ascontiguousarray(log_diff).tobytes()).hexdigest()
    tasks = [ShardTask("weights", s, run.feat, run.path("weights", shard=s.ident, log_diff=digest), log_diff=log_diff,
                       dataset=ds, index=j, kept=kept[j]) for j, (s, ds) in enumerate(run.raw_shards)]
    results = _run_phase("weights", tasks, run)
    fresh = [(t, r) for t, r in zip(tasks, results) if not r.get("_cached")]
    return _Weights(status=np.concatenate([r["status"] for r in results]),
                    n_words=np.concatenate([r["n_words"] for r in results]),
                    logw=np.concatenate([r["logw"] for r in results]),
                    offsets=np.cumsum([0] + [len(r["status"]) for r in results]),
                    computed_docs=sum(len(r["status"]) for _, r in fresh),
                    computed_bytes=sum(t.shard.size for t, _ in fresh))


def _select(run: _Run, fit: _Fit, wts: _Weights) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """Apply the length filter, split k over targets and draw. Returns (target index per record [N], -1 if not
    selected; k per target; proportions [T]; status counts [S] after the filter)."""
    cfg = run.cfg
    n = len(wts.status)
    if n == 0:
        raise InputError(f"empty raw pool: {', '.join(map(str, run.raw_items))} hold no records")
    wts.status[(wts.status == OK) & (wts.n_words < cfg.min_length)] = TOO_SHORT
    eligible = wts.status == OK
    hist = np.bincount(wts.status, minlength=len(REASONS) + 1)
    n_eligible = int(eligible.sum())
    if n_eligible == 0:
        raise InputError(f"empty raw pool: no document passes the filters ({_describe(hist)}; "
                         f"min_length={cfg.min_length} tokens)")
    if cfg.k > n_eligible:
        raise InputError(f"k={cfg.k} is larger than the pool: only {n_eligible} eligible documents "
                         f"({_describe(hist)}; min_length={cfg.min_length} tokens)")
    # Default proportions: each target's share of all target n-grams (the reference's choice).
    props = np.array([t.proportion if t.proportion is not None else float(fit.tgt_counts[i].sum())
                      for i, t in enumerate(run.targets)], dtype=np.float64)
    props = props / props.sum()
    k_per = [int(cfg.k * p) for p in props]
    k_per[-1] += cfg.k - sum(k_per)
    rng = None if cfg.deterministic else np.random.default_rng(cfg.seed)
    assigned = np.full(n, -1, dtype=np.int64)  # [N]
    for ti, kt in enumerate(k_per):
        if kt:  # later targets draw from what earlier ones left
            w = np.where(eligible & (assigned < 0), wts.logw[:, ti], -np.inf)
            assigned[gumbel_top_k(w, kt, rng)] = ti
    return assigned, k_per, props, hist


def _write(run: _Run, offsets: np.ndarray, assigned: np.ndarray, dest: Path) -> np.ndarray:
    """Phase 3: write the selected rows (pool order) to ``dest``; return their n-gram counts per target [T, B]."""
    n_t = len(run.targets)
    parts = run.root / f"parts-{uuid.uuid4().hex[:8]}"
    parts.mkdir(parents=True)
    try:
        tasks = []
        for j, (s, ds) in enumerate(run.raw_shards):
            local = np.flatnonzero(assigned[offsets[j]:offsets[j + 1]] >= 0)  # [m] ascending
            if len(local):
                picks = np.stack([local, assigned[offsets[j] + local]], axis=1)  # [m, 2]
                tasks.append(ShardTask("write", s, run.feat, str(parts / f"{j:06d}"), picks=picks, n_targets=n_t,
                                       dataset=ds, index=j))
        results = _run_phase("write", tasks, run)
        sel_counts = np.zeros((n_t, run.cfg.num_buckets), dtype=np.int64)
        for r in results:
            sel_counts += r["sel_counts"]
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as out:
            for t in tasks:
                with open(t.out_path + ".jsonl", "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return sel_counts


def _run_phase(name: str, tasks: list[ShardTask], run: _Run) -> list[dict[str, np.ndarray]]:
    """Load cached shard results, compute the rest with ``executor``; results in task order."""
    results: list[dict | None] = [None] * len(tasks)
    pos = {t.index: i for i, t in enumerate(tasks)}
    todo = []
    for i, t in enumerate(tasks):
        got = _load_npz(Path(t.out_path)) if t.op != "write" else None  # written rows are never cached
        if got is not None:
            got["_cached"] = True
            results[i] = got
        else:
            todo.append(t)
    if name in ("counts", "weights"):
        run.cache[f"{name}_hits"] += len(tasks) - len(todo)
        run.cache[f"{name}_computed"] += len(todo)
    bar = None
    if run.progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"dsir {name}", unit="shard")
    done = 0
    try:
        for summary in run.executor(run_shard, todo):
            i = pos[summary["index"]]
            got = _load_npz(Path(tasks[i].out_path))
            if got is None:
                raise RuntimeError(f"shard result missing after {name}: {tasks[i].out_path}")
            results[i] = got
            if bar is not None:
                bar.update(1)
            done += 1
            report_progress(done / len(todo), f"dsir {name}: shard {done}/{len(todo)}")
    finally:
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _histogram(path: Path, logw: np.ndarray, eligible: np.ndarray, assigned: np.ndarray, names: list[str]) -> None:
    """Histogram of log weights, all eligible vs selected, one panel per target (:mod:`llm_compress.dsir.plot`)."""
    from llm_compress.dsir.plot import weights_histogram

    weights_histogram(path, [(f"log importance weight (target '{name}')",
                              [("all eligible", logw[eligible, ti]), ("selected", logw[assigned == ti, ti])])
                             for ti, name in enumerate(names)])
