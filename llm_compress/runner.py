"""Run one stage: atomic output directory, manifest, and the index of finished stages by cache key.

Olive-style: a stage's identity is its cache key (:func:`llm_compress.pipeline.make_call`: the stage's name, its
resolved config, the digests of its inputs, its code version and the versions of the libraries it runs on),
not the run id. The same recipe on the same inputs gives the same
key, whichever run asks, so finished stages are found again after a crash, a rerun or a second
run name. This index is the only cache: the Prefect flow caches nothing and its stage tasks call this module (a
reused stage's task run ends in a state named ``Reused``), as the CLI and ``run_local`` do. A finished stage is
reused only while the files on disk are the ones its manifest records (every output present, with its recorded
sha256): a record whose files were deleted, edited or replaced is recomputed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

from llm_compress.errors import disk_full_named
from llm_compress.io import (atomic_dir, code_version, digest_path, git_commit, package_versions, path_size,
                             write_json_atomic)
from llm_compress.result import StageResult
from llm_compress.stage import Call

_log = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def digest_memo_dir(artifacts_root: Path) -> Path:
    """Where per-file digests are memoised (:func:`llm_compress.io.memo_sha256`): inputs and cached outputs alike."""
    return Path(artifacts_root) / ".cache" / "digests"


def outputs_changed(manifest: dict, memo_dir: Path | None = None) -> str | None:
    """Why the files on disk are not the outputs a manifest records, or None if every one is there, unchanged.

    Each output is digested again (through ``memo_dir``, so an unchanged file is not re-read) and compared with
    the sha256 recorded when the stage wrote it: a cache record can outlive its files, or another run can have
    written other files at the same paths.
    """
    for name, out in manifest.get("outputs", {}).items():
        path = Path(out["path"])
        if not path.exists():
            return f"output '{name}' is gone from disk ({path})"
        try:
            digest = digest_path(path, memo_dir)
        except OSError as e:
            return f"output '{name}' cannot be read ({e})"
        if digest != out.get("sha256"):
            return (f"output '{name}' on disk is not the one recorded ({path}: sha256 {digest[:12]}, "
                    f"recorded {str(out.get('sha256'))[:12]})")
    return None


def cache_index_path(artifacts_root: Path, key: str) -> Path:
    return artifacts_root / ".cache" / f"{key}.json"


def lookup(artifacts_root: Path, key: str, log: Callable[[str], None] | None = None) -> dict | None:
    """The manifest of a finished stage with this key, if its outputs are still on disk as it recorded them.

    ``log`` (default: this module's logger at info level) is told why a record is not reused.
    """
    p = cache_index_path(artifacts_root, key)
    if not p.is_file():
        return None
    try:
        manifest = json.loads(Path(json.loads(p.read_text())["manifest"]).read_text())
    except (OSError, ValueError, KeyError):
        return None
    if manifest.get("cache_key") != key or manifest.get("status") == "failed":  # rewritten since, or failed
        return None
    why = outputs_changed(manifest, digest_memo_dir(artifacts_root))
    if why is not None:
        (log or _log.info)(f"{manifest.get('stage', key)}: not reusing {manifest.get('stage_dir')}: {why}; "
                           "recomputing")
        return None
    return manifest


@contextlib.contextmanager
def stage_lock(artifacts_root: Path, key: str, stage: str, log: Callable[[str], None] | None = None):
    """Hold the lock of one stage key (``.cache/locks/<key>.lock``, a ``filelock`` file lock) while the stage is
    looked up, computed and published, so two runs of the same recipe at once (a served run and a CLI run, two
    clicks in the UI) never compute the same stage twice: the second waits, then finds the first's result."""
    from filelock import FileLock, Timeout

    path = artifacts_root / ".cache" / "locks" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        (log or _log.info)(f"{stage}: another run is computing this stage (key {key[:12]}); waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def execute(call: Call, *, run_dir: Path, artifacts_root: Path, seed: int,
            fn: Callable[[Path], StageResult], log: Callable[[str], None] | None = None) -> dict:
    """Run ``fn(tmp_dir)`` and publish ``run_dir/<stage>`` atomically with its manifest.

    If a finished stage with the same key exists (any run) and its outputs are unchanged on disk, return its
    manifest without running (see :func:`lookup`, which tells ``log`` why a record is not reused).

    A stage that fails with an exception carrying a ``partial`` StageResult (export: the formats that passed) is
    published with those outputs and a manifest saying ``"status": "failed"`` and the ``error``, then the exception
    is raised again: no cache index entry is written and :func:`lookup` never serves a failed manifest, so the next
    run of the same key runs the stage again. Any other exception publishes nothing.

    All of it happens under the stage key's lock (:func:`stage_lock`): a concurrent run of the same stage waits and
    then reuses this one's result.
    """
    stage, key = call.stage, call.key
    with stage_lock(artifacts_root, key, stage, log):  # looked up once the lock is ours: another run may be done
        return _execute(call, run_dir=run_dir, artifacts_root=artifacts_root, seed=seed, fn=fn, log=log)


def _execute(call: Call, *, run_dir: Path, artifacts_root: Path, seed: int, fn: Callable[[Path], StageResult],
             log: Callable[[str], None] | None) -> dict:
    stage, key = call.stage, call.key
    hit = lookup(artifacts_root, key, log)
    if hit is not None:
        return {**hit, "reused": True}
    stage_dir = run_dir / stage
    for legacy in sorted(run_dir.glob(f"[0-9][0-9]-{stage}")):  # written before stage folders lost their numbers
        (log or _log.info)(f"{stage}: {legacy} is from an older version, which numbered stage folders; this version "
                           f"writes {stage_dir} and leaves the old folder as it is")
    for stale in run_dir.glob(f".{stage_dir.name}.*"):  # temp dirs of a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    started, t0 = _now(), time.perf_counter()
    failure: Exception | None = None
    with disk_full_named(stage, stage_dir), atomic_dir(stage_dir) as tmp:  # ENOSPC: one line, tmp removed
        try:
            result = fn(tmp)
        except Exception as e:
            if not isinstance(getattr(e, "partial", None), StageResult):
                raise
            failure, result = e, e.partial
        outputs = {}
        for name, rel in result.outputs.items():
            if Path(rel).is_absolute():  # stages should return paths relative to their dir; accept ones inside it
                rel = str(Path(rel).relative_to(tmp))
            produced = tmp / rel
            if not produced.exists():
                raise RuntimeError(f"stage {stage} declared output '{name}' at {rel} but did not write it")
            outputs[name] = {"path": str(stage_dir / rel), "sha256": digest_path(produced),
                             "bytes": path_size(produced)}
        manifest = {
            "stage": stage, "cache_key": key, "stage_dir": str(stage_dir),
            "status": "completed" if failure is None else "failed",
            **({} if failure is None else {"error": f"{type(failure).__name__}: {failure}"}),
            "config": call.config, "device": call.device,
            "compute": result.compute or {"processes": 1, "devices": [f"{platform.node()}:{call.device}"]},
            "inputs": {k: {"ref": v, "sha256": call.input_digests.get(k)} for k, v in call.inputs.items()},
            "outputs": outputs, "metrics": result.metrics, "seed": seed,
            "code_version": code_version(), "stage_code_version": call.code, "git_commit": git_commit(),
            "packages": package_versions(), "libraries": call.libraries,
            "python": platform.python_version(), "host": platform.node(),
            "started_at": started, "finished_at": _now(), "duration_s": round(time.perf_counter() - t0, 2),
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    if failure is not None:
        failure.manifest = manifest  # for the caller's report
        raise failure
    write_json_atomic(cache_index_path(artifacts_root, key), {"manifest": str(stage_dir / "manifest.json")})
    return manifest


def failed_manifest(run_dir: Path, call: Call) -> dict | None:
    """The manifest a failed stage of this call published in ``run_dir`` (with the outputs that passed), if any."""
    p = run_dir / call.stage / "manifest.json"
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("status") == "failed" and m.get("cache_key") == call.key else None


def link_reused(manifest: dict, run_dir: Path) -> None:
    """Record in this run's ``<stage>`` dir that the stage was reused from another run's outputs."""
    stage_dir = run_dir / manifest["stage"]
    own = stage_dir / "manifest.json"
    if own.is_file():
        try:
            if json.loads(own.read_text()).get("cache_key") == manifest["cache_key"]:
                return  # this run's own finished stage
        except ValueError:
            pass
    if Path(manifest["stage_dir"]) == stage_dir:
        return
    with atomic_dir(stage_dir) as tmp:
        write_json_atomic(tmp / "manifest.json", {**manifest, "reused": True, "reused_from": manifest["stage_dir"]})


def result_for(manifest: dict) -> StageResult:
    return StageResult(outputs={k: v["path"] for k, v in manifest["outputs"].items()}, metrics=manifest["metrics"])
