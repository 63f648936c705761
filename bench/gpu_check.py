"""GPU check: the compression chain at a few hundred million parameters on one GPU, and its figures.

    bash bench/gpu_check.sh                      # on the device machine, from the repo root (see its header)
    python bench/gpu_check.py --tiny --artifacts /tmp/gc --out /tmp/gc/g.json   # the same chain at CPU size

Runs bench/recipes/gpu.yaml: the embedded world (a Llama teacher pretrained in bfloat16 on CUDA), distill, GPTQ
W4A16 g128, evaluate, export (safetensors, compressed-tensors, onnx-int4, bnb-nf4); then the same recipe with an
OSTQuant W4A4KV4 quantize stage (export safetensors only: that setting needs run-time parts) into the same artifacts
folder, where it reuses the cached bootstrap, data and distill stages. The stages are walked one at a time, as
llm_compress.pipeline.run_local walks them, so that each stage's peak GPU memory can be taken.

Every figure comes from the stages' manifests (metrics, duration_s) and their history.jsonl files, plus the wall
time and peak GPU memory measured here around each stage. The JSON (--out) is rewritten after every stage, so a run
stopped at its time limit keeps what it measured; so is the section `## GPU check (bench/gpu_check.sh)` of the
results file (bench/RESULTS.md; with --tiny only when --results is given), replaced in place or appended.

Imports llm_compress/ only, never llm_compress/flows/ (no Prefect): the device machine needs only the wheels
gpu_check.sh lists.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the device machine has no network: never wait on the hub

RECIPE = ROOT / "bench" / "recipes" / "gpu.yaml"
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## GPU check (bench/gpu_check.sh)"
GIB = 2**30

# command-line size flags -> the recipe keys each one sets
SIZE_FLAGS = {
    "hidden": ("embedded.hidden_size",), "layers": ("embedded.num_layers",), "heads": ("embedded.num_heads",),
    "kv_heads": ("embedded.num_kv_heads",), "intermediate": ("embedded.intermediate_size",),
    "vocab": ("embedded.vocab_size",), "seq_len": ("embedded.seq_len", "data.seq_len"),
    "pretrain_steps": ("embedded.steps",), "pretrain_batch": ("embedded.batch_size",),
    "corpus_mb": ("embedded.max_corpus_mb",), "distill_steps": ("distill.steps",),
    "distill_batch": ("distill.batch_size",), "group_size": ("quantize.scheme.group_size",),
    "compile": ("distill.compile",),
}

# --tiny: the same chain at CPU size, ~15 s on 2 cores. Hidden 64 as in configs/tiny.yaml: at hidden 32 (16-row k/v
# projections) the bnb-nf4 export failed to reload on CPU ("shape '[32, 0]' is invalid"); the 512-token embeddings
# are then most of the ~210k parameters. Group 32 divides hidden 64 and MLP 128 (MatMulNBits needs >= 16).
TINY = {
    "embedded.vocab_size": 512, "embedded.hidden_size": 64, "embedded.num_layers": 4, "embedded.num_heads": 4,
    "embedded.num_kv_heads": 2, "embedded.intermediate_size": 128, "embedded.seq_len": 64, "embedded.steps": 200,
    "embedded.batch_size": 8, "embedded.lr": 3e-3, "embedded.max_corpus_mb": 0.3, "data.seq_len": 64,
    "distill.steps": 40, "distill.batch_size": 8, "distill.warmup_steps": 4, "distill.eval_every": 20,
    "distill.lr": 2e-3, "quantize.scheme.group_size": 32, "quantize.scheme.calibration.samples": 16,
    "evaluate.max_eval_tokens": 1024, "evaluate.latency_new_tokens": 8, "evaluate.latency_repeats": 1,
    "export.check_seq_len": 64, "models.dtype": "float32", "runtime.device": "cpu",
}
TINY_OST = {"steps": 5, "batch_size": 2}
OST_SETTING = "W4A4KV4"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized chain (float32, device cpu), seconds")
    ap.add_argument("--artifacts", default="/tmp/gpu-artifacts", help="artifacts root (the stage cache lives there)")
    ap.add_argument("--out", default=None, help="JSON of the figures (default <artifacts>/gpu_check.json)")
    ap.add_argument("--results", default=None, help=f"results file whose GPU-check section is rewritten (default "
                    f"{RESULTS.relative_to(ROOT)}, not with --tiny unless given)")
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    for flag, keys in SIZE_FLAGS.items():
        kind = str if flag == "compile" else float if flag == "corpus_mb" else int
        ap.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None,
                        choices=("auto", "always", "never") if flag == "compile" else None,
                        help=f"sets {', '.join(keys)}")
    ap.add_argument("--ost-steps", type=int, default=None, help="OSTQuant calibration steps (default 100)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="any recipe override, for both variants (e.g. --set evaluate.latency_repeats=1)")
    return ap.parse_args(argv)


def recipe_data(args: argparse.Namespace) -> tuple[dict, dict]:
    """(GPTQ recipe, OSTQuant recipe) as raw mappings: the recipe file, then --tiny, size flags and --set."""
    import yaml

    from llm_compress.config import apply_overrides

    data = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8")) or {}
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items()] if args.tiny else []
    for flag, keys in SIZE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides += [f"{k}={json.dumps(value)}" for k in keys]
    data = apply_overrides(data, overrides + list(args.sets))
    gptq = data["quantize"]["scheme"]
    ost = copy.deepcopy(data)
    ost["name"] = f"{data.get('name', 'gpu-check')}-ostquant"
    ost["quantize"]["scheme"] = {"method": "ostquant", "setting": OST_SETTING, "group_size": gptq.get("group_size"),
                                 "calibration": gptq.get("calibration", {}), **(TINY_OST if args.tiny else {}),
                                 **({"steps": args.ost_steps} if args.ost_steps is not None else {})}
    ost["export"]["formats"] = ["safetensors"]
    return data, ost


# --------------------------------------------------------------------------------------------
# running


def cuda_in_use(recipe) -> bool:
    import torch

    return recipe.runtime.device == "cuda" or (recipe.runtime.device == "auto" and torch.cuda.is_available())


def run_stages(recipe, run_dir: Path, root: Path, on_stage) -> dict[str, dict]:
    """llm_compress.pipeline.run_local, one stage at a time: ``on_stage(stage, manifest, wall_s, peak_bytes)`` after
    each (peak: max GPU memory allocated during the stage, None off CUDA). A failed stage calls
    ``on_stage(stage, its failed manifest or None, wall_s, peak, error)`` and raises."""
    import torch

    from llm_compress.pipeline import after, enabled, make_call, preflight, run_call
    from llm_compress.runner import digest_memo_dir
    from llm_compress.stage import Env

    cuda = cuda_in_use(recipe) and torch.cuda.is_available()  # without a GPU the stages' resolve_device refuses
    preflight(recipe)
    env = Env.resolve(recipe)
    done: dict[str, dict] = {}
    for stage in enabled(recipe):
        if cuda:  # what the stage before left behind is freed, so the peak is this stage's own
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            done[stage] = run_call(recipe, make_call(recipe, stage, done, env, digest_memo_dir(root)), run_dir, root)
            after(recipe, stage, done)
        except Exception as e:
            peak = torch.cuda.max_memory_allocated() if cuda else None
            on_stage(stage, getattr(e, "manifest", None), time.perf_counter() - t0, peak, f"{type(e).__name__}: {e}")
            raise
        on_stage(stage, done[stage], time.perf_counter() - t0, torch.cuda.max_memory_allocated() if cuda else None)
    return done


# --------------------------------------------------------------------------------------------
# figures


def history(manifest: dict) -> list[dict]:
    out = manifest["outputs"].get("history")
    if not out or not Path(out["path"]).is_file():
        return []
    return [json.loads(line) for line in Path(out["path"]).read_text().splitlines() if line.strip()]


def steady_tokens_per_s(records: list[dict]) -> float | None:
    """Tokens/s from the step after the first 10 % of steps (at least step 2: the first holds compilation and
    kernel selection) to the last, the held-out evaluations in between included. Each record's tokens_per_s is
    cumulative since the loop's start, so its elapsed time is step * tokens_per_step / tokens_per_s, and
    tokens_per_step cancels out."""
    recs = [r for r in records if r.get("tokens_per_s")]
    if len(recs) < 3:
        return None
    a, b = recs[max(1, len(recs) // 10)], recs[-1]
    span = b["step"] / b["tokens_per_s"] - a["step"] / a["tokens_per_s"]  # elapsed seconds / tokens per step
    return round((b["step"] - a["step"]) / span, 1) if span > 0 else None


def train_flops_per_token(params: int, vocab: int, hidden: int, layers: int, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), PaLM's count: 6 N + 12 L h T, N the matmul parameters (all but
    the input embedding table [V, h], which is a gather; the untied lm_head is a matmul)."""
    return 6 * (params - vocab * hidden) + 12 * layers * hidden * seq_len


def throughput(manifest: dict, flops_per_token: int | None) -> dict:
    m = manifest["metrics"]
    steady = steady_tokens_per_s(history(manifest))
    out = {"tokens_per_s": m.get("tokens_per_s"), "tokens_per_s_steady": steady, "steps": m.get("steps"),
           "tokens": m.get("tokens_seen")}
    if flops_per_token:
        out["flops_per_token"] = flops_per_token
        out["tflops_steady"] = round(steady * flops_per_token / 1e12, 2) if steady else None
    return out


def model_row(ev: dict) -> dict:
    keys = ("ppl", "kl_to_teacher", "top1_agreement", "params", "bytes_on_disk", "latency_ms_per_token", "runtime")
    return {k: ev.get(k) for k in keys}


def export_row(m: dict, device: str) -> dict:
    """One format's figures; ``provider``: ONNX Runtime's execution provider, else the torch device it ran on."""
    keys = ("passed", "bytes", "max_abs_diff", "kl", "top1_agreement", "build_seconds", "error")
    return {**{k: m[k] for k in keys if k in m}, "provider": m.get("provider") or f"torch ({device})"}


class Check:
    """The figures of one gpu_check run, gathered stage by stage and saved after each."""

    def __init__(self, args: argparse.Namespace, recipes: dict, out: Path, results: Path | None):
        import torch
        import transformers

        from llm_compress.io import package_versions

        self.out, self.results, self.t0 = out, results, time.perf_counter()
        first = next(iter(recipes.values()))
        cuda = cuda_in_use(first)
        e = first.embedded
        try:
            import onnxruntime

            providers = onnxruntime.get_available_providers()
        except ImportError:
            providers = None
        versions = package_versions(("onnxruntime", "onnxruntime-gpu", "bitsandbytes", "compressed-tensors",
                                     "optimum-onnx"))
        self.r: dict = {
            "status": "running", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "tiny": args.tiny, "argv": " ".join(["python3", *sys.argv]),
            "command": os.environ.get("GPU_CHECK_COMMAND") or " ".join(["python3", *sys.argv]),
            "device": "cpu" if not cuda else torch.cuda.get_device_name(0) if torch.cuda.is_available() else
            "none (runtime.device is cuda, but torch sees no CUDA device)",
            "host": f"{platform.machine()}, {os.cpu_count()} CPU cores", "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "transformers": transformers.__version__,
            **{k.replace("-", "_"): v for k, v in versions.items() if v != "not installed"},
            "onnxruntime_providers": providers,
            "config": {"hidden_size": e.hidden_size, "num_layers": e.num_layers, "num_heads": e.num_heads,
                       "num_kv_heads": e.num_kv_heads, "intermediate_size": e.intermediate_size,
                       "vocab_size_asked": e.vocab_size, "seq_len": e.seq_len, "pretrain_steps": e.steps,
                       "pretrain_batch": e.batch_size, "distill_steps": first.distill.steps,
                       "distill_batch": first.distill.batch_size, "dtype": first.models.dtype,
                       "compile": first.distill.compile, "max_corpus_mb": e.max_corpus_mb},
            "variants": {name: f"{r.quantize.scheme.method} {r.quantize.scheme.setting} g{r.quantize.scheme.group_size}"
                         + (f", {r.quantize.scheme.steps} steps" if r.quantize.scheme.method == "ostquant" else "")
                         + f"; export {', '.join(r.export.formats)}" for name, r in recipes.items()},
            "params": {}, "throughput": {}, "stages": [], "quality": {}, "quantize": {}, "exports": {},
            "errors": {}, "peak_gpu_gib": None, "wall_s": None,
        }
        self.peak = 0

    def stage_done(self, variant: str, stage: str, manifest: dict | None, wall_s: float, peak: int | None,
                   error: str | None = None) -> None:
        r = self.r
        ran = manifest is not None and not manifest.get("reused")
        row = {"variant": variant, "stage": stage, "state": "failed" if error else "ran" if ran else "cached",
               "duration_s": manifest.get("duration_s") if manifest else None, "wall_s": round(wall_s, 2),
               "peak_gpu_gib": round(peak / GIB, 3) if peak is not None and (ran or error) else None}
        if error:
            row["error"] = error
            r["errors"][variant] = f"{stage}: {error}"
        r["stages"].append(row)
        m = (manifest or {}).get("metrics", {})
        if stage == "bootstrap" and manifest and "teacher_params" in m:
            c = r["config"]
            c["vocab_size"] = m["vocab_size"]
            r["params"]["teacher"] = m["teacher_params"]
            r["train_tokens"] = m.get("train_tokens")
            f = train_flops_per_token(m["teacher_params"], m["vocab_size"], c["hidden_size"], c["num_layers"],
                                      c["seq_len"])
            r["throughput"]["pretrain"] = {**throughput(manifest, f), "eval_ppl": m.get("teacher_eval_ppl")}
        if stage == "distill" and manifest and "student_params" in m:
            c = r["config"]
            layers = len(m["student"].get("derived_from_teacher_layers") or []) or c["num_layers"]
            r["params"]["student"] = m["student_params"]
            c["student_layers"] = layers
            # student forward + backward, and the teacher's forward (a third of its training count)
            f = train_flops_per_token(m["student_params"], c["vocab_size"], c["hidden_size"], layers, c["seq_len"]) \
                + train_flops_per_token(m["teacher_params"], c["vocab_size"], c["hidden_size"], c["num_layers"],
                                        c["seq_len"]) // 3
            r["throughput"]["distill"] = {**throughput(manifest, f), "loss_path": m.get("loss_path"),
                                          "compiled": m.get("compiled"), "eval_ppl_before": m.get("eval_ppl_before"),
                                          "eval_ppl_after": m.get("eval_ppl_after")}
        if stage == "quantize" and manifest:
            keep = ("scheme", "method", "weight_quantizer", "mean_rel_error", "quantized_params", "calib_loss_first",
                    "calib_loss_last", "qsur_mean_before", "qsur_mean_after")
            r["quantize"][variant] = {k: m[k] for k in keep if k in m}
        if stage == "evaluate" and manifest:
            models = m["models"]
            q = r["quality"]
            q.setdefault("teacher", model_row(models["teacher"]))
            if "distill" in models:
                q.setdefault("student", model_row(models["distill"]))
            if "quantize" in models:
                q[variant] = model_row(models["quantize"])
        if stage == "export" and manifest:
            r["exports"][variant] = {fmt: export_row(v, manifest["device"]) for fmt, v in m.items()
                                     if isinstance(v, dict)}
        if peak is not None:  # the peak is reset per stage: the run's is the largest stage's
            self.peak = max(self.peak, peak)
            r["peak_gpu_gib"] = round(self.peak / GIB, 3)
        r["wall_s"] = round(time.perf_counter() - self.t0, 1)
        peak_txt = f", peak {row['peak_gpu_gib']} GiB" if row["peak_gpu_gib"] is not None else ""
        print(f"[{variant}] {stage}: {row['state']} in {wall_s:.1f} s{peak_txt}" + (f" - {error}" if error else ""),
              flush=True)
        self.save()

    def finish(self) -> None:
        self.r["status"] = "failed" if self.r["errors"] else "completed"
        self.r["wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.r, indent=2) + "\n")
        os.replace(tmp, self.out)
        if self.results is not None:
            write_section(self.results, render(self.r))


# --------------------------------------------------------------------------------------------
# the results section


def _n(x, digits: int = 4) -> str:
    """A figure for a table cell: thousands separators for big numbers, `digits` significant digits for others."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) or abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _m(params: int | None) -> str:
    return "-" if not params else f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.1f}k"


def render(r: dict) -> str:
    c, t = r["config"], r["throughput"]
    status = {"running": f"incomplete (stopped after {len(r['stages'])} stage(s))",
              "completed": "completed", "failed": "failed"}[r["status"]]
    versions = ", ".join(f"{k.replace('_', '-')} {r[k]}" for k in ("torch", "transformers", "onnxruntime",
                                                                    "onnxruntime_gpu", "bitsandbytes") if r.get(k))
    lines = [
        HEADING, "",
        f"`{r['command']}`" + (f" (`{r['argv']}`)" if r["argv"] != r["command"] else "")
        + f" on {r['date'][:10]} ({r['date'][11:16]} UTC): device {r['device']}"
        + (f" (CUDA {r['cuda']})" if r.get("cuda") else "") + f", host {r['host']}, Python {r['python']}, "
        f"{versions}. Status: {status}, {_n(r['wall_s'])} s in all" + (" (`--tiny`: CPU size)" if r["tiny"] else "")
        + ".", "",
        f"Teacher: Llama, {_m(r['params'].get('teacher'))} parameters (hidden {c['hidden_size']}, {c['num_layers']} "
        f"layers, {c['num_heads']} heads / {c['num_kv_heads']} KV heads, MLP {c['intermediate_size']}, vocabulary "
        f"{_n(c.get('vocab_size'))}, rows of {c['seq_len']} tokens), pretrained {c['pretrain_steps']} steps x "
        f"{c['pretrain_batch']} rows in {c['dtype']}; student {_m(r['params'].get('student'))} "
        f"({c.get('student_layers', '-')} layers), distilled {c['distill_steps']} steps x {c['distill_batch']} rows "
        f"(compile: {c['compile']}). Variants: " + "; ".join(f"{k}: {v}" for k, v in r["variants"].items()) + ".",
        "",
        "| variant | stage | state | seconds | peak GPU memory (GiB) | figures |", "|---|---|---|---:|---:|---|",
    ]
    for s in r["stages"]:
        figures = ""
        if s["stage"] in ("bootstrap", "distill") and s["state"] == "ran":
            k = "pretrain" if s["stage"] == "bootstrap" else "distill"
            tp = t.get(k, {})
            figures = (f"{_n(tp.get('tokens_per_s'))} tokens/s over the loop, {_n(tp.get('tokens_per_s_steady'))} "
                       f"steady ({_n(tp.get('tflops_steady'), 3)} TFLOP/s of model FLOPs)")
            if k == "distill":
                figures += f", loss path {tp.get('loss_path')}"
        elif s["stage"] == "quantize" and s["state"] == "ran":
            q = r["quantize"].get(s["variant"], {})
            label = r["variants"][s["variant"]].split(";")[0]  # the stage's own label repeats the group size
            figures = f"{label}, mean relative weight error {_n(q.get('mean_rel_error'), 3)}"
            if "calib_loss_first" in q:
                figures += f", calibration loss {_n(q['calib_loss_first'], 3)} -> {_n(q['calib_loss_last'], 3)}"
        elif s["stage"] == "export" and s["state"] != "cached":
            ex = r["exports"].get(s["variant"], {})
            figures = f"{sum(1 for v in ex.values() if v.get('passed'))} of {len(ex)} formats passed"
        if s.get("error"):
            figures = (figures + "; " if figures else "") + s["error"][:200].replace("|", "/").replace("\n", " ")
        seconds = _n(s["duration_s"] if s["state"] == "ran" else s["wall_s"], 4)
        lines.append(f"| {s['variant']} | {s['stage']} | {s['state']} | {seconds} | {_n(s['peak_gpu_gib'], 3)} "
                     f"| {figures} |")
    lines += ["", "| model | parameters | perplexity | KL to teacher | top-1 agreement | bytes on disk | ms/token | "
              "run time |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, q in r["quality"].items():
        label = {"gptq": "GPTQ", "ostquant": "OSTQuant"}.get(name, name)
        lines.append(f"| {label} | {_m(q['params'])} | {_n(q['ppl'])} | {_n(q['kl_to_teacher'], 3)} | "
                     f"{_n(q['top1_agreement'])} | {_n(q['bytes_on_disk'])} | {_n(q['latency_ms_per_token'], 3)} | "
                     f"{q['runtime']} |")
    lines += ["", "| variant | export | passed | bytes | max abs logit diff | KL | top-1 agreement | runtime |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for variant, ex in r["exports"].items():
        for fmt, e in ex.items():
            lines.append(f"| {variant} | {fmt} | {_n(e.get('passed'))} | {_n(e.get('bytes'))} | "
                         f"{_n(e.get('max_abs_diff'), 3)} | {_n(e.get('kl'), 3)} | {_n(e.get('top1_agreement'))} | "
                         f"{e.get('provider')} |")
    lines += ["", "Seconds: the stage's own duration from its manifest (a cached stage: the wall time of finding it). "
              "Tokens/s: the training loop's, over all steps (held-out evaluations and compilation included), and "
              "steady (after the first 10 % of steps); TFLOP/s: steady tokens/s x 6 N + 12 L h T per token (+ the "
              "teacher's forward, a third of that, when distilling). Perplexity, KL and top-1: the evaluate stage's "
              "held-out rows. Export figures: each reloaded export's logits against the source model's on the check "
              "rows.", ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the GPU-check section of ``path`` (from its heading up to the next ``## `` heading), else append it."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADING.split(" (")[0])), None)
    body = section.rstrip("\n") + "\n"
    if start is None:
        new = text.rstrip("\n") + ("\n\n" if text.strip() else "") + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + body + ("\n" + rest if rest else "")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from llm_compress.config import parse_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    gptq, ost = recipe_data(args)
    recipes = {"gptq": parse_recipe(gptq, args.recipe), "ostquant": parse_recipe(ost, f"{args.recipe} (OSTQuant)")}
    root = Path(args.artifacts).resolve()
    out = Path(args.out) if args.out else root / "gpu_check.json"
    results = Path(args.results) if args.results else (None if args.tiny else RESULTS)
    check = Check(args, recipes, out, results)
    print(f"gpu_check: device {check.r['device']}, torch {check.r['torch']}, transformers "
          f"{check.r['transformers']}; artifacts {root}", flush=True)
    for variant, recipe in recipes.items():
        try:
            run_stages(recipe, root / f"{recipe.name}", root,
                       lambda *a, v=variant: check.stage_done(v, *a))
        except Exception as e:  # recorded by stage_done; the other variant still runs
            check.r["errors"].setdefault(variant, f"{type(e).__name__}: {e}")
    check.finish()
    print(render(check.r))
    print(f"figures: {out}" + (f"; section rewritten in {results}" if results else ""))
    return 1 if check.r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
