"""KV-cache compression on a long-context model: bytes the cache holds vs quality and decode speed.

    python bench/bench_kv.py [--caches full quanto:4 quanto:2 hqq:4 hqq:2 kivi:k4v4:g32:r128 ...]
        [--contexts 256 512 1024] [--rows 32] [--score-tokens 127] [--new-tokens 128] [--repeats 3]
        [--dtypes float32 bfloat16] [--threads 1] [--artifacts artifacts] [--out bench/kv_kvlong.json]
        [--plot bench/kv_pareto.png] [--write-results]

Model: bench/recipes/kvlong.yaml (a Llama teacher, 8 layers, 8 query heads / 2 KV heads of 32, trained on
1,024-token rows), made by the pipeline's bootstrap stage and cached under ``--artifacts`` like any stage; the
held-out rows are the data stage's eval tokens (1,024 tokens each).

Cache specs (``--caches``); every measurement uses a fresh cache object (transformers' caches cannot be reused):
- ``full``: transformers' ``DynamicCache``, the reference; always run, first.
- ``quanto:<bits>[:g<group>][:r<residual>]`` and ``hqq:<bits>[:g<group>][:r<residual>]``: transformers'
  ``QuantizedCache`` with that backend. optimum-quanto and hqq are not project dependencies: without them the row
  is skipped with a note. Groups are per token along head_dim for both backends (quanto axis 0, HQQ axis 1; HQQ's
  axis 0 would group strided elements across tokens); defaults g32 and r128 (transformers' residual default).
- a JSON object (``'{"method": "kivi", "bits": [2, 2], "residual": 32}'``) or a path to a kv_cache.json: the project's
  caches, built by ``llm_compress.kv.build_cache(spec, model)`` (``llm_compress/kv/``); the table names them by
  ``label``.

For each cache and context length C (the first C tokens of each of ``--rows`` held-out rows):
- memory over decoding, the KV stage's measurement (``llm_compress.kv.measure.MemoryTrace``): after every decode step
  of the quality pass below, the bytes the cache holds in a 16-bit deployment (floating-point tensors at 2 bytes per
  element whatever the run's dtype, codes, masks and pad counts as stored; each storage once): a project cache's
  ``held_tensors``, any other cache's every referenced tensor (``reachable_tensors``: attributes, lists, dicts, and
  into tensor subclasses such as quanto's packed tensors, whose wrapper reports the unpacked size); per row (the
  batch's bytes / rows). Against a 16-bit full cache of the same tokens, 2 (K, V) x layers x KV heads x tokens seen x
  head_dim x 2 bytes: the mean ratio (of the mean bytes) and the worst step's. Not a snapshot after the prompt,
  the best moment of most caches (KIVI's window empty, KVMerger just compressed, QuantizedCache's residual empty).
- quality, teacher-forced, as the KV stage measures it (``llm_compress.kv.measure.stepwise_logits`` and ``compare``, all
  rows as one batch): prefill the first C - 1 - S tokens (S = ``--score-tokens``), then feed the next S tokens one
  decode step at a time through the cache; each step's next-token distribution is scored, so every scored
  prediction reads the cache's stored (compressed) keys and values. Against ``full`` run the same way: perplexity
  ratio, KL(full || cache) mean per scored token, top-1 agreement.
- speed: greedy decode of ``--new-tokens`` tokens after a prefill of C tokens (row 0), only the decode steps timed,
  median of ``--repeats`` runs after one untimed run.
Each of ``--dtypes`` is a whole run with the model (and so the caches, and QuantizedCache's scales) in that dtype;
the memory figures are the 16-bit deployment's in all of them (a float32 run's own bytes: ``run_dtype_bytes_mean``).

With ``--retrieval`` (a model trained with ``embedded.retrieval``, e.g. ``--recipe bench/recipes/kvretrieval.yaml``):
each cache's retrieval accuracy by depth (``llm_compress.kv.retrieval``): ``--retrieval-probes`` held-out probes per
context (``--retrieval-contexts``, tokens) and depth (10 % to 90 % of the prompt), a 4-digit code planted there in the
data stage's eval tokens with three other facts and asked for at the end; greedy exact match of the code's tokens
through the cache (``llm_compress.kv.measure.retrieval_correct``), with 95 % bootstrap intervals over the probes and
the ratio to the full cache's accuracy (paired). ``--contexts`` may then be left empty to measure retrieval only.

``--write-results`` replaces (or appends) the "## KV cache (issue: KV-cache compression)" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "bench" / "recipes" / "kvlong.yaml"
SECTION = "## KV cache (issue: KV-cache compression)"
DEFAULT_CACHES = ["full", "quanto:4", "quanto:2", "hqq:4", "hqq:2"]
NOTES = """\
Columns, per cache and context length C (the first C tokens of each held-out row, all rows one batch):
- held KiB mean / max: bytes held per row after every decode step of the scored pass below (S steps, ending at
  C - 1 tokens seen), mean and maximum over the steps, as a 16-bit deployment holds them: every tensor the cache
  keeps (codes, scales, shifts / zeros, magnitudes, masks, pad counts, full-precision windows), floating-point ones
  at 2 bytes per element whatever the run's dtype, each storage once; quanto's packed tensors are opened (the
  wrapper's own storage reports the unpacked size). Steady state: the dequantised copies made during every decode
  step, and the full-precision K/V of the prompt pass, are transient and not counted.
- x smaller mean / min: a 16-bit full cache of the same tokens (2 x layers x KV heads x tokens x head_dim x 2 bytes)
  against the held bytes: mean full bytes / mean held bytes over the steps, and the worst step's ratio (KIVI just
  before its window is flushed, KVMerger just before a compression). `full` is 1.000 in every dtype.
  bits / element: 16 / x smaller (mean).
- ppl, ppl ratio, KL(full ‖ cache), top-1 agreement: teacher-forced. Prefill the first C - 1 - S tokens (S scored
  tokens), then feed the next S tokens one decode step at a time through the cache and score each step's
  next-token distribution, so every scored prediction reads the stored (compressed) K/V; the same with `full`
  (DynamicCache) is the reference. KL is the mean per scored token, in nats.
- decode tok/s, vs full: greedy decode of the new tokens after a prefill of C tokens (row 0), decode steps only,
  median of the timed runs after one untimed run; one thread on a shared 2-core machine, so only indicative.
- QuantizedCache settings: per-token groups of 32 along head_dim (= head_dim; quanto axis 0, HQQ axis 1: HQQ's axis
  0 groups strided elements across tokens), residual 128 (transformers' default). It quantises the whole prompt at
  the prefill and keeps up to 127 later tokens in full precision; S <= 127 scored steps stay within that residual,
  and the memory figures count the exact tokens it gathers there.
- The project's caches (`llm_compress/kv/`) are named by method and settings: `kivi k2v2 g32 r32` (key/value bits,
  group, residual; a KVTuner result is a per-layer kivi spec, named by its layers' pairs), `minicache` (start layer, t,
  gamma, bits under the merge), `kvmerger` (budget, threshold, window), `sink` (sinks + window)."""


class Unavailable(Exception):
    """A cache spec that cannot run here (a missing optional package or module); its row is skipped."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--caches", nargs="*", default=DEFAULT_CACHES, help="cache specs (module docstring)")
    ap.add_argument("--contexts", type=int, nargs="*", default=[256, 512, 1024])
    ap.add_argument("--rows", type=int, default=32, help="held-out rows per context")
    ap.add_argument("--score-tokens", type=int, default=127,
                    help="teacher-forced decode steps scored per row; odd so that the prefill (context - 1 - this) is "
                         "even: HF's HQQ backend packs 2-bit codes four groups to a byte and fails on an odd number "
                         "of tokens. 127 stays within QuantizedCache's default residual of 128 (no re-quantisation)")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens decoded for the speed figure")
    ap.add_argument("--repeats", type=int, default=3, help="timed decode runs per cache and context")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", nargs="*", choices=["float32", "bfloat16"], default=["float32"],
                    help="model (and so cache) dtypes, each a full run; quantised caches keep their scales in it")
    ap.add_argument("--recipe", default=str(RECIPE), help="the recipe whose bootstrap teacher and eval rows are used")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "kv_kvlong.json"))
    ap.add_argument("--plot", default=str(ROOT / "bench" / "kv_pareto.png"))
    ap.add_argument("--write-results", action="store_true", help=f"write the '{SECTION}' section of RESULTS.md")
    ap.add_argument("--from-json", help="skip measuring: redraw the plot and rewrite the section from this JSON "
                    "(an earlier run's --out)")
    ap.add_argument("--stage-dirs", nargs=2, metavar=("BOOTSTRAP_DIR", "DATA_DIR"),
                    help="take the model and rows from these finished stage folders (their manifest.json) instead of "
                         "the cached pipeline stages, e.g. to add rows to an earlier run after the stages' code "
                         "changed")
    ap.add_argument("--replace-in", help="measure --caches (full included, as the reference) and put their rows into "
                    "this earlier run's JSON in place of rows of the same dtype, cache and context; the section and "
                    "plot are then made from the merged JSON, which records this command under meta.remeasured")
    ap.add_argument("--kvtuner", type=float, nargs="*", default=[],
                    help="average-bit budgets: for each, run the KVTuner search (llm_compress.kv.kvtuner, optuna) on "
                         "training rows first and measure the chosen per-layer KIVI cache with the others")
    ap.add_argument("--retrieval", action="store_true",
                    help="also measure retrieval accuracy by depth (llm_compress.kv.retrieval: a code planted at a "
                         "depth of a held-out document, asked for at its end; greedy exact match through the cache) "
                         "with bootstrap intervals; needs a model trained with embedded.retrieval, e.g. "
                         "bench/recipes/kvretrieval.yaml. --contexts may then be empty (retrieval only)")
    ap.add_argument("--retrieval-contexts", type=int, nargs="+", default=[1024, 2048],
                    help="probe lengths in tokens (prompt + answer); at most the model's max_position_embeddings")
    ap.add_argument("--retrieval-probes", type=int, default=20, help="probes per context and depth")
    ap.add_argument("--retrieval-batch", type=int, default=10, help="probes decoded at once")
    ap.add_argument("--kvtuner-spec", default='{"method": "kvtuner", "strategy": "optuna", "trials": 60, '
                    '"group_size": 32, "residual": 32, "calib_rows": 4}',
                    help="the search's settings (JSON), budget added from --kvtuner")
    args = ap.parse_args()

    for c in args.contexts:
        if not args.score_tokens < c - 1:
            raise SystemExit(f"--score-tokens {args.score_tokens} leaves no prefill at context {c}")
        if (c - 1 - args.score_tokens) % 2 and any(s.startswith("hqq:") for s in args.caches):
            raise SystemExit(f"context {c} - 1 - --score-tokens {args.score_tokens} is odd: HQQ cannot pack it")

    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        return publish(args, data["meta"], over_decoding(data["results"], args.from_json))

    import torch

    torch.set_num_threads(args.threads)
    model, rows, calib, meta = prepare(Path(args.recipe), Path(args.artifacts).resolve(), args.rows,
                                       max(args.contexts, default=1), args.stage_dirs)
    items = retrieval_probes(model, meta, args) if args.retrieval else []
    specs = ["full"] + [s for s in args.caches if s != "full"]
    meta["kvtuner"] = []
    for budget in args.kvtuner:
        spec_path, record = tune(model, calib, json.loads(args.kvtuner_spec), budget, Path(args.out).parent)
        specs.append(str(spec_path))
        meta["kvtuner"].append(record)
    for spec in specs:
        label(spec)  # a malformed JSON spec fails here, before the model is trained or loaded
    results, skipped, retrieval = [], {}, []
    for dtype in args.dtypes:
        m = copy.deepcopy(model).to(getattr(torch, dtype))
        ref: dict[int, dict] = {}  # the full cache's scores per context, in this dtype
        for spec in specs:
            try:
                make = resolve(spec, m)
            except Unavailable as e:
                skipped[label(spec)] = str(e)
                print(f"{spec}: skipped ({e})", flush=True)
                continue
            for c in args.contexts:
                row = {"dtype": dtype, "cache": label(spec), **measure(m, rows, c, args, make, ref.get(c))}
                scores = row.pop("_scores", None)
                if spec == "full":
                    ref[c] = scores
                print(json.dumps(row), flush=True)
                results.append(row)
            if items:
                retrieval.append(measure_retrieval(m, items, make, args, dtype, label(spec), retrieval))

    if items:
        meta["retrieval"] = {"contexts": args.retrieval_contexts, "probes_per_depth": args.retrieval_probes,
                             "depths": sorted({p.depth for p in items}), "distractors": items[0].distractors,
                             "results": retrieval}
    meta.update({"dtypes": args.dtypes, "caches": [label(s) for s in specs], "skipped": skipped,
                 "contexts": args.contexts, "rows": len(rows),
                 "score_tokens": args.score_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                 "threads": torch.get_num_threads(), "machine": platform.platform(),
                 "python": platform.python_version(),
                 "torch": torch.__version__, "versions": versions(), "when": time.strftime("%Y-%m-%d %H:%M"),
                 "command": command()})
    if args.replace_in:
        meta, results = merged(Path(args.replace_in), meta, results)
        args.out = args.replace_in
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    publish(args, meta, results)


def over_decoding(results: list[dict], path) -> list[dict]:
    """``results`` if their memory was measured over the decode steps (``memory_ratio_mean``); an earlier run's rows
    (one snapshot after the prompt, run-dtype bytes) cannot share a table with them."""
    if any("memory_ratio_mean" not in r for r in results):
        raise SystemExit(f"{path}: its memory figures are snapshots after the prompt (before memory was measured over "
                         "the decode steps in a 16-bit deployment); measure those caches again")
    return results


def merged(path: Path, meta: dict, results: list[dict]) -> tuple[dict, list[dict]]:
    """The run in ``path`` with ``results`` (but ``full``) in place of its rows of the same (dtype, cache, context),
    new ones added at the end; its meta gains a ``remeasured`` entry (what, when, with which command)."""
    old = json.loads(path.read_text())
    over_decoding(old["results"], path)
    key = lambda r: (r["dtype"], r["cache"], r["context"])  # noqa: E731
    new = {key(r): r for r in results if r["cache"] != "full"}  # the earlier reference stays (its speed is what the
    # earlier rows' "vs full" divide by); the new rows' quality and speed ratios are to this run's own full cache
    rows = [new.pop(key(r), r) for r in old["results"]] + list(new.values())
    entry = {**{k: meta[k] for k in ("when", "command", "threads", "rows")},
             "caches": [c for c in meta["caches"] if c != "full"]}
    old["meta"]["caches"] += [c for c in meta["caches"] if c not in old["meta"]["caches"]]
    old["meta"].setdefault("remeasured", []).append(entry)
    return old["meta"], rows


def publish(args, meta: dict, results: list[dict]) -> None:
    """The Pareto plot, and with --write-results the RESULTS.md section."""
    if results:  # none when only retrieval was measured (--contexts left empty)
        pareto_plot(results, Path(args.plot), meta)
        print(f"wrote {args.plot}")
    if args.write_results:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_divergences import write_section

        path = write_section(SECTION, results_section(meta, results, meta.get("command") or command()))
        print(f"wrote {path}")


def prepare(recipe_path: Path, artifacts: Path, n_rows: int, max_context: int, stage_dirs: list[str] | None = None):
    """The recipe's bootstrap teacher (eval mode, float32), ``n_rows`` held-out rows [n_rows, T >= max_context] and
    16 training rows (KVTuner's calibration), trained or reused through the pipeline's cached bootstrap and data
    stages, or read from ``stage_dirs`` (an earlier run's bootstrap and data folders: no retraining when the
    stages' code has changed since); plus what describes them."""
    import torch
    import torch.nn.functional as F

    from llm_compress.config import load_recipe, parse_recipe
    from llm_compress.data import load_tokens
    from llm_compress.modeling import load_causal_lm
    from llm_compress.pipeline import make_call, run_call

    base = load_recipe(recipe_path).model_dump(mode="json")
    base["runtime"]["progress"] = False
    recipe = parse_recipe(base)
    done: dict = {}
    t0 = time.perf_counter()
    for i, stage in enumerate(("bootstrap", "data")):
        if stage_dirs:
            done[stage] = json.loads((Path(stage_dirs[i]) / "manifest.json").read_text())
        else:
            done[stage] = run_call(recipe, make_call(recipe, stage, done), artifacts / "bench-kv", artifacts)
    prep_s = time.perf_counter() - t0
    out = lambda s, o: done[s]["outputs"][o]["path"]  # noqa: E731
    model = load_causal_lm(out("bootstrap", "teacher"), what="teacher")
    eval_ids = load_tokens(Path(out("data", "eval")))
    if eval_ids.shape[1] < max_context:
        raise SystemExit(f"held-out rows have {eval_ids.shape[1]} tokens, fewer than the context {max_context}")
    if len(eval_ids) < n_rows:
        raise SystemExit(f"only {len(eval_ids)} held-out rows, --rows asks for {n_rows}")
    rows = eval_ids[:n_rows]

    # How good the model is on these rows (one plain forward each), against a unigram model of its training tokens
    # (add-one smoothed): the level a model that ignores context reaches.
    with torch.no_grad():
        nll = torch.cat([F.cross_entropy(model(input_ids=r[None]).logits[0, :-1].float(), r[1:], reduction="none")
                         for r in rows])
    # Perplexity by position in the row: how much of its context the model uses (documents are packed, so context
    # from an earlier document helps little).
    edges = [e for e in (1, 16, 64, 128, 256, 512) if e < max_context] + [max_context]
    by_position = {f"{a}-{b - 1}": round(math.exp(nll.view(len(rows), -1)[:, a - 1:b - 1].mean().item()), 1)
                   for a, b in zip(edges, edges[1:])}
    train_ids = load_tokens(Path(out("data", "train")))
    counts = torch.bincount(train_ids.flatten(), minlength=model.config.vocab_size).double() + 1
    unigram_nll = -(counts / counts.sum()).log()[rows[:, 1:].flatten()].mean().item()
    boot = done["bootstrap"].get("metrics", {})
    cfg = model.config
    meta = {"model": recipe_path.stem, "recipe": str(recipe_path.resolve().relative_to(ROOT)),
            "params": sum(p.numel() for p in model.parameters()),
            "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads", "vocab_size")},
            "head_dim": cfg.hidden_size // cfg.num_attention_heads,
            "teacher_steps": base["embedded"]["steps"], "train_seq_len": base["embedded"]["seq_len"],
            "bootstrap_eval_ppl": boot.get("teacher_eval_ppl"), "bootstrap_tokens_per_s": boot.get("tokens_per_s"),
            "bootstrap_seconds": done["bootstrap"].get("duration_s"),
            "rows_ppl_by_position": by_position,
            "rows_ppl": round(math.exp(nll.mean().item()), 3), "rows_unigram_ppl": round(math.exp(unigram_nll), 1),
            "eval_rows_available": len(eval_ids), "row_tokens": eval_ids.shape[1],
            "prepare_seconds": round(prep_s, 1),
            "tokenizer_dir": out("bootstrap", "tokenizer"), "eval_tokens": out("data", "eval")}
    print(f"{meta['model']}: {meta['params']:,} params, ppl {meta['rows_ppl']} on {n_rows} held-out rows "
          f"(unigram {meta['rows_unigram_ppl']})", flush=True)
    calib = train_ids[:16, :max_context]  # KVTuner's calibration rows (--kvtuner): training rows, not held-out ones
    return model, rows, calib, meta


def tune(model, calib, settings: dict, budget: float, out_dir: Path) -> tuple[Path, dict]:
    """Run the KVTuner search at ``budget`` on the first ``calib_rows`` of ``calib`` [n, T] (prompt: half of each
    row); write the chosen spec to ``out_dir/kv_kvtuner_b<budget>.json`` and the Pareto plot beside it."""
    from llm_compress.kv import save_kv_cache_json
    from llm_compress.kv.kvtuner import plot_pareto, search

    spec = {**settings, "budget": budget}
    rows = calib[: spec.get("calib_rows", 4)]
    t0 = time.perf_counter()
    result = search(model, rows, spec, prefill=rows.shape[1] // 2)
    seconds = time.perf_counter() - t0
    path = save_kv_cache_json(out_dir / f"kv_kvtuner_b{budget:g}.json", result["spec"])
    plot_pareto(result, out_dir / f"kv_kvtuner_b{budget:g}.png")
    rec = result["spec"]["search"]
    print(f"kvtuner budget {budget}: {rec['chosen']} ({rec['avg_bits']} bits, {rec['objective']} {rec['value']:.5f}, "
          f"{rec['measured']} measured in {seconds:.0f} s)", flush=True)
    return path, {"budget": budget, "spec": str(path.relative_to(ROOT)), "seconds": round(seconds, 1),
                  "sensitivity": result["sensitivity"], **{k: rec[k] for k in ("chosen", "avg_bits", "value",
                                                                                 "measured", "trials", "strategy")}}


def project_spec(spec: str) -> dict | None:
    """The project's cache spec that ``spec`` names (a JSON object or a kv_cache.json path), normalized; else None."""
    from llm_compress.kv import normalize_spec
    from llm_compress.kv.spec import read_spec

    if spec.lstrip().startswith("{"):
        return normalize_spec(json.loads(spec))
    return read_spec(spec) if Path(spec).exists() else None


def label(spec: str) -> str:
    """A short table name for a cache spec (NOTES)."""
    s = project_spec(spec) if spec not in ("full",) and spec.split(":")[0] not in ("quanto", "hqq") else None
    if s is None:
        return spec
    kivi = lambda b: f"k{b[0]}v{b[1]}"  # noqa: E731
    if s["method"] == "kivi":
        bits = s["bits"]
        if isinstance(bits[0], list):  # per layer: runs of equal pairs, e.g. k8v4x2 k2v2x6
            runs: list[list] = []
            for b in bits:
                if runs and runs[-1][0] == b:
                    runs[-1][1] += 1
                else:
                    runs.append([b, 1])
            bits_s = " ".join(f"{kivi(b)}x{n}" for b, n in runs)
        else:
            bits_s = kivi(bits)
        return f"kivi {bits_s} g{s['group_size']} r{s['residual']}"
    if s["method"] == "minicache":
        return (f"minicache s{s['start_layer'] if s['start_layer'] is not None else 'L/2'} t{s['t']} "
                f"γ{s['gamma']} {kivi(s['bits'])} r{s['residual']}")
    if s["method"] == "kvmerger":
        return f"kvmerger b{s['budget']} θ{s['threshold']} w{s['window']}"
    if s["method"] == "sink":
        return f"sink {s['sinks']}+{s['window']}"
    return json.dumps(s)


def resolve(spec: str, model) -> Callable:
    """A factory of fresh caches for ``spec`` (module docstring); raises Unavailable when it cannot run here."""
    from transformers import DynamicCache

    if spec == "full":
        return lambda: DynamicCache(config=model.config)
    backend = spec.split(":")[0]
    if backend in ("quanto", "hqq"):
        return quantized_cache(spec, model)
    from llm_compress.kv import build_cache

    parsed = project_spec(spec)
    if parsed is None:
        raise SystemExit(f"cache spec {spec!r}: not full, quanto:..., hqq:..., a JSON object or a kv_cache.json path")
    build_cache(parsed, model)  # fail early, before any measurement, on a spec the model cannot run
    return lambda: build_cache(parsed, model)


def quantized_cache(spec: str, model) -> Callable:
    """transformers' QuantizedCache from ``quanto|hqq:<bits>[:g<group>][:r<residual>]``."""
    from transformers import QuantizedCache

    backend, bits, *opts = spec.split(":")
    kw = {"nbits": int(bits), "q_group_size": 32, "residual_length": 128}
    for o in opts:
        if o[:1] == "g" and o[1:].isdigit():
            kw["q_group_size"] = int(o[1:])
        elif o[:1] == "r" and o[1:].isdigit():
            kw["residual_length"] = int(o[1:])
        else:
            raise SystemExit(f"cache spec {spec!r}: unknown option {o!r} (expected g<group> or r<residual>)")
    axis = 0 if backend == "quanto" else 1  # per token along head_dim for both (module docstring)
    make = lambda: QuantizedCache(backend, model.config, axis_key=axis, axis_value=axis, **kw)  # noqa: E731
    try:
        make()  # the layers import their backend when built
    except ImportError as e:
        raise Unavailable(f"{backend} is not installed ({e})") from None
    return make


def memory_figures(trace, rows: int) -> dict:
    """A ``MemoryTrace``'s figures of a batch of ``rows`` rows, per row: held bytes mean / max, the 16-bit full
    cache's mean, the mean and worst-step ratios, bits per element and this run's own bytes (module docstring)."""
    m = trace.summary()
    return {"bytes_mean": round(m["bytes_mean"] / rows), "bytes_max": round(m["bytes_max"] / rows),
            "full_bytes_mean": round(m["full_bytes_mean"] / rows),
            "memory_ratio_mean": round(m["memory_ratio_mean"], 4), "memory_ratio_min": round(m["memory_ratio_min"], 4),
            "bits_per_element": round(16 / m["memory_ratio_mean"], 3),
            "run_dtype_bytes_mean": round(m["run_dtype_bytes_mean"] / rows), "memory_steps": m["memory_steps"]}


def measure(model, rows, context: int, args, make: Callable, ref: dict | None) -> dict:
    """Memory over decoding and teacher-forced quality (against ``ref``, the full cache's scores; None when this is
    it) on one pass, and decode speed, of one cache at one context length (module docstring)."""
    import torch

    from llm_compress.kv.measure import MemoryTrace, compare, stepwise_logits

    t0 = time.perf_counter()
    prefill = context - 1 - args.score_tokens
    rows_c = rows[:, :context]
    cache, trace = make(), MemoryTrace(model.config, len(rows))
    scored = stepwise_logits(model, rows_c, prefill, cache, on_step=trace)  # [rows, context - prefill, V], one batch
    if cache.get_seq_length() != context - 1:  # positions and the full cache's bytes come from it: tokens seen
        raise RuntimeError(f"get_seq_length() is {cache.get_seq_length()} after {context - 1} tokens")
    # the decode steps' S predictions, of tokens prefill + 1 .. C - 1 (the prompt pass's own prediction is not scored)
    scored, target = scored[:, 1:], rows_c[:, prefill + 1:]
    score_s = time.perf_counter() - t0

    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            cache = make()
            logits = model(input_ids=rows[0][None, :context], past_key_values=cache, use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(args.new_tokens):
                tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    decode_s = statistics.median(times[1:])  # the first run warms up (quanto compiles its extension on first use)

    nll = torch.nn.functional.cross_entropy(scored.flatten(0, 1), target.flatten()).item()  # [rows * S, V]
    out = {"context": context, **memory_figures(trace, len(rows)),
           "ppl": round(math.exp(nll), 4), "scored_tokens": target.numel(),
           "decode_tokens_per_s": round(args.new_tokens / decode_s, 1), "decode_s_runs": [round(t, 3) for t in times],
           "score_seconds": round(score_s, 1)}
    if ref is None:
        out.update(ppl_ratio=1.0, kl=0.0, top1_agreement=1.0, decode_vs_full=1.0,
                   _scores={"logits": scored, "tokens_per_s": out["decode_tokens_per_s"]})
    else:
        q = compare(scored, ref["logits"], target)
        out.update(ppl_ratio=round(q["ppl_ratio"], 4), kl=round(q["kl_to_full"], 6),
                   top1_agreement=round(q["top1_agreement"], 4),
                   decode_vs_full=round(out["decode_tokens_per_s"] / ref["tokens_per_s"], 3))
    return out


def retrieval_probes(model, meta: dict, args) -> list:
    """The held-out retrieval probes (``llm_compress.kv.retrieval.probes``): their filler is the data stage's eval
    tokens, their facts encoded by the bootstrap's tokenizer; refused before any work when a context exceeds the
    model's positions."""
    from transformers import AutoTokenizer

    from llm_compress.data import load_tokens
    from llm_compress.kv.retrieval import probes

    limit = model.config.max_position_embeddings
    for c in args.retrieval_contexts:
        if c > limit:
            raise SystemExit(f"--retrieval-contexts: {c} tokens exceed the model's max_position_embeddings {limit}")
    if meta["train_seq_len"] < max(args.retrieval_contexts):
        print(f"note: the model was trained on {meta['train_seq_len']}-token rows, shorter than the longest probe",
              flush=True)
    tok = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    stream = load_tokens(meta["eval_tokens"]).flatten().tolist()
    return probes(stream, encode, contexts=args.retrieval_contexts, per_depth=args.retrieval_probes)


def measure_retrieval(model, items: list, make: Callable, args, dtype: str, name: str, done: list[dict]) -> dict:
    """Retrieval accuracy of one cache by context and depth, with bootstrap intervals, and against the full cache's
    (the first entry of ``done`` in this dtype) on the same probes; the per-probe results are kept for that."""
    from llm_compress.kv.measure import retrieval_correct
    from llm_compress.kv.retrieval import summarize

    t0 = time.perf_counter()
    correct = retrieval_correct(model, items, make, batch_size=args.retrieval_batch)
    ref = next((r["correct"] for r in done if r["dtype"] == dtype and r["cache"] == "full"), None)
    row = {"dtype": dtype, "cache": name, "seconds": round(time.perf_counter() - t0, 1),
           "summary": summarize(items, correct, ref), "correct": correct}
    print(json.dumps({k: v for k, v in row.items() if k != "correct"}), flush=True)
    return row


def retrieval_table(r: dict) -> list[str]:
    """The retrieval section's lines: accuracy [95 % bootstrap interval] per cache, context and depth of the fact,
    and over all depths against the full cache's."""
    ci = lambda c: f"{c['accuracy']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]"  # noqa: E731
    depths = [f"{d:g}" for d in r["depths"]]
    lines = ["", f"Retrieval (`--retrieval`, llm_compress/kv/retrieval.py): {r['probes_per_depth']} held-out probes per "
             f"context and depth, each a code planted at that depth of held-out text with {r['distractors']} other "
             "facts, asked for at the end; greedy exact match of the code through the cache; accuracy [95 % bootstrap "
             "interval over the probes]; vs full: the ratio of accuracies, paired bootstrap.", "",
             "| dtype | cache | context | all depths | " + " | ".join(f"depth {d}" for d in depths) + " | vs full |",
             "|---|---|---|---|" + "---|" * len(depths) + "---|"]
    for row in r["results"]:
        for context, cells in row["summary"].items():
            a = cells["all"]
            vs = "—" if a.get("vs_ref") is None else f"{a['vs_ref']:.2f} [{a['vs_ref_lo']:.2f}, {a['vs_ref_hi']:.2f}]"
            lines.append(f"| {row['dtype']} | {row['cache']} | {context} | {ci(a)} | "
                         + " | ".join(ci(cells[d]) for d in depths) + f" | {vs} |")
    return lines


def versions() -> dict:
    found = {}
    for name in ("transformers", "optimum-quanto", "hqq"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def command() -> str:
    return "python bench/bench_kv.py " + shlex.join(sys.argv[1:])


def pareto_plot(results: list[dict], path: Path, meta: dict) -> None:
    """Compression (x: a 16-bit full cache's bytes / bytes held, higher is smaller) vs perplexity ratio (y), a panel
    per (dtype, context): a colour and marker per cache, and the Pareto front (lowest perplexity ratio at or beyond
    each compression) as a step line; the dashed lines mark the issue's goal (5x at no more than 1 % perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    caches = list(dict.fromkeys(r["cache"] for r in results))
    contexts = sorted({r["context"] for r in results})
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    style = {n: (plt.get_cmap("tab20")(i % 20), "o^vsDPX*<>phH8d"[i % 15]) for i, n in enumerate(caches)}
    panels = [(d, c) for d in dtypes for c in contexts]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 3.5, 5.0), squeeze=False)
    for ax, (dtype, c) in zip(axes[0], panels):
        pts = sorted(((r["memory_ratio_mean"], r["ppl_ratio"], r["cache"]) for r in results
                      if r["context"] == c and r["dtype"] == dtype), reverse=True)
        for x, y, name in pts:
            ax.scatter(x, y, color=style[name][0], marker=style[name][1], s=36, zorder=3, edgecolors="black",
                       linewidths=0.3)
        front, best = [], math.inf
        for x, y, _ in pts:  # by decreasing compression: the lowest perplexity at or beyond each
            if y < best:
                front.append((x, y))
                best = y
        ax.plot([p[0] for p in front], [p[1] for p in front], color="grey", alpha=0.6, drawstyle="steps-pre")
        ax.axvline(5.0, color="C3", ls="--", lw=0.8)
        ax.axhline(1.01, color="C3", ls="--", lw=0.8)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("16-bit full cache / bytes held (mean over the decode steps)")
        ax.set_ylabel("perplexity / full cache's (teacher-forced decode steps)")
        ax.set_title(f"context {c}, {dtype} model", fontsize=10)
    cfg = meta["config"]
    fig.suptitle(f"KV caches on {meta['model']} ({cfg['num_hidden_layers']} layers, {cfg['num_key_value_heads']} KV "
                 f"heads x {meta['head_dim']}); dashed: 5x and +1 % perplexity", fontsize=10)
    handles = [Line2D([], [], color=style[n][0], marker=style[n][1], ls="", markeredgecolor="black",
                      markeredgewidth=0.3, label=n) for n in caches]
    fig.legend(handles=handles, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 3.4 / (5.2 * len(panels) + 3.5), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_section(meta: dict, results: list[dict], cmd: str) -> str:
    """The RESULTS.md section: what was run, on what, and the table."""
    cfg, v = meta["config"], meta["versions"]
    extra = [f"{name} {v[name]}" for name in ("optimum-quanto", "hqq") if v[name]]
    peers = (f"from a virtualenv with the project plus {' and '.join(extra)} (not project dependencies)" if extra
             else "in the project's virtualenv (neither optimum-quanto nor hqq installed)")
    lines = [
        SECTION, "",
        f"Command: `{cmd}` (writes `bench/kv_kvlong.json` and `bench/kv_pareto.png`), run {peers}; transformers "
        f"{meta['versions']['transformers']}, torch {meta['torch']}, {meta['threads']} thread(s), {meta['machine']}, "
        f"Python {meta['python']}, {meta['when']}.",
        "",
        f"Model: `{meta['recipe']}`, a Llama teacher trained by the bootstrap stage on {meta['train_seq_len']}-token "
        f"rows: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} query "
        f"heads / {cfg['num_key_value_heads']} KV heads of {meta['head_dim']}, MLP {cfg['intermediate_size']}, "
        f"vocabulary {cfg['vocab_size']}, {meta['params']:,} parameters, {meta['teacher_steps']} steps. Held-out "
        f"perplexity {meta['bootstrap_eval_ppl']} (bootstrap's figure, its first 64 eval rows); "
        f"{meta['rows_ppl']} on the {meta['rows']} rows used here, whose unigram perplexity (add-one unigram of "
        f"the training tokens) is {meta['rows_unigram_ppl']}.",
        "",
        f"Settings: S = {meta['score_tokens']} scored tokens per row x {meta['rows']} rows per context; "
        f"{meta['new_tokens']} new tokens per decode run, median of {meta['repeats']} runs.",
        "", NOTES,
    ]
    order = {c: i for i, c in enumerate(meta["caches"])}
    for dtype in meta["dtypes"]:
        lines += ["", f"{dtype} model (a full cache and quantisation scales in {dtype}):", "",
                  "| cache | context | held KiB mean | held KiB max | x smaller mean | x smaller min | bits / element "
                  "| ppl | ppl ratio | KL(full ‖ cache) | top-1 agreement | decode tok/s | vs full |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = sorted((r for r in results if r["dtype"] == dtype), key=lambda r: (r["context"], order[r["cache"]]))
        for r in rows:
            lines.append(f"| {r['cache']} | {r['context']} | {r['bytes_mean'] / 1024:,.1f} | "
                         f"{r['bytes_max'] / 1024:,.1f} | {r['memory_ratio_mean']:.3f} | {r['memory_ratio_min']:.3f} | "
                         f"{r['bits_per_element']:.2f} | {r['ppl']:.2f} | "
                         f"{r['ppl_ratio']:.4f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | "
                         f"{r['decode_tokens_per_s']:.0f} | {r['decode_vs_full']:.2f} |")
    if meta.get("retrieval"):
        lines += retrieval_table(meta["retrieval"])
    for t in meta.get("kvtuner", []):
        lines += ["", f"KVTuner at a budget of {t['budget']:g} bits ({t['strategy']}, {t.get('trials', t['measured'])} "
                  f"trials in {t['seconds']:.0f} s on 4 training rows of the context, prompts of half a row; "
                  f"`{t['spec']}`, its Pareto plot beside it): per layer {' '.join(t['chosen'])}, {t['avg_bits']:g} "
                  f"average bits, KL {t['value']:.5f} on the calibration rows. Layer sensitivity (KL with one layer "
                  "at KV2, the others unquantized): " + ", ".join(f"{i}: {row['KV2']:.4f}" for i, row in
                                                                   enumerate(t["sensitivity"])) + "."]
    for m in meta.get("remeasured", []):
        lines += ["", f"Re-measured on {m['when']} (the rows of {', '.join(f'`{c}`' for c in m['caches'])}, "
                  f"replacing earlier ones): `{m['command']}`."]
    if meta["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"`{k}`: {v}" for k, v in meta["skipped"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
