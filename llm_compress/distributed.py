"""Data-parallel processes for a stage: launched with torchrun's launcher, joined with torch.distributed.

A stage that runs data-parallel (distillation, ``runtime.distributed``) is one parent process, the Prefect task,
which launches ``torch.distributed.run`` (torchrun) with the stage's worker module; each worker process is a rank
that opens the process group (:func:`init`: nccl on GPUs, gloo on the CPU), does its share and leaves its files::

    parent (the stage's run)                         torchrun -> rank 0 .. rank W-1
                                                     (python -m llm_compress.worker spec.json)
    launch(worker, spec, ...) ---- spec.json ---->   init(); spec = receive_spec(argv)   (rank 0 broadcasts it)
          polls progress.json  <---- rank 0 ----     report(...) -> progress.json
          reads result.json    <---- rank 0 ----     finish(result)        / error-rank<r>.json from a failing rank

One node: ``torchrun --standalone --nproc_per_node N``. Several nodes: the stage's node is node 0 and the master
(``--nnodes K --node_rank 0 --master_addr A --master_port P``); every other node joins with the same torchrun line,
its own ``--node_rank`` and ``-m llm_compress.worker`` without a spec (the spec reaches it through the process group),
so each node needs only the project installed and the run's folders at the same paths (checked by every rank).

The workers never import Prefect. A worker started any other way that sets torch.distributed's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: ``accelerate launch`` does) works the same.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llm_compress.errors import InputError, TrainingError
from llm_compress.io import write_json_atomic

SPEC, RESULT, PROGRESS = "spec.json", "result.json", "progress.json"
ERRORS = {"InputError": InputError, "TrainingError": TrainingError}  # re-raised as themselves in the parent


@dataclass(frozen=True)
class Rank:
    """This process's place in the process group."""

    rank: int
    world: int
    local_rank: int
    device: str  # 'cpu' or 'cuda:<local_rank>'

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def shard(self, n: int) -> range:
        """The items of ``range(n)`` this rank takes: every world-th, from its rank (so batch i of a loop is made
        by rank i % world, whatever the world size: the batches, and their results, are the single process's)."""
        return range(self.rank, n, self.world)


def world_of(runtime) -> int:
    """Processes the recipe's ``runtime.distributed`` asks for, over all nodes."""
    d = runtime.distributed
    return d.processes * d.nodes


def init(device: str) -> Rank:
    """Join the process group of a torchrun-started worker: nccl with one GPU per local rank on 'cuda', gloo on the
    CPU."""
    import datetime as dt

    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise InputError(f"rank {os.environ.get('RANK')} has local rank {local} but this node has "
                             f"{torch.cuda.device_count()} CUDA devices: runtime.distributed.processes is more than "
                             "the node's GPUs")
        torch.cuda.set_device(local)
        where = f"cuda:{local}"
    else:
        where = "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=dt.timedelta(minutes=60),
                            **({"device_id": torch.device(where)} if device == "cuda" else {}))
    return Rank(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, device=where)


def receive_spec(rank: Rank, path: str | None) -> dict:
    """The stage's spec: read by rank 0 from ``path``, sent to every rank through the process group (other nodes
    start without it). Every rank then checks that it sees the spec's folders: a node without the shared storage
    fails here, naming itself and the path, before any work."""
    import torch.distributed as dist

    box = [None]
    if rank.main:
        if not path:
            raise InputError("rank 0 needs the spec file: start node 0 through the stage, not by hand")
        box = [json.loads(Path(path).read_text())]
    dist.broadcast_object_list(box, src=0)
    spec = box[0]
    missing = [p for p in spec.get("shared_paths", []) if not Path(p).exists()]
    seen = [None] * rank.world
    dist.all_gather_object(seen, (socket.gethostname(), rank.rank, missing))
    bad = [(host, r, m) for host, r, m in seen if m]
    if bad:
        host, r, m = bad[0]
        raise InputError(f"rank {r} on {host} cannot see {m[0]}: every node must see the run's artifacts folder and "
                         "inputs at the same paths (shared storage)")
    return spec


def devices(rank: Rank) -> list[str]:
    """Every rank's 'host:device', gathered (for the run report)."""
    import torch.distributed as dist

    seen = [None] * rank.world
    dist.all_gather_object(seen, f"{socket.gethostname()}:{rank.device}")
    return seen


def progress_writer(work_dir: Path, every_s: float = 2.0):
    """A ``llm_compress.progress`` reporter for rank 0 that leaves the newest report in ``work_dir/progress.json`` (at
    most every ``every_s`` seconds, and always the last one), where the parent passes it on to its own reporter."""
    last = [0.0]

    def write(fraction: float, note: str) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or fraction >= 1.0:
            last[0] = now
            write_json_atomic(work_dir / PROGRESS, {"fraction": fraction, "note": note})
    return write


def finish(work_dir: Path, result: dict) -> None:
    """Rank 0 hands the stage's result (JSON-able) to the parent."""
    write_json_atomic(work_dir / RESULT, result)


def record_error(work_dir: Path, err: BaseException) -> None:
    """A failing rank leaves its error for the parent (which re-raises InputError / TrainingError as themselves)."""
    write_json_atomic(work_dir / f"error-rank{os.environ.get('RANK', '0')}.json",
                      {"type": type(err).__name__, "message": str(err)})


def serve(argv: list[str] | None) -> None:
    """The body of ``python -m llm_compress.worker [spec] [--device cpu|cuda]`` (started by torchrun): join the process
    group, receive the spec, run the function it names (``entry``, 'module:function' under ``stages``) as
    ``fn(spec, rank)`` (rank 0's progress to the parent) and hand rank 0's StageResult back, or this rank's error."""
    import argparse
    import contextlib
    import importlib

    parser = argparse.ArgumentParser(prog="python -m llm_compress.worker",
                                     description="one rank of a data-parallel stage")
    parser.add_argument("spec", nargs="?", help="the stage's spec file (node 0 only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="cpu (gloo) or cuda (nccl, one GPU per process); default: cuda if there is one. "
                        "Every node must use the same.")
    a = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from llm_compress.progress import reporting

    die_with_parent()  # a rank never outlives its launcher
    rank = init(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = None
    try:
        spec = receive_spec(rank, a.spec)
        work = Path(spec["work_dir"])
        threads = spec["runtime"].get("threads")
        if threads:
            torch.set_num_threads(threads)
        module, _, name = spec["entry"].partition(":")
        if not module.startswith("llm_compress."):
            raise InputError(f"spec entry {spec['entry']!r} is not a function of this project's stages")
        run_rank = getattr(importlib.import_module(module), name)
        with reporting(progress_writer(work)) if rank.main else contextlib.nullcontext():
            result = run_rank(spec, rank)
        if result is not None:
            finish(work, {"outputs": result.outputs, "metrics": result.metrics, "compute": result.compute})
        # Every rank is done before any tears the group down: a gloo rank whose peer closed the connections while
        # it was still leaving its last collective aborted ("terminate called without an active exception", seen
        # once in CI on the second node's rank, whose torchrun agent then waited 300 s at its exit barrier).
        dist.barrier()
    except BaseException as e:
        if work is not None:
            record_error(work, e)
        raise
    finally:
        dist.destroy_process_group()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have Linux send this process ``sig`` when its parent dies (prctl PR_SET_PDEATHSIG; survives exec).

    torchrun starts each rank in a session of its own, out of reach of a kill of the stage's process group, so
    without this a killed stage (or launcher) would leave ranks training on, writing checkpoints a resumed run
    also writes. The launcher is started with it (its parent: the stage) and every rank sets it (its parent: the
    launcher). Elsewhere than Linux: nothing.
    """
    if _PRCTL is None:
        return
    _PRCTL(1, int(sig))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call: the signal will never come
        os.kill(os.getpid(), sig)


def _prctl():
    """libc's prctl, looked up at import: ``die_with_parent`` also runs between fork and exec (preexec_fn), where
    loading a library could deadlock in a process with threads (a Prefect task's)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PRCTL = _prctl()


def torchrun_args(runtime, spec_path: Path, device: str) -> list[str]:
    """The torchrun command line of node 0 for ``runtime.distributed`` (device: 'cpu' or 'cuda')."""
    d = runtime.distributed
    where = (["--standalone"] if d.nodes == 1 else
             ["--nnodes", str(d.nodes), "--node_rank", "0", "--master_addr", d.master_addr,
              "--master_port", str(d.master_port)])
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(d.processes),
            "--max_restarts", "0", "--module", "llm_compress.worker", str(spec_path), "--device", device]


def launch(entry: str, runtime, out_dir: Path, configs: dict, args: dict, shared_paths: list[str]):
    """Run ``entry`` ('module:function', called as ``fn(spec, rank)`` in every rank of ``llm_compress.worker``) on
    ``world_of(runtime)`` ranks (torchrun) and return rank 0's StageResult.

    The spec holds ``configs`` (pydantic models by name, dumped; ``runtime`` added), ``args`` (the keyword arguments
    of the stage's ``run_rank``, JSON-able, under "args") and ``shared_paths`` (what every rank must see). ``out_dir``:
    the stage's folder, which every node sees; the spec, progress, result and error files live in its ``.ranks``
    (removed after). More ranks than this node's GPUs are refused before any start. Rank 0's progress feeds the reporter
    installed here (``llm_compress.progress``). A rank that fails fails the stage with its error (InputError and
    TrainingError keep their type); torchrun stops the other ranks. If this process is interrupted (a Prefect timeout or
    cancellation) the launcher and its ranks are stopped.
    """
    import shutil

    import torch

    from llm_compress.modeling import resolve_device
    from llm_compress.progress import current_reporter
    from llm_compress.result import StageResult

    device = resolve_device(runtime.device).type
    if device == "cuda" and torch.cuda.device_count() < runtime.distributed.processes:
        raise InputError(f"runtime.distributed.processes is {runtime.distributed.processes} but this node has "
                         f"{torch.cuda.device_count()} CUDA devices (one process per GPU)")
    work_dir = Path(out_dir) / ".ranks"
    spec = {**{k: c.model_dump(mode="json") for k, c in {**configs, "runtime": runtime}.items()}, "args": args,
            "shared_paths": shared_paths, "entry": entry, "work_dir": str(work_dir)}
    try:
        result = _run_torchrun(entry, spec, runtime, device, work_dir, current_reporter())
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return StageResult(outputs=result["outputs"], metrics=result["metrics"], compute=result["compute"])


def _run_torchrun(entry: str, spec: dict, runtime, device: str, work_dir: Path, report) -> dict:
    """Write the spec, run torchrun until it ends (passing rank 0's progress on), and read rank 0's result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work_dir / SPEC, spec)
    env = dict(os.environ)
    if runtime.threads:
        env["OMP_NUM_THREADS"] = str(runtime.threads)  # else torchrun gives each of several workers 1 thread
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(torchrun_args(runtime, work_dir / SPEC, device), env=env, start_new_session=True,
                            preexec_fn=die_with_parent)
    seen = None
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            seen = _pass_progress(work_dir, report, seen)
    except BaseException:
        _stop(proc)
        raise
    _pass_progress(work_dir, report, seen)
    errors = sorted(work_dir.glob("error-rank*.json"), key=lambda p: p.stat().st_mtime)
    if errors:  # the first rank to fail says why; the others were stopped because of it
        e = json.loads(errors[0].read_text())
        if e["type"] in ERRORS:
            raise ERRORS[e["type"]](e["message"])
        raise RuntimeError(f"{errors[0].stem.split('-')[1]} failed: {e['type']}: {e['message']}")
    if proc.returncode != 0 or not (work_dir / RESULT).is_file():
        raise RuntimeError(f"the data-parallel workers ({entry}) failed with exit code {proc.returncode} and left no "
                         "error: see their output above")
    return json.loads((work_dir / RESULT).read_text())


def _pass_progress(work_dir: Path, report, seen):
    p = work_dir / PROGRESS
    if report is None or not p.is_file():
        return seen
    try:
        mtime = p.stat().st_mtime_ns
        if mtime != seen:
            r = json.loads(p.read_text())
            report(r["fraction"], r["note"])
        return mtime
    except (OSError, ValueError, KeyError):  # replaced while read: the next poll gets it
        return seen


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group (torchrun passes it to its workers), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if proc.poll() is not None:
                return
