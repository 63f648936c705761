"""The run-level report: ``report.json`` (machine-readable) and ``report.md`` (for people)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from llm_compress.io import write_json_atomic, write_text_atomic

EVAL_COLUMNS = ("ppl", "ppl_ratio", "kl_to_teacher", "top1_agreement", "params", "bytes_on_disk",
                "size_ratio", "latency_ms_per_token", "runtime")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def eval_rows(done: dict[str, dict]) -> list[dict]:
    ev = done.get("evaluate")
    if not ev:
        return []
    return [{"model": name, **{c: m.get(c) for c in EVAL_COLUMNS}} for name, m in ev["metrics"]["models"].items()]


def export_rows(done: dict[str, dict], failed: dict | None = None) -> list[dict]:
    """One row per export format, from the finished export stage, or from ``failed``: the manifest of an export
    stage that failed after publishing the formats that passed (the failed formats' rows hold their ``error``)."""
    ex = done.get("export") or (failed if failed and failed.get("stage") == "export" else None)
    if not ex:
        return []
    rows = []
    for fmt, m in ex["metrics"].items():
        if isinstance(m, dict):
            rows.append({"format": fmt, "path": ex["outputs"].get(fmt, {}).get("path"), "bytes": m.get("bytes"),
                         "max_abs_diff": m.get("max_abs_diff"), "top1_agreement": m.get("top1_agreement"),
                         "passed": m.get("passed"), "kv_cache": m.get("kv_cache"),  # kv_cache: runs with KV only
                         "error": m.get("error")})
    return rows


def build(run_name: str, recipe_name: str, done: dict[str, dict], records: list[dict], status: str,
          error: str | None, published: bool, failed: dict | None = None) -> dict:
    """``failed``: the manifest a failed stage published with its partial outputs (export), if any."""
    return {
        "run_name": run_name, "recipe": recipe_name, "status": status, "published": published, "error": error,
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stages": records, "evaluation": eval_rows(done), "kv_cache": kv_row(done), "kv_evaluation": kv_eval_rows(done),
        "exports": export_rows(done, failed), "unlearning": unlearn_rows(done),
    }


UNLEARN_COLUMNS = ("rouge_l", "extraction_strength", "answer_prob", "mink_auc")


def unlearn_rows(done: dict[str, dict]) -> list[dict]:
    """Forget and keep sets, per model: before unlearning and right after it (the unlearn stage, no KV cache), then
    every evaluated model (evaluate: the final quantized model with its KV cache included)."""
    un = done.get("unlearn")
    if not un:
        return []
    m = un["metrics"]
    sources = [("original (before unlearning)", m["before"], None), ("unlearned (unlearn stage)", m["after"], None)]
    ev = done.get("evaluate")
    for name, em in (ev["metrics"]["models"].items() if ev else ()):
        if "unlearn" in em:
            sources.append((f"{name} (evaluate)", em["unlearn"], em["unlearn"].get("kv_cache")))
    rows = []
    for model, figures, kv in sources:
        for part in ("forget", "keep"):
            if part in figures:
                rows.append({"model": model, "set": part, **{c: figures[part].get(c) for c in UNLEARN_COLUMNS},
                             "kv_cache": kv, "ppl": (figures.get("utility") or {}).get("ppl")})
    return rows


# Memory (llm_compress.kv.measure): held bytes in a 16-bit deployment over the decode steps, mean and max, against a
# 16-bit full cache of the same tokens; memory_ratio_min is the worst step's ratio.
KV_COLUMNS = ("method", "memory_ratio_mean", "memory_ratio_min", "bytes_mean", "bytes_max", "full_bytes_mean",
              "ppl_ratio", "kl_to_full", "top1_agreement", "context", "scored_tokens")


def kv_row(done: dict[str, dict]) -> dict | None:
    """The KV stage's measurement of its cache against the full cache, if the run has one."""
    kv = done.get("kv")
    return {c: kv["metrics"].get(c) for c in KV_COLUMNS} if kv else None


KV_EVAL_COLUMNS = ("memory_ratio_mean", "memory_ratio_min", "bytes_mean", "bytes_max", "ppl_ratio", "kl_to_full",
                   "top1_agreement", "decode_tokens_per_s", "decode_tokens_per_s_full")


def kv_eval_rows(done: dict[str, dict]) -> list[dict]:
    """Every evaluated model with the run's cache (evaluate's ``kv`` figures), or the reason it was not measured."""
    ev = done.get("evaluate")
    if not ev:
        return []
    return [{"model": name, **{c: m["kv"].get(c) for c in KV_EVAL_COLUMNS}, "skipped": m["kv"].get("skipped")}
            for name, m in ev["metrics"]["models"].items() if "kv" in m]


def markdown(report: dict) -> str:
    lines = [f"# Run `{report['run_name']}` (recipe `{report['recipe']}`)", "",
             f"- status: **{report['status']}**", f"- published: **{'yes' if report['published'] else 'no'}**"]
    if report.get("error"):
        lines += ["", "## Error", "", "```", report["error"], "```"]
    lines += ["", "## Stages", "", "| stage | state | compute seconds | processes / devices | cache key | outputs |",
              "|---|---|---|---|---|---|"]
    for r in report["stages"]:
        outs = ", ".join(f"`{k}`" for k in r.get("outputs", {}))
        key = r.get("cache_key", "")[:12]
        lines.append(f"| {r['stage']} | {r['state']} | {_fmt(r.get('duration_s'))} | {compute_cell(r.get('compute'))} "
                     f"| `{key}` | {outs} |")
    if report["evaluation"]:
        lines += ["", "## Evaluation (held-out data, vs the teacher)", "",
                  "| " + " | ".join(("model",) + EVAL_COLUMNS) + " |", "|" + "---|" * (len(EVAL_COLUMNS) + 1)]
        for row in report["evaluation"]:
            lines.append("| " + " | ".join(_fmt(row[c]) for c in ("model",) + EVAL_COLUMNS) + " |")
    if report.get("kv_cache"):
        lines += ["", "## KV cache (teacher-forced decode through the cache, vs the full cache)", "",
                  "Memory: bytes held in a 16-bit deployment (floats at 2 bytes, codes as packed) after every decode "
                  "step, mean and max; ratios: a 16-bit full cache of the same tokens / held (mean: of the means; "
                  "min: the worst step).", "",
                  "| " + " | ".join(KV_COLUMNS) + " |", "|" + "---|" * len(KV_COLUMNS),
                  "| " + " | ".join(_fmt(report["kv_cache"][c]) for c in KV_COLUMNS) + " |"]
        ratio = report["kv_cache"].get("memory_ratio_mean")
        if ratio is not None and ratio < 1:
            lines += ["", f"**Warning:** this cache holds {1 / ratio:.2f}x *more* than a 16-bit full cache of the same "
                      "tokens, on average over decoding (its bookkeeping outweighs what it saves on this model), so it "
                      "saves no memory."]
    if report.get("kv_evaluation"):
        lines += ["", "Every evaluated model with the cache (evaluate; decode: greedy tokens/s with the cache and with "
                  "the full DynamicCache):", "", "| " + " | ".join(("model",) + KV_EVAL_COLUMNS) + " |",
                  "|" + "---|" * (len(KV_EVAL_COLUMNS) + 1)]
        for row in report["kv_evaluation"]:
            cells = ([f"not measured: {row['skipped']}"] + [""] * (len(KV_EVAL_COLUMNS) - 1) if row["skipped"]
                     else [_fmt(row[c]) for c in KV_EVAL_COLUMNS])
            lines.append("| " + " | ".join([row["model"], *cells]) + " |")
    if report.get("unlearning"):
        lines += ["", "## Unlearning (forget: the set removed; keep: planted the same way, not removed)", "",
                  "ROUGE-L: greedy continuation of each record's prompt vs its answer (through the KV cache where one "
                  "is named); extraction strength and answer probability: teacher-forced over the answer; Min-K% AUC: "
                  "membership vs never-seen holdout records (0.5 = indistinguishable).", "",
                  "| model | set | " + " | ".join(UNLEARN_COLUMNS) + " | kv cache | held-out ppl |",
                  "|---|---|" + "---|" * (len(UNLEARN_COLUMNS) + 2)]
        for row in report["unlearning"]:
            lines.append(f"| {row['model']} | {row['set']} | " + " | ".join(_fmt(row[c]) for c in UNLEARN_COLUMNS)
                         + f" | {row['kv_cache'] or '-'} | {_fmt(row['ppl'])} |")
    if report["exports"]:
        kv = any(e.get("kv_cache") is not None for e in report["exports"])
        lines += ["", "## Exports (each reloaded and compared with the source model)", "",
                  "| format | bytes | max abs logit diff | top-1 agreement | passed | "
                  + ("kv_cache.json (generated tokens through it) | " if kv else "") + "path |",
                  "|---|---|---|---|---|" + ("---|" if kv else "") + "---|"]
        for e in report["exports"]:
            c = e.get("kv_cache") or {}
            kv_cell = "" if not kv else (f"{c['method']}: {c['generated_tokens']} | " if c.get("file")
                                         else f"no ({c.get('reason', '-')}) | ")
            passed = f"False: {e['error']}".replace("|", "/") if e.get("error") else e["passed"]
            path = f"`{e['path']}`" if e["path"] else "not published"
            lines.append(f"| {e['format']} | {_fmt(e['bytes'])} | {_fmt(e['max_abs_diff'])} | "
                         f"{_fmt(e['top1_agreement'])} | {passed} | {kv_cell}{path} |")
    return "\n".join(lines) + "\n"


def compute_cell(compute: dict | None) -> str:
    """'2 / 2 cuda', '4 / 1 cpu', '16 / 16 cuda on 2 hosts': processes / distinct devices (``host:device``)."""
    if not compute:
        return "-"
    devices = set(compute.get("devices", []))
    hosts = {d.split(":", 1)[0] for d in devices}
    kind = "cuda" if any(":cuda" in d for d in devices) else "cpu"
    return f"{compute['processes']} / {len(devices)} {kind}" + (f" on {len(hosts)} hosts" if len(hosts) > 1 else "")


def write(run_dir: Path, report: dict) -> str:
    md = markdown(report)
    write_json_atomic(run_dir / "report.json", report)
    write_text_atomic(run_dir / "report.md", md)
    return md


def stage_record(manifest: dict, state: str) -> dict:
    return {"stage": manifest["stage"], "state": state,
            "cache_key": manifest["cache_key"], "duration_s": manifest.get("duration_s"),
            "compute": manifest.get("compute"),
            "manifest": str(Path(manifest["stage_dir"]) / "manifest.json"),
            "outputs": {k: v["path"] for k, v in manifest["outputs"].items()},
            "metrics": manifest["metrics"]}
