"""How the stages chain: which stages a recipe runs, what each one reads, and how it is called.

Kept free of Prefect so the wiring is testable and readable on its own. The Prefect flow
(:mod:`flows.pipeline`) walks :func:`plan` and runs each :class:`StageCall` as a task; tests can
walk it with :func:`run_local` and no orchestrator at all.

Order (fixed numbering, so ``NN-stage`` folders line up across runs):
00 bootstrap -> 01 select -> 02 data -> 03 distill -> 04 quantize -> 05 kv -> 06 unlearn
-> 07 evaluate -> 08 export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stages.config import Recipe
from stages.data import check_files
from stages.errors import InputError
from stages.io import code_version, stable_hash
from stages.modeling import check_model_ref, is_local_ref, load_tokenizer
from stages.result import StageResult
from stages.runner import execute, ref_digest, stage_key

STAGES = ("bootstrap", "select", "data", "distill", "quantize", "kv", "unlearn", "evaluate", "export")
INDEX = {s: i for i, s in enumerate(STAGES)}
MODEL_STAGES = ("distill", "quantize")  # stages that output a new model


def enabled(recipe: Recipe) -> list[str]:
    on = {"bootstrap": recipe.uses_embedded, "select": recipe.select.enabled, "data": True,
          "distill": recipe.distill.enabled, "quantize": recipe.quantize.enabled, "kv": recipe.kv.enabled,
          "unlearn": recipe.unlearn.enabled, "evaluate": recipe.evaluate.enabled, "export": recipe.export.enabled}
    return [s for s in STAGES if on[s]]


def preflight(recipe: Recipe) -> None:
    """Cheap checks of every user-given input, before any work starts."""
    if recipe.models.teacher != "embedded":
        check_model_ref(recipe.models.teacher, "models.teacher")
    if recipe.models.student != "derive":
        check_model_ref(recipe.models.student, "models.student")
    if recipe.models.tokenizer and is_local_ref(recipe.models.tokenizer) and not Path(recipe.models.tokenizer).exists():
        raise InputError(f"models.tokenizer: not found: {recipe.models.tokenizer}")
    check_files(recipe.data)
    q = recipe.quantize
    if q.enabled and q.scheme.method != "rtn" and q.scheme.calibration.file \
            and not Path(q.scheme.calibration.file).is_file():
        raise InputError(f"quantize.scheme.calibration.file: not found: {q.scheme.calibration.file}")
    if recipe.select.enabled:
        missing = [r for r in recipe.select.references() if r.split(":")[0] != "embedded" and not Path(r).exists()]
        if missing:
            raise InputError(f"select: raw/target path(s) not found: {', '.join(missing)}")
    t, st = recipe.models.teacher, recipe.models.student
    if t != "embedded" and st != "derive" and is_local_ref(t) and is_local_ref(st):
        tv, sv = _config_vocab(t), _config_vocab(st)
        if tv is not None and sv is not None and tv != sv:
            raise InputError(f"vocabulary mismatch: models.teacher has vocab_size {tv}, models.student has "
                             f"{sv}; teacher and student must share a tokenizer")


def _config_vocab(model_dir: str) -> int | None:
    import json

    cfg = json.loads((Path(model_dir).expanduser() / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the LM's config inside
    return cfg.get("vocab_size")


@dataclass
class StageCall:
    """One stage as the run will execute it: what defines it (config + inputs) and its cache key."""

    stage: str
    config: dict
    inputs: dict[str, str]
    input_digests: dict[str, str] = field(default_factory=dict)
    key: str = ""

    @property
    def index(self) -> int:
        return INDEX[self.stage]


def _out(done: dict[str, dict], stage: str, name: str) -> str:
    return done[stage]["outputs"][name]["path"]


def refs(recipe: Recipe, done: dict[str, dict]) -> dict[str, str]:
    """Resolve the teacher, tokenizer and current model references from finished stages."""
    m = recipe.models
    teacher = _out(done, "bootstrap", "teacher") if m.teacher == "embedded" else m.teacher
    tokenizer = m.tokenizer or (teacher if m.teacher != "embedded" else _out(done, "bootstrap", "tokenizer"))
    model = teacher if m.student == "derive" else m.student  # what the model stages start from
    for s in MODEL_STAGES:
        if s in done:
            model = _out(done, s, "model")
    return {"teacher": teacher, "tokenizer": tokenizer, "model": model}


def candidates(recipe: Recipe, done: dict[str, dict]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Models to evaluate (name -> ref, in pipeline order) and (stage, its input's name) pairs for gates."""
    cands: dict[str, str] = {}
    prev = "teacher"
    if recipe.models.student != "derive":
        cands["student"] = recipe.models.student
        prev = "student"
    chain = []
    for s in MODEL_STAGES:
        if s in done:
            cands[s] = _out(done, s, "model")
            chain.append((s, prev))
            prev = s
    return cands, chain


def _select_paths(ref: str, done: dict[str, dict]) -> list[str]:
    """Resolve a select.raw / select.targets entry: 'embedded[:domain]' names embedded training splits."""
    scheme, _, domain = ref.partition(":")
    if scheme != "embedded":
        return [ref]
    corpus = Path(_out(done, "bootstrap", "corpus"))
    domains = sorted(p.name for p in corpus.iterdir() if (p / "train.jsonl").is_file())
    if domain and domain not in domains:
        raise InputError(f"select: unknown embedded domain '{domain}'; the embedded corpus has {domains}")
    return [str(corpus / d / "train.jsonl") for d in ([domain] if domain else domains)]


def make_call(recipe: Recipe, stage: str, done: dict[str, dict]) -> StageCall:
    """Config sections and inputs that define ``stage`` given the finished upstream stages."""
    r = refs(recipe, done) if stage != "bootstrap" else {}
    dumps = lambda *names: {n: getattr(recipe, n).model_dump(mode="json") for n in names}  # noqa: E731
    runtime = {"seed": recipe.runtime.seed, "device": recipe.runtime.device}
    if stage == "bootstrap":
        config = {**dumps("embedded"), "runtime": runtime, "train_teacher": recipe.models.teacher == "embedded"}
        if recipe.embedded.site_packages:  # that corpus is read from whatever is installed: part of the key
            from stages.embedded import installed_distributions

            config["distributions"] = stable_hash(installed_distributions())
        inputs: dict[str, str] = {}
    elif stage == "select":
        config = dumps("select")
        inputs = {f"raw{i}": p for i, p in enumerate(p for ref in recipe.select.raw for p in _select_paths(ref, done))}
        for t, spec in enumerate(recipe.select.targets):
            paths = [p for ref in spec.paths for p in _select_paths(ref, done)]
            inputs.update({f"target{t}.{j}": p for j, p in enumerate(paths)})
    elif stage == "data":
        config = dumps("data")
        inputs = {"tokenizer": r["tokenizer"]}
        if "select" in done:
            inputs["selected"] = _out(done, "select", "selected")
            config["train_text_field"] = recipe.select.dsir.text_field
        if recipe.data.source == "embedded":
            inputs["corpus"] = _out(done, "bootstrap", "corpus")
        elif recipe.data.source == "files":
            inputs.update({f"train{i}": p for i, p in enumerate(recipe.data.train)})
            inputs.update({f"eval{i}": p for i, p in enumerate(recipe.data.eval)})
    elif stage == "distill":
        config = {**dumps("distill", "models"), "runtime": runtime}
        inputs = {"teacher": r["teacher"], "student": recipe.models.student, "tokenizer": r["tokenizer"],
                  "train": _out(done, "data", "train"), "eval": _out(done, "data", "eval")}
        if recipe.models.student == "derive":
            inputs.pop("student")
    elif stage == "quantize":
        config = {**dumps("quantize"), "dtype": recipe.models.dtype, "runtime": runtime}
        inputs = {"model": r["model"]}
        s = recipe.quantize.scheme
        if s.method != "rtn":  # calibrated methods: a given file, or the (DSIR-selected) training tokens
            inputs["calib"] = s.calibration.file or _out(done, "data", "train")
            if s.calibration.file:
                config["calib_seq_len"] = recipe.data.seq_len
    elif stage == "evaluate":
        config = {**dumps("evaluate", "models"), "runtime": runtime}
        cands, _ = candidates(recipe, done)
        inputs = {"teacher": r["teacher"], "eval": _out(done, "data", "eval"),
                  **{f"model:{k}": v for k, v in cands.items()}}
    elif stage == "export":
        config = {**dumps("export"), "runtime": runtime}
        inputs = {"model": r["model"], "eval": _out(done, "data", "eval")}
    else:  # kv, unlearn: validation refuses them while they are not built
        raise InputError(f"stage '{stage}' is not built yet in this version")
    digests = {}
    for name, ref in inputs.items():
        upstream = next((o["sha256"] for d in done.values() for o in d["outputs"].values() if o["path"] == ref), None)
        digests[name] = upstream or ref_digest(ref, recipe.models.revision)
    call = StageCall(stage=stage, config=config, inputs=inputs, input_digests=digests)
    call.key = stage_key(stage, config, digests)
    return call


def teacher_cache_key(recipe: Recipe, call: StageCall) -> str:
    """What cached teacher top-k values depend on: teacher and token digests, k, temperature, device, dtype."""
    d = recipe.distill
    return stable_hash({"teacher": call.input_digests["teacher"], "train": call.input_digests["train"],
                        "eval": call.input_digests["eval"], "k": d.teacher.topk,
                        "temperature": d.temperature, "dtype": recipe.models.dtype, "device": recipe.runtime.device,
                        "code": code_version()})[:24]


def invoke(recipe: Recipe, call: StageCall, out_dir: Path, artifacts_root: Path) -> StageResult:
    """Run the stage's algorithm, writing into ``out_dir`` (a temporary dir the runner publishes)."""
    from stages import bootstrap, data, distill, evaluate, export
    from stages.quantize import apply as quantize

    i, m, rt = call.inputs, recipe.models, recipe.runtime

    def tok():
        return load_tokenizer(i["tokenizer"], trust_remote_code=m.trust_remote_code, revision=m.revision)

    if call.stage == "bootstrap":
        return bootstrap.run(recipe.embedded, rt, train_teacher=call.config["train_teacher"], out_dir=out_dir)
    if call.stage == "select":
        from stages.dsir import TargetSpec, run_selection

        sel = recipe.select
        raw = [v for k, v in i.items() if k.startswith("raw")]
        targets = [TargetSpec(paths=[v for k, v in i.items() if k.startswith(f"target{t}.")],
                              proportion=spec.proportion, name=spec.name or f"target{t}")
                   for t, spec in enumerate(sel.targets)]
        # Per-shard results live beside the runs, keyed by shard content + settings: an interrupted
        # selection resumes, and other runs over the same pool reuse the featurized shards.
        return run_selection(sel.dsir, raw, targets, out_dir, cache_dir=artifacts_root / ".cache" / "dsir",
                             progress=rt.progress)
    if call.stage == "data":
        return data.run(recipe.data, tok(), out_dir, Path(i["corpus"]) if "corpus" in i else None,
                        selected=Path(i["selected"]) if "selected" in i else None,
                        selected_text_field=call.config.get("train_text_field", "text"))
    if call.stage == "distill":
        return distill.run(recipe.distill, m, rt, teacher_ref=i["teacher"], student_ref=i.get("student", "derive"),
                           tokenizer=tok(), train_path=Path(i["train"]), eval_path=Path(i["eval"]), out_dir=out_dir,
                           checkpoint_dir=artifacts_root / ".cache" / "checkpoints" / call.key,
                           teacher_cache_dir=artifacts_root / ".cache" / "teacher-topk" / teacher_cache_key(recipe, call))
    if call.stage == "quantize":
        return quantize.run(recipe.quantize, m, rt, model_dir=Path(i["model"]), out_dir=out_dir,
                            calib_path=Path(i["calib"]) if "calib" in i else None,
                            calib_seq_len=call.config.get("calib_seq_len"))
    if call.stage == "evaluate":
        cands = {k.split(":", 1)[1]: v for k, v in i.items() if k.startswith("model:")}
        return evaluate.run(recipe.evaluate, m, rt, teacher_ref=i["teacher"], candidates=cands,
                            eval_path=Path(i["eval"]), out_dir=out_dir)
    if call.stage == "export":
        from stages.data import load_tokens

        e = recipe.export
        ids = load_tokens(i["eval"])[: e.check_batch_size, : e.check_seq_len]
        from stages.modeling import resolve_device

        return export.run_export(e, Path(i["model"]), out_dir, check_ids=ids, seed=rt.seed,
                                 device=str(resolve_device(rt.device)), progress=rt.progress)
    raise InputError(f"stage '{call.stage}' is not built yet in this version")


def run_call(recipe: Recipe, call: StageCall, run_dir: Path, artifacts_root: Path) -> dict:
    return execute(stage=call.stage, index=call.index, key=call.key, config=call.config, inputs=call.inputs,
                   input_digests=call.input_digests, run_dir=run_dir, artifacts_root=artifacts_root,
                   seed=recipe.runtime.seed, fn=lambda out: invoke(recipe, call, out, artifacts_root))


def enforce_gates(recipe: Recipe, done: dict[str, dict]) -> None:
    """After evaluation: raise GateError naming every missed gate (nothing is exported then)."""
    from stages.evaluate import enforce_gates as _enforce

    _, chain = candidates(recipe, done)
    ev = done["evaluate"]["metrics"]
    _enforce(recipe.gates, ev["models"], ev["final"], chain)


def run_local(recipe: Recipe, run_dir: Path, artifacts_root: Path) -> dict[str, dict]:
    """Run every enabled stage in order without an orchestrator; returns the manifests."""
    preflight(recipe)
    done: dict[str, dict] = {}
    for stage in enabled(recipe):
        done[stage] = run_call(recipe, make_call(recipe, stage, done), run_dir, artifacts_root)
        if stage == "evaluate":
            enforce_gates(recipe, done)
    return done
