"""DSIR: data selection for language models via importance resampling (Xie et al. 2023).

Pick ``k`` documents of a large raw pool whose hashed n-gram distribution looks like a target set's::

    from llm_compress.dsir import DSIRConfig, run_selection
    res = run_selection(DSIRConfig(k=10_000), raw=["pool.jsonl"], targets=["target.jsonl"], out_dir=Path("sel"),
                        cache_dir=Path("cache/dsir"))
    res.metrics["kl_reduction"]

Method. Features are hashed unigram + bigram counts of the lowercased word/punctuation tokens
(:mod:`llm_compress.dsir.features`). Bag-of-n-gram models are fitted on the target(s) ``p_t`` (optionally Laplace
smoothed) and on the raw pool ``p_raw`` (or a sample of it); a document's log importance weight is
``counts(x) . (log p_t - log p_raw)``. k documents are drawn without replacement in proportion to ``exp(weight)``
by Gumbel top-k (seeded), or deterministic top-k; documents shorter than ``min_length`` tokens are never drawn.
With several targets, k is split by proportion and each target draws from what the earlier ones left. The
report gives ``KL(p_t || p_raw) - KL(p_t || p_selected)`` (the paper's KL reduction, averaged over targets).

Scale. Inputs are cut into shards (byte ranges of JSONL/.txt files, row groups of Parquet, row ranges of
datasets) and streamed in bounded memory; every shard's result is cached on disk under a key made of the
shard's identity (path, size, mtime, range, edge digest / dataset fingerprint) and the settings, so a rerun of an
interrupted selection recomputes only the shards that had not finished. ``hash="dsir-compat"`` reproduces the
reference package ``data-selection`` 1.0.3 (nltk WordPunct tokens, sha256 buckets) to float round-off.

Use the same ``spawn``-safe entry point rules as any multiprocessing code: call :func:`run_selection` from under
``if __name__ == "__main__":`` in a script (workers re-import the main module).

Dask or Ray from the recipe
---------------------------
``runtime.executor`` (kind ``dask`` or ``ray``, an ``address`` or a local cluster of ``workers``) makes the select
stage pass :mod:`llm_compress.dsir.executors`' map, which checks that every worker sees the inputs and the cache first.

Dask through Prefect, by hand
-----------------------------
Every unit of work is ``run_shard(ShardTask) -> dict``: a top-level function whose argument is picklable and
self-contained (the shard's location, the settings, the fitted log-ratio array), which reads its input from
shared storage and writes its result into the cache folder. ``run_selection`` takes an ``executor`` -- any
``map(fn, tasks)`` that yields ``fn(task)`` for every task, in any order -- so a Prefect flow can send the shards
to Dask workers with prefect-dask's ``DaskTaskRunner`` (tested with ``prefect-dask==0.3.7``, which brings
``dask``/``distributed`` 2026.8.0 and leaves prefect 3.8.8 and fastapi 0.150.0 as they are)::

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner
    from llm_compress.dsir import DSIRConfig, run_selection, run_shard

    # NO_CACHE: the shard cache is DSIR's own; Prefect need not hash the numpy arrays inside a ShardTask.
    shard_task = task(run_shard, name="dsir-shard", retries=2, cache_policy=NO_CACHE)

    def dask_map(fn, tasks):                      # called inside the flow, once per phase
        return [f.result() for f in shard_task.map(tasks)]

    @flow(task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 8, "threads_per_worker": 1}))
    def select(raw, targets, out, cache):
        return run_selection(DSIRConfig(k=100_000), raw, targets, out, cache_dir=cache, executor=dask_map).metrics

``cluster_kwargs`` goes to ``distributed.LocalCluster`` (one process per worker: the featurizer is numpy code
that holds the GIL between calls, so use ``threads_per_worker=1``); pass ``address="tcp://scheduler:8786"``
instead to use an existing cluster, whose workers must see the same input and cache paths. Prefect's task
retries then retry a failed shard, and the on-disk cache still makes a rerun of the whole flow skip finished
shards. Without Prefect, the default executor is a local ``ProcessPoolExecutor`` (spawn) of ``processes``
workers; with ``processes=None`` a small input (under ``core.POOL_MIN_BYTES`` beside its largest shard, e.g. a
pool of one shard) runs in-process instead, where starting workers would cost more than they save.
"""

# Exports load on first use (PEP 562), so ``import llm_compress.dsir.config`` (a recipe's schema) stays free of numpy
# and of the selection code, and a command pays for what it touches only.
_EXPORTS = {"DSIRConfig": "config", "TargetSpec": "config", "run_selection": "core", "run_shard": "core",
            "ShardTask": "core", "inline_map": "core", "gumbel_top_k": "core", "kl_div": "core",
            "Featurizer": "features", "fast_key": "features", "sha256_bucket": "features", "tokenize": "features"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    return value
