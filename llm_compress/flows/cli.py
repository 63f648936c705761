"""``compress``: the command line.

    compress demo                       build the embedded default and run configs/demo.yaml
    compress run RECIPE [--set k=v ...] [--run-name NAME]
    compress validate RECIPE [--set k=v ...]
    compress select --raw PATH... --target PATH... --out DIR -k N   DSIR data selection on its own
    compress runs                       list runs under the artifacts folder
    compress show RUN                   print a run's report
    compress serve RECIPE [--cron ...]  serve the recipe as a Prefect deployment (UI-triggerable)

Errors caused by input (recipe, paths, data, gates) print one clear message and exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from llm_compress.config import default_run_name

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # llm_compress/flows/cli.py -> the checkout
DEMO_RECIPE = REPO_CONFIGS / "demo.yaml"


def _prefect_env() -> None:
    # Without a configured server Prefect starts a temporary local one; make sure that is on even in
    # a hermetic environment, and give its first start (database migrations) time.
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _load(path: str, overrides: list[str]):
    from llm_compress.config import load_recipe

    return load_recipe(path, overrides)


def cmd_validate(args) -> int:
    import yaml

    from llm_compress.pipeline import enabled, preflight

    recipe = _load(args.recipe, args.set)
    preflight(recipe)  # the same checks of paths, models and vocabularies as `compress run` makes before work
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# valid recipe; stages: {' -> '.join(enabled(recipe))}; default run name: {default_run_name(recipe)}")
    return 0


def _checked_run_name(name: str) -> str:
    from llm_compress.config import check_run_name
    from llm_compress.errors import RecipeError

    try:
        return check_run_name(name)
    except ValueError as e:
        raise RecipeError(f"--run-name: {e}") from None


def _run(recipe, run_name: str | None, artifacts: str) -> int:
    name = _checked_run_name(run_name or default_run_name(recipe))
    from llm_compress.pipeline import preflight

    preflight(recipe)  # before starting Prefect: a missing path fails in a second, not after a server start
    _prefect_env()
    from llm_compress.flows.pipeline import compress

    from llm_compress.errors import CompressError

    log = Path(artifacts).resolve() / name / "run.log"
    try:
        with _tracebacks_to(log):
            rep = compress(recipe=recipe, run_name=name, artifacts_dir=artifacts)
    except CompressError as e:
        e.log_path = log  # main() names it under the one-line message
        raise
    print(f"\nrun '{name}': {rep['status']}, published: {rep['published']}")
    print(f"report: {Path(artifacts).resolve() / name / 'report.md'}")
    return 0


@contextlib.contextmanager
def _tracebacks_to(log_path: Path):
    """Prefect's whole log, tracebacks included, into ``log_path``; on the console an input error is one line.

    Prefect logs a failed task and flow with the exception's traceback (70-250 lines for a missing file). For
    errors caused by input (CompressError) the message names the cause, so the console shows the message only; the
    traceback stays in the run's log file. Any other exception is a bug and keeps its traceback on the console too.
    """
    import logging

    from llm_compress.errors import CompressError

    log_path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(file_handler)
    patched = []
    for logger in [logging.getLogger()] + [v for k, v in logging.Logger.manager.loggerDict.items()
                                           if k.startswith("prefect") and isinstance(v, logging.Logger)]:
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                patched.append((h, h.emit))
                h.emit = _without_input_tracebacks(h.emit, CompressError)
    try:
        yield
    finally:
        for h, emit in patched:
            h.emit = emit
        prefect_logger.removeHandler(file_handler)
        file_handler.close()


def _without_input_tracebacks(emit, kind):
    import logging

    def quiet(record):
        if record.exc_info and isinstance(record.exc_info[1], kind):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return emit(record)
    return quiet


def cmd_run(args) -> int:
    return _run(_load(args.recipe, args.set), args.run_name, args.artifacts)


def cmd_demo(args) -> int:
    from llm_compress.errors import RecipeError

    if not DEMO_RECIPE.is_file():
        raise RecipeError(f"demo recipe not found at {DEMO_RECIPE}; run from a checkout (pip install -e .)")
    return _run(_load(str(DEMO_RECIPE), args.set), args.run_name, args.artifacts)


def cmd_runs(args) -> int:
    root = Path(args.artifacts)
    rows = []
    for rep_path in sorted(root.glob("*/report.json")):
        try:
            rep = json.loads(rep_path.read_text())
        except ValueError:
            continue
        rows.append((rep.get("written_at", ""), rep_path.parent.name, rep.get("status", "?"),
                     "yes" if rep.get("published") else "no", rep.get("recipe", "?")))
    if not rows:
        print(f"no runs under {root.resolve()}")
        return 0
    print(f"{'run':40} {'status':12} {'published':9} {'recipe':16} written")
    for written, name, status, pub, recipe in sorted(rows):
        print(f"{name:40} {status:12} {pub:9} {recipe:16} {written}")
    return 0


def cmd_show(args) -> int:
    from llm_compress.config import check_run_name
    from llm_compress.errors import InputError

    try:
        check_run_name(args.run)
    except ValueError as e:
        raise InputError(str(e)) from None
    path = Path(args.artifacts) / args.run / ("report.json" if args.json else "report.md")
    if not path.is_file():
        raise InputError(f"no report for run '{args.run}' at {path} (see `compress runs`)")
    print(path.read_text(), end="")
    return 0


def cmd_serve(args) -> int:
    recipe = _load(args.recipe, args.set)
    _prefect_env()
    from llm_compress.flows.pipeline import compress

    # No run_name by default: each flow run then writes its own folder, named after the flow run
    # (llm_compress.flows.pipeline.run_name_for); a name frozen here would send every run into one folder.
    parameters = {"recipe": recipe.model_dump(mode="json"), "artifacts_dir": str(Path(args.artifacts).resolve())}
    if args.run_name:
        parameters["run_name"] = _checked_run_name(args.run_name)
    compress.serve(name=args.name or recipe.name, cron=args.cron, parameters=parameters,
                   limit=1)  # one run at a time: a single GPU or CPU box
    return 0


def cmd_select(args) -> int:
    """Standalone DSIR selection: writes selected.jsonl, weights.npy, manifest.json into --out, atomically."""
    import datetime as dt

    from pydantic import ValidationError

    from llm_compress.dsir import DSIRConfig, TargetSpec, run_selection
    from llm_compress.errors import InputError, RecipeError
    from llm_compress.io import atomic_dir, code_version, digest_path, package_versions, write_json_atomic

    try:
        cfg = DSIRConfig(k=args.k, num_buckets=args.buckets, seed=args.seed, min_length=args.min_length,
                         deterministic=args.deterministic, text_field=args.text_field, processes=args.processes,
                         laplace=args.laplace, hash="dsir-compat" if args.compat else "fast",
                         target_proportions=args.proportions)
    except ValidationError as e:
        raise RecipeError("; ".join(f"--{'-'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    missing = [p for p in args.raw + [p for t in args.target for p in t] if not Path(p).exists()]
    if missing:
        raise InputError(f"not found: {', '.join(missing)}")
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out.with_name(f".{out.name}.dsir-cache")
    targets = [TargetSpec(paths=t) for t in args.target]
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_dir(out) as tmp:
        res = run_selection(cfg, args.raw, targets, tmp, cache_dir=cache, progress=True)
        outputs = {k: {"path": str(out / v), "sha256": digest_path(tmp / v)} for k, v in res.outputs.items()}
        write_json_atomic(tmp / "manifest.json", {
            "stage": "select", "config": cfg.model_dump(mode="json"), "raw": args.raw, "targets": args.target,
            "outputs": outputs, "metrics": res.metrics, "code_version": code_version(),
            "packages": package_versions(), "started_at": started,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    m = res.metrics
    print(f"selected {args.k} documents into {out / 'selected.jsonl'}; KL reduction {m.get('kl_reduction')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Turn a large language model into a smaller, "
                                "deployable one: distill, quantize, evaluate, export (Prefect-orchestrated).")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, recipe=True, run_name=True):
        if recipe:
            sp.add_argument("recipe", help="YAML recipe (see configs/)")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field; the value is parsed as YAML (repeatable)")
        if run_name:
            sp.add_argument("--run-name", help="name of the run folder (default: recipe name + config hash)")
        sp.add_argument("--artifacts", default="artifacts", help="where runs are written (default: artifacts)")

    sp = sub.add_parser("demo", help="build the embedded default (corpus, tokenizer, teacher) and run "
                        "configs/demo.yaml")
    common(sp, recipe=False)
    sp.set_defaults(fn=cmd_demo)
    sp = sub.add_parser("run", help="run a recipe")
    common(sp)
    sp.set_defaults(fn=cmd_run)
    sp = sub.add_parser("validate", help="check a recipe and print the resolved config")
    sp.add_argument("recipe")
    sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    sp.set_defaults(fn=cmd_validate)
    sp = sub.add_parser("select", help="DSIR data selection on its own: pick the k raw documents most like the "
                        "target(s)")
    sp.add_argument("--raw", nargs="+", required=True, metavar="PATH", help="raw pool: JSONL/.txt/Parquet files "
                    "or folders")
    sp.add_argument("--target", nargs="+", action="append", required=True, metavar="PATH",
                    help="one target's files; repeat --target for several targets")
    sp.add_argument("--proportions", nargs="+", type=float, help="share of k per target (in --target order)")
    sp.add_argument("--out", required=True, help="output folder (written atomically)")
    sp.add_argument("-k", type=int, required=True, help="documents to select")
    sp.add_argument("--buckets", type=int, default=10_000, help="hash buckets (default 10000)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--min-length", type=int, default=100, help="minimum words per selected document")
    sp.add_argument("--deterministic", action="store_true", help="top-k by weight instead of Gumbel top-k sampling")
    sp.add_argument("--laplace", type=float, default=0.0, help="Laplace smoothing of the target counts")
    sp.add_argument("--text-field", default="text")
    sp.add_argument("--processes", type=int, help="worker processes (default: all cores for a large pool, "
                    "in-process for a small one)")
    sp.add_argument("--compat", action="store_true", help="the reference package's tokenizer and hash")
    sp.add_argument("--cache", help="per-shard cache folder (default: .<out>.dsir-cache beside --out); "
                    "a rerun resumes from it")
    sp.set_defaults(fn=cmd_select)
    sp = sub.add_parser("runs", help="list runs")
    sp.add_argument("--artifacts", default="artifacts")
    sp.set_defaults(fn=cmd_runs)
    sp = sub.add_parser("show", help="print a run's report")
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true", help="print report.json instead of report.md")
    sp.add_argument("--artifacts", default="artifacts")
    sp.set_defaults(fn=cmd_show)
    sp = sub.add_parser("serve", help="serve a recipe as a Prefect deployment (trigger from the UI, optional cron)")
    common(sp, run_name=False)
    sp.add_argument("--run-name", help="one run folder for every run of the deployment (default: each flow run "
                    "its own, named recipe name + config hash + flow run name + id)")
    sp.add_argument("--name", help="deployment name (default: the recipe name)")
    sp.add_argument("--cron", help="schedule, e.g. '0 2 * * *'")
    sp.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llm_compress.errors import CompressError

    try:
        return args.fn(args)
    except CompressError as e:
        log = getattr(e, "log_path", None)
        print(f"error: {e}" + (f"\n(traceback and full log: {log})" if log else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
