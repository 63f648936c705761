"""Where DSIR's shards run, as the recipe's ``runtime.executor`` says: local processes (the default, ``core._PoolMap``),
a Dask cluster or a Ray cluster, each driven through its own client API (``distributed.Client.map`` /
``ray.remote``), with per-shard retries. The shard cache is the same for all: a rerun skips finished shards.

A cluster's workers must see the raw pool, the targets and the shard cache at the same paths as this process
(shared storage), and have this project installed: both are checked on every worker before any shard runs, and a
path a worker cannot see is an error naming the worker and the path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from llm_compress.errors import InputError


def _missing(paths: list[str]) -> list[str]:
    """Run on a worker: the paths it cannot see, and whether it can import this project."""
    out = [p for p in paths if not os.path.exists(p)]
    try:
        import llm_compress.dsir.core  # noqa: F401
    except ImportError as e:
        out.append(f"<cannot import llm-compress: {e}>")
    return out


def _check_visible(seen: dict[str, list[str]], kind: str) -> None:
    """``seen``: worker -> what it cannot see (``_missing``); InputError naming the first worker that lacks any."""
    for worker, missing in sorted(seen.items()):
        if missing:
            raise InputError(f"runtime.executor {kind}: worker {worker} cannot see {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + "; the raw pool, targets and the artifacts folder must be on storage every worker "
                             "mounts at the same path, with this project installed there")


class DaskMap:
    """Shards as Dask futures on ``address`` (a scheduler, e.g. tcp://host:8786) or on a local cluster of
    ``workers`` processes (one thread each) started here and closed with :meth:`close`."""

    kind = "dask"

    def __init__(self, address: str | None, workers: int, retries: int, paths: list[str]):
        import dask
        from distributed import Client, LocalCluster

        self.cluster = None
        if not address:
            # Dask starts its worker processes with MALLOC_TRIM_THRESHOLD_=65536 (give freed memory back to the OS
            # at once); DSIR's featurizer allocates and frees many small arrays per batch, and ran 3.4x slower
            # under it (bench/RESULTS.md). Workers started here keep glibc's default; start a cluster's workers
            # without that variable too.
            # Dask's nanny also writes these variables into this process' environment before it spawns (and
            # leaves them there, so a cluster started earlier in this process passes them on): spawn from a clean
            # environment, and give this process its own back afterwards.
            env = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
                   if k != "MALLOC_TRIM_THRESHOLD_"}
            saved = dict(os.environ)
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
            try:
                with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
                    self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                dashboard_address=None)
                    self.client = Client(self.cluster)
                    self.client.wait_for_workers(workers)  # every worker spawned before the environment returns
            finally:
                os.environ.clear()
                os.environ.update(saved)
        else:
            self.client = Client(address)
        self.retries = retries
        try:
            _check_visible(self.client.run(_missing, paths), "dask")
        except BaseException:
            self.close()
            raise
        workers_info = self.client.scheduler_info()["workers"].values()
        self.workers, self.hosts = len(workers_info), sorted({w["host"] for w in workers_info})

    def __call__(self, fn: Callable, tasks: list) -> Iterator[dict]:
        futures = self.client.map(fn, tasks, retries=self.retries, pure=False)
        yield from self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class RayMap:
    """Shards as Ray tasks on ``address`` (an existing cluster, e.g. ray://host:10001 or auto) or on a local Ray
    started here with ``workers`` CPUs; each task retried ``retries`` times on failure."""

    kind = "ray"

    def __init__(self, address: str | None, workers: int, retries: int, paths: list[str]):
        import ray

        self.ray, self.started = ray, not ray.is_initialized()
        if self.started:
            kw = {"address": address} if address else {"num_cpus": workers}
            ray.init(include_dashboard=False, log_to_driver=False, **kw)
        self.retries = retries
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0)(_missing)
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        try:
            seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                            .remote(paths) for n in nodes])
            _check_visible(dict(zip(nodes, seen)), "ray")
        except BaseException:
            self.close()
            raise
        self.workers = int(ray.cluster_resources().get("CPU", 0))
        self.hosts = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})

    def __call__(self, fn: Callable, tasks: list) -> Iterator[dict]:
        remote = self.ray.remote(max_retries=self.retries, retry_exceptions=True)(fn)
        yield from self.ray.get([remote.remote(t) for t in tasks])

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(cfg, paths: list[str | Path]):
    """The map function of ``cfg`` (``runtime.executor``), or None for local processes (DSIR's own pool)."""
    if cfg.kind == "local":
        return None
    paths = [str(Path(p).resolve()) for p in paths]
    cls = DaskMap if cfg.kind == "dask" else RayMap
    try:
        return cls(cfg.address, cfg.workers, cfg.retries, paths)
    except ImportError as e:
        raise InputError(f"runtime.executor {cfg.kind}: {e}; install the project's {cfg.kind} extra "
                         f"(pip install -e '.[{cfg.kind}]')") from None
