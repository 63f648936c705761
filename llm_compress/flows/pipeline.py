"""The Prefect flow: chains the stages as tasks, publishes the report.

Thin by design: the algorithms and the wiring live in the stages. Tasks pass paths and small JSON manifests, never
tensors. There is one cache, the runner's content-keyed index (:mod:`llm_compress.runner`: config + input digests +
code version), the one the CLI, ``run_local`` and the tests use; Prefect caches nothing (no cache policy, no
persisted results). Every stage task calls :func:`llm_compress.pipeline.run_call`, which reuses a finished stage
with the same key whose files are intact, so rerunning a recipe after a crash, or under another run name, reruns
only the rest; a reused stage's task run ends in a Completed state named ``Reused`` (:data:`REUSED`), which the UI
shows in the task list, and its progress artifact says ``reused``. Each flow run writes its own run folder
(:func:`run_name_for`).

No ``from __future__ import annotations`` here: the flow's signature must hold real types, not strings, because a
served or deployed run validates its parameters against a model Prefect builds in another process, where a string
annotation such as ``StageName | None`` was not resolved ("CompressModel is not fully defined").
"""

import contextlib
import re
import time
import traceback
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.states import Completed

from llm_compress import report as report_mod
from llm_compress.config import Recipe, check_run_name, default_run_name, load_recipe
from llm_compress.errors import CompressError, GateError, InputError, disk_full
from llm_compress.pipeline import StageName, after, enabled, make_call, preflight, run_call
from llm_compress.progress import reporting
from llm_compress.runner import digest_memo_dir, failed_manifest, link_reused
from llm_compress.stage import Call, Env


REUSED = "Reused"  # the name of the Completed state a stage task run ends in when the runner reused the stage
PROGRESS_EVERY_S = 5.0  # the most often a stage's progress artifact is written (each write is a server call)


class _ProgressArtifact:
    """The reporter of one stage run (:mod:`llm_compress.progress`): a Prefect progress artifact on the task run,
    updated at most every PROGRESS_EVERY_S seconds, with the stage's note (step, loss, tokens/s) as its description. A
    failing update is logged once and never fails the stage."""

    def __init__(self, stage: str, log):
        self.stage, self.log, self.last, self.id = stage, log, 0.0, None
        try:
            self.id = create_progress_artifact(progress=0.0, description=f"{stage}: starting")
        except Exception as e:
            self.log(f"{stage}: no progress artifact ({e})")

    def __call__(self, fraction: float, note: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.id is None or (not force and now - self.last < PROGRESS_EVERY_S and fraction < 1.0):
            return
        self.last = now
        try:
            update_progress_artifact(self.id, progress=round(100 * fraction, 1), description=f"{self.stage}: {note}")
        except Exception as e:
            self.log(f"{self.stage}: progress artifact not updated ({e})")
            self.id = None


@contextlib.contextmanager
def gpu_slot(name: str | None, device: str, stage: str, log):
    """Hold one slot of the global concurrency limit ``name`` (``runtime.gpu_slot``) while a stage runs on CUDA;
    strict, so a limit missing on the server is an error rather than no protection (the flow checks it first)."""
    if not name or device != "cuda":
        yield
        return
    log(f"{stage}: waiting for a slot of '{name}'")
    with concurrency(name, occupy=1, strict=True):
        log(f"{stage}: holds a slot of '{name}'")
        yield


def check_gpu_slot(name: str | None) -> None:
    """Before any work: the global concurrency limit named by ``runtime.gpu_slot`` exists on the Prefect server."""
    if not name:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise InputError(f"runtime.gpu_slot: the Prefect server has no global concurrency limit '{name}'; create "
                             f"it first: prefect gcl create {name} --limit 1") from None


@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, recipe: dict, call: dict, run_dir: str, artifacts_root: str):
    """Run one stage, or reuse its finished outputs from the runner's index; returns its manifest, as the data of a
    Completed state named ``Reused`` when it was reused (Prefect makes a returned state the task run's final state,
    so the UI lists the stage as Reused; ``state.result()`` is the manifest either way). Long stages report where they
    are to a progress artifact on this task run (distillation and pretraining steps, DSIR shards, GPTQ layers,
    OSTQuant and unlearning steps)."""
    log = get_run_logger()
    r = Recipe.model_validate(recipe)
    if r.runtime.threads:  # honoured in every flow run, not only in the CLI
        import torch

        torch.set_num_threads(r.runtime.threads)
    progress = _ProgressArtifact(stage, log.warning)
    with gpu_slot(r.runtime.gpu_slot, call["device"], stage, log.info), reporting(progress):
        manifest = run_call(r, Call(**call), Path(run_dir), Path(artifacts_root), log=log.info)
    if manifest.get("reused"):
        progress(1.0, "reused", force=True)
        return Completed(name=REUSED, data=manifest, message=f"reused {manifest['stage_dir']}")
    progress(1.0, "done", force=True)
    return manifest


def run_name_for(recipe: Recipe, run_name: str | None) -> str:
    """The run folder's name: ``run_name`` if given; else, inside a flow run (a deployment's, or a direct call of
    the flow), the recipe's default name (recipe name + config hash) followed by the flow run's name and the end
    of its id, so every flow run gets its own folder; else (no flow run) the recipe's default name."""
    from prefect.runtime import flow_run

    if run_name:
        return run_name
    base, run_id = default_run_name(recipe), flow_run.id
    if not run_id:
        return base
    own = re.sub(r"[^A-Za-z0-9_-]+", "-", flow_run.name or "").strip("-_")[:40]  # a UI-given name may be any text
    # the id's last 8 hex digits: Prefect's ids are UUIDv7, whose first ones are a timestamp shared by runs a
    # scheduler pass creates together
    return f"{base}-{own}"[:90].rstrip("-") + f"-{str(run_id).replace('-', '')[-8:]}"


def _flow_run_name() -> str:
    """The flow run's name: the ``run_name`` parameter if given, else the one Prefect generated (kept)."""
    from prefect.runtime import flow_run

    return flow_run.parameters.get("run_name") or flow_run.name


def _artifact_key(run_name: str, what: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only
    safe = "".join(c if c.isalnum() else "-" for c in run_name.lower()).strip("-")
    return f"{what}-{safe}"[:100]


def _publish_artifacts(run_name: str, rep: dict, md: str) -> None:
    create_markdown_artifact(markdown=md, key=_artifact_key(run_name, "report"),
                             description=f"compression report of run {run_name}")
    if rep["evaluation"]:
        create_table_artifact(table=rep["evaluation"], key=_artifact_key(run_name, "metrics"),
                              description="quality, size and latency of each model vs the teacher")
    exports = rep["exports"] if rep["published"] else []
    for e in exports:
        create_link_artifact(link=Path(e["path"]).resolve().as_uri(), link_text=f"{e['format']} export",
                             key=_artifact_key(run_name, f"export-{e['format']}"))
    if exports:
        create_markdown_artifact(markdown=exports_markdown(run_name, exports), key=_artifact_key(run_name, "exports"),
                                 description=f"where the exports of run {run_name} are and how to fetch them")


def exports_markdown(run_name: str, exports: list[dict]) -> str:
    """The published exports as a browser cannot open them from the UI (``file://`` links on the worker): the
    machine and folder of each, its size, and the commands that fetch and load it."""
    import socket

    host = socket.gethostname()
    lines = [f"# Exports of run `{run_name}`", "",
             f"The files are on the machine that ran the flow, `{host}`. Each folder holds a model card (README.md) "
             "with its lineage, figures and loading lines.", "",
             "| format | folder on the worker | bytes | fetch |", "|---|---|---|---|"]
    for e in exports:
        path = Path(e["path"]).resolve()
        lines.append(f"| {e['format']} | `{path}` | {e.get('bytes', '')} | `rsync -a {host}:{path} .` |")
    return "\n".join(lines) + "\n"


def _publish_curves(run_name: str, stage: str, manifest: dict) -> None:
    """A training stage's curves as Prefect artifacts: the PNG (inline, as a data URL) and the eval points."""
    import base64
    import json

    outs = manifest["outputs"]
    if "curves" in outs:
        png = base64.b64encode(Path(outs["curves"]["path"]).read_bytes()).decode()
        create_image_artifact(image_url=f"data:image/png;base64,{png}", key=_artifact_key(run_name, f"{stage}-curves"),
                              description=f"{stage}: train loss, held-out CE and KD vs step")
    if "history" in outs:
        rows = [json.loads(line) for line in Path(outs["history"]["path"]).read_text().splitlines() if line]
        keep = ("step", "loss", "eval_ce", "eval_ppl", "eval_kd", "tokens_per_s")
        table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in keep}
                 for r in rows if "eval_ce" in r]
        if table:
            create_table_artifact(table=table, key=_artifact_key(run_name, f"{stage}-eval"),
                                  description=f"{stage}: held-out evaluation during training")


NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TimeoutError)


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a stage only after an error that may pass on its own, an OSError (I/O,
    network, a hub download: requests' errors are OSErrors), but not a missing file or path, a permission, or a
    timeout (the stage's own limit), nor a full disk (a retry would rerun the stage onto the same disk; the runner
    raises it as DiskFullError). The project's errors (bad input, a missed gate, a NaN loss, a failed export
    check, a full disk) are not OSErrors: they fail at once."""
    exc = state.data  # the exception the task raised (Prefect wraps it in the Failed state it passes here)
    return isinstance(exc, OSError) and not isinstance(exc, NOT_TRANSIENT) and not disk_full(exc)


def resolve_recipe(recipe: Recipe | None, recipe_path: str | None) -> Recipe:
    """The flow's recipe: the ``recipe`` parameter, or the YAML file at ``recipe_path`` read when the run starts
    (so a scheduled deployment picks up edits to the file); exactly one of the two."""
    if (recipe is None) == (recipe_path is None):
        raise InputError("give the flow exactly one of recipe (the recipe itself) and recipe_path (a YAML file)")
    return recipe if recipe is not None else load_recipe(recipe_path)


@flow(name="compress", flow_run_name=_flow_run_name, log_prints=True, validate_parameters=True)
def compress(recipe: Recipe | None = None, run_name: str | None = None, artifacts_dir: str = "artifacts",
             recipe_path: str | None = None, until: StageName | None = None) -> dict:
    """Run a compression recipe: select -> distill -> unlearn -> quantize -> KV -> evaluate -> export.

    ``recipe`` (the form) or ``recipe_path`` (a YAML file on the worker, relative to its working directory);
    ``run_name``: the run folder under ``artifacts_dir``; empty: one folder per flow run (see :func:`run_name_for`);
    ``until``: stop after this stage (e.g. ``select`` for a selection-only deployment; the stages before it run as
    the recipe says, nothing is exported).
    """
    log = get_run_logger()
    recipe = resolve_recipe(recipe, recipe_path)
    stages = enabled(recipe)
    if until is not None:
        if until not in stages:
            raise InputError(f"until: stage '{until}' is not enabled in this recipe (enabled: {', '.join(stages)})")
        stages = stages[: stages.index(until) + 1]
    run_name = check_run_name(run_name_for(recipe, run_name))
    preflight(recipe)  # missing paths, vocabulary mismatch: fail before anything is written
    check_gpu_slot(recipe.runtime.gpu_slot)
    root = Path(artifacts_dir).resolve()
    run_dir = root / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_json = recipe.model_dump(mode="json")
    done: dict[str, dict] = {}
    records: list[dict] = []
    status, error, published = "completed", None, False
    call, failed = None, None
    try:
        env, rt = Env.resolve(recipe), recipe.runtime
        for stage in stages:
            call = make_call(recipe, stage, done, env, digest_memo_dir(root))
            task_fn = run_stage.with_options(name=stage, task_run_name=stage,
                                             retries=rt.retries, retry_delay_seconds=rt.retry_delay_s,
                                             retry_condition_fn=transient, timeout_seconds=rt.timeouts.get(stage))
            manifest = task_fn(stage=stage, recipe=recipe_json, call=call.__dict__, run_dir=str(run_dir),
                               artifacts_root=str(root), return_state=True).result()
            reused = manifest.get("reused", False)
            link_reused(manifest, run_dir)
            done[stage] = manifest
            records.append(report_mod.stage_record(manifest, "cached" if reused else "ran"))
            log.info(f"{stage}: {'reused' if reused else 'done'} ({manifest['stage_dir']})")
            if "curves" in manifest["outputs"] or "history" in manifest["outputs"]:
                try:
                    _publish_curves(run_name, stage, manifest)
                except Exception as e:  # artifacts are a view: never fail a run for them
                    log.warning(f"could not publish the {stage} curves: {e}")
            after(recipe, stage, done)
        published = "export" in done
    except GateError as e:
        status, error = "failed_gate", str(e)
        raise
    except CompressError as e:
        status, error = "failed", f"{type(e).__name__}: {e}"
        failed = failed_manifest(run_dir, call) if call is not None else None  # export: the formats that passed
        if failed is not None:
            records.append(report_mod.stage_record(failed, "failed"))
        raise
    except BaseException as e:
        status, error = "failed", "".join(traceback.format_exception_only(type(e), e)).strip()
        raise
    finally:
        rep = report_mod.build(run_name, recipe.name, done, records, status, error, published, failed)
        md = report_mod.write(run_dir, rep)
        try:
            _publish_artifacts(run_name, rep, md)
        except Exception as e:  # a report artifact must not hide the run's real outcome
            log.warning(f"could not publish Prefect artifacts: {e}")
    return rep
