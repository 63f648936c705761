"""How the stages chain: the registry, which stages a recipe runs, and how each is keyed and called.

Kept free of Prefect (and of torch at import) so the wiring is testable and readable on its own. The Prefect
flow (:mod:`llm_compress.flows.pipeline`) walks :func:`enabled` and runs each stage's :class:`~llm_compress.stage.Call`
as a task; tests and benches walk it with :func:`run_local` and no orchestrator at all.

The registry's order is the run order: bootstrap -> select -> data -> distill -> unlearn -> quantize -> kv -> evaluate
-> export. Each stage writes ``<run>/<stage name>/``, so inserting a stage moves no other stage's folder. Unlearning
comes before compression so that what ships is the compressed unlearned model, and evaluate re-measures the forget
set on it (see :mod:`llm_compress.pipeline.unlearn`). Each stage is one module in this package, declaring its recipe
sections too (see :mod:`llm_compress.stage` for the interface); :class:`llm_compress.config.Recipe` is assembled
from them, so nothing here imports it (``Recipe`` below is an annotation only).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Callable, Literal

from llm_compress.errors import InputError
from llm_compress.refs import PATH_PREFIXES
from llm_compress.result import StageResult
from llm_compress.stage import Call, Context, Env, Recipe, Stage, Upstream

# The registry: one line per stage, in run order, naming the module of this package that holds its ``STAGE``.
REGISTRY = (
    "bootstrap",
    "select",
    "data",
    "distill",
    "unlearn",
    "quantize",
    "kv",
    "evaluate",
    "export",
)
STAGES: tuple[Stage, ...] = tuple(import_module(f"{__name__}.{module}").STAGE for module in REGISTRY)
assert len({s.name for s in STAGES}) == len(STAGES), "stage names must be unique"

# The stage names as a type (the flow's `until` dropdown)
StageName = Literal[tuple(s.name for s in STAGES)]  # type: ignore[valid-type]


def get_stage(name: str) -> Stage:
    """The registered stage called ``name``."""
    return next(s for s in STAGES if s.name == name)


def _upstream(recipe: Recipe, done: dict[str, dict]) -> Upstream:
    return Upstream(recipe, done, tuple(s.name for s in STAGES if s.makes_model))


def enabled(recipe: Recipe) -> list[str]:
    return [s.name for s in STAGES if s.enabled(recipe)]


def preflight(recipe: Recipe) -> None:
    """Every enabled stage's checks of user input, before any work: the same for ``compress validate`` and ``run``.

    Cheap and torch-free: paths exist, local models hold a config.json, vocabularies match, the model type suits
    the method. Raises InputError naming the field.
    """
    unknown = sorted(set(recipe.runtime.timeouts) - {s.name for s in STAGES})
    if unknown:
        raise InputError(f"runtime.timeouts: unknown stage(s) {unknown}; stages: {', '.join(s.name for s in STAGES)}")
    for s in STAGES:
        if s.enabled(recipe):
            s.check(recipe)


def _digest(name: str, ref: str, recipe: Recipe, memo_dir: Path | None) -> str:
    """A local file or folder by content; a hub model or dataset by the commit it resolves to."""
    from llm_compress.io import digest_path

    path = Path(ref).expanduser()
    if path.exists():  # memoised per file on (path, size, mtime, inode): a multi-GB pool is not re-read per run
        return digest_path(path, memo_dir)
    if ref.startswith(PATH_PREFIXES):  # a path, not a hub id
        raise InputError(f"input '{name}' of the stage: not found: {ref}")
    from llm_compress.refs import hub_commit

    repo_type = "dataset" if name.startswith("dataset") else "model"
    revision = recipe.data.hf.revision if repo_type == "dataset" and recipe.data.hf else recipe.models.revision
    return f"hub:{repo_type}:{ref}@{hub_commit(ref, revision, repo_type)}"


def make_call(recipe: Recipe, stage: str, done: dict[str, dict], env: Env | None = None,
              memo_dir: Path | None = None) -> Call:
    """The call that defines ``stage`` given the finished upstream stages: config, inputs, digests and key."""
    from llm_compress.io import package_versions, stable_hash, stage_code_version

    s = get_stage(stage)
    env = env or Env.resolve(recipe)
    up = _upstream(recipe, done)
    inputs = s.inputs(recipe, up)
    digests = {}
    for name, ref in inputs.items():  # an upstream output's digest is in its manifest already
        upstream = next((o["sha256"] for d in done.values() for o in d["outputs"].values() if o["path"] == ref), None)
        digests[name] = upstream or _digest(name, ref, recipe, memo_dir)
    config = s.config(recipe, up, env)
    code, libraries = stage_code_version(type(s).__module__), package_versions(s.libraries)
    key = stable_hash({"stage": stage, "config": config, "inputs": digests, "code": code, "libraries": libraries})
    return Call(stage=stage, config=config, inputs=inputs, input_digests=digests, key=key,
                device=env.device, code=code, libraries=libraries)


def run_call(recipe: Recipe, call: Call, run_dir: Path, artifacts_root: Path,
             log: Callable[[str], None] | None = None) -> dict:
    """Run (or reuse) one stage and return its manifest; see :func:`llm_compress.runner.execute` (``log``: why a
    cached record was not reused)."""
    from llm_compress.runner import execute

    def fn(out: Path) -> StageResult:
        return get_stage(call.stage).run(Context(recipe, call, out, artifacts_root))

    return execute(call, run_dir=run_dir, artifacts_root=artifacts_root, seed=recipe.runtime.seed, fn=fn, log=log)


def after(recipe: Recipe, stage: str, done: dict[str, dict]) -> None:
    """The stage's checks of its own finished result (the evaluate stage's quality gates)."""
    get_stage(stage).after(recipe, _upstream(recipe, done))


def run_local(recipe: Recipe, run_dir: Path, artifacts_root: Path) -> dict[str, dict]:
    """Run every enabled stage in order without an orchestrator; returns the manifests."""
    from llm_compress.runner import digest_memo_dir

    preflight(recipe)
    env = Env.resolve(recipe)
    done: dict[str, dict] = {}
    for stage in enabled(recipe):
        done[stage] = run_call(recipe, make_call(recipe, stage, done, env, digest_memo_dir(artifacts_root)),
                               run_dir, artifacts_root)
        after(recipe, stage, done)
    return done
