"""The model card (``README.md``) each export format folder carries: Hugging Face model-card style.

A YAML front matter block (``license``, ``library_name``, ``base_model`` when the teacher is a hub id, ``tags``),
then: what the folder is and how it was made (the stages that ran, with their key settings), its lineage (teacher,
student, data, input digests, each upstream stage's cache key), the measured quality and size, latency only when the
timed model is a standard one, and how to load it in two lines. Torch-free: :mod:`llm_compress.export` writes it into
the format's temporary folder, so it is published atomically with the rest.

``facts`` (all optional; :func:`llm_compress.pipeline.export.card_facts` fills them from the stage's inputs and config;
a direct :func:`llm_compress.export.run_export` call without them gives ``model_dir``): ``source`` (the exported model's
name in evaluate's figures), ``made`` (stage -> its key settings), ``lineage`` (stage -> its cache key),
``digests`` (export input -> digest), ``teacher``, ``student``, ``data``, ``license`` / ``license_source``
(:func:`teacher_license`), ``evaluation`` (evaluate's ``eval.json``: model name -> figures), ``evaluate_device``,
``runtime_needs`` (:func:`llm_compress.quantize.record.runtime_needs` of the source:
:func:`llm_compress.export.run_export` adds it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llm_compress.refs import HUB_ID_RE, is_local_ref

CARD_FILE = "README.md"
ONNX_PREFIX = "onnx"
UNKNOWN = "unknown"


def front_matter(text: str) -> dict | None:
    """The YAML block between a leading ``---`` line and the next ``---`` line, as a dict; None when absent/bad."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return None
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _license_of(readme: Path | None, config: Path | None) -> str | None:
    for path, read in ((readme, lambda t: front_matter(t) or {}), (config, json.loads)):
        if path is None or not path.is_file():
            continue
        try:
            lic = read(path.read_text(encoding="utf-8")).get("license")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(lic, str) and lic.strip():
            return lic.strip()
    return None


def teacher_license(ref: str, revision: str | None = None) -> tuple[str, str]:
    """(license, where it was read) of the teacher: its README front matter's ``license:``, else its config.json's
    ``license``; a hub id is read from the local Hugging Face cache only (no download). (``unknown``, why) when none
    says: a license is never guessed."""
    if is_local_ref(ref):
        d = Path(ref).expanduser()
        lic = _license_of(d / CARD_FILE, d / "config.json")
        where = f"the teacher folder's {CARD_FILE} front matter or config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        hits = [try_to_load_from_cache(ref, f, revision=revision) for f in (CARD_FILE, "config.json")]
        lic = _license_of(*(Path(h) if isinstance(h, str) else None for h in hits))
        where = f"the {CARD_FILE} of {ref} in the local Hugging Face cache"
    if lic:
        return lic, where
    return UNKNOWN, f"not known: no license in {where}"


# --------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".4g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _library(fmt: str) -> str:
    return "onnx" if fmt.startswith(ONNX_PREFIX) else "transformers"


def load_lines(fmt: str, has_kv: bool = False, needs: dict | None = None) -> list[str]:
    """The Python lines that load this format's folder (the path written as the folder's name)."""
    p = f'"{fmt}"'
    if fmt.startswith(ONNX_PREFIX):
        return ["from optimum.onnxruntime import ORTModelForCausalLM",
                f"model = ORTModelForCausalLM.from_pretrained({p})"]
    if needs:  # online Hadamard / activation-KV fake quantization: only this project's loader re-creates them
        lines = ["from llm_compress.modeling import load_causal_lm, load_tokenizer",
                 f"tok, model = load_tokenizer({p}), load_causal_lm({p})"]
    elif fmt == "compressed-tensors":  # without a dtype its loader casts to float16; "auto": the saved dtype
        lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                 f'tok, model = AutoTokenizer.from_pretrained({p}), AutoModelForCausalLM.from_pretrained({p}, '
                 'dtype="auto")']
    else:
        lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                 f"tok, model = AutoTokenizer.from_pretrained({p}), AutoModelForCausalLM.from_pretrained({p})"]
    if has_kv:
        lines += ["from llm_compress.kv import load_kv_cache",
                  f"out = model.generate(ids, past_key_values=load_kv_cache({p}, model), max_new_tokens=32)"]
    return lines


def _made(fmt: str, facts: dict) -> list[str]:
    out = [f"- export: `{fmt}`"]
    for stage, settings in (facts.get("made") or {}).items():
        out.append(f"- {stage}: " + ", ".join(f"{k} `{_fmt(v)}`" for k, v in settings.items()))
    return out


def _lineage(facts: dict) -> list[str]:
    out = [f"- {k}: `{facts[k]}`" for k in ("model_dir", "teacher", "student", "data") if facts.get(k)]
    out += [f"- input `{k}`: `{v}`" for k, v in (facts.get("digests") or {}).items()]
    out += [f"- stage `{k}` cache key: `{v}`" for k, v in (facts.get("lineage") or {}).items()]
    return out


def _quality(fmt: str, m: dict, facts: dict) -> list[str]:
    ev, src = facts.get("evaluation"), facts.get("source", "the source model")
    out = []
    if ev and src in ev:
        s = ev[src]
        out += [f"Measured by the evaluate stage on the source model (`{src}`, before this format's conversion), "
                "against the teacher on held-out tokens:", "",
                f"- perplexity {_fmt(s.get('ppl'))} ({_fmt(s.get('ppl_ratio'))}x the teacher's)",
                f"- KL(teacher || model) {_fmt(s.get('kl_to_teacher'))}",
                f"- top-1 agreement with the teacher {_fmt(s.get('top1_agreement'))}",
                f"- parameters {_fmt(s.get('params'), ',')}, weights on disk {_fmt(s.get('bytes_on_disk'), ',')} "
                f"bytes ({_fmt(s.get('size_ratio'))}x the teacher's)"]
        for part, what in (("forget", "forget set (unlearned)"), ("keep", "keep set (must stay)")):
            f = (s.get("unlearn") or {}).get(part)
            if f:
                out.append(f"- {what}: ROUGE-L {_fmt(f.get('rouge_l'))}, answer probability "
                           f"{_fmt(f.get('answer_prob'))}, Min-K% membership AUC {_fmt(f.get('mink_auc'))} "
                           f"({f.get('records')} records)")
        out.append("")
    else:
        out += ["Quality against the teacher was not measured in this run (no evaluate stage figures reached the "
                "export); see the run's `evaluate/eval.json` when it exists.", ""]
    out += [f"This `{fmt}` folder, loaded back from disk and compared with the source model on "
            f"{_fmt(m.get('check_tokens'))} check tokens:", "",
            f"- bytes on disk (without this card): {_fmt(m.get('bytes'), ',')}",
            f"- max abs logit difference {_fmt(m.get('max_abs_diff'))}, KL {_fmt(m.get('kl'))}, "
            f"top-1 agreement {_fmt(m.get('top1_agreement'))}"]
    kv = m.get("kv_cache") or {}
    if kv.get("file"):
        out.append(f"- generating through its `{kv['file']}` ({kv.get('method')}): top-1 agreement with the full "
                   f"cache {_fmt(kv.get('top1_agreement_with_full_cache'))} over {kv.get('generated_tokens')} tokens")
    elif kv.get("reason"):
        out.append(f"- no `kv_cache.json` here: {kv['reason']}")
    return out


def _latency(fmt: str, facts: dict) -> list[str]:
    ev, src = facts.get("evaluation") or {}, facts.get("source")
    s = ev.get(src) or {}
    runtime = s.get("runtime")
    if facts.get("runtime_needs") or (runtime and runtime != "standard"):
        what = runtime or ", ".join(str(v) for v in facts["runtime_needs"].values())
        return [f"Not reported. The source model runs with run-time parts ({what}): its timing is that of a "
                "fake-quantized model in float arithmetic, not the speed of a quantized model with real low-bit "
                "kernels."]
    if "latency_ms_per_token" not in s:
        return ["Not measured in this run."]
    line = (f"{_fmt(s['latency_ms_per_token'])} ms per generated token (greedy decoding with the KV cache, median; "
            f"the source checkpoint in transformers on `{facts.get('evaluate_device', UNKNOWN)}`).")
    q = (facts.get("made") or {}).get("quantize")
    if q:
        line += (f" Its weights hold {q.get('setting')} values stored as floats: that is the speed of float matmuls, "
                 "not of low-bit kernels.")
    if fmt != "safetensors":
        line += f" That is the source checkpoint's timing; this `{fmt}` folder was not timed."
    return [line]


def render(fmt: str, metrics: dict, facts: dict, files: list[str]) -> str:
    """The card of format ``fmt`` (``metrics``: its export figures; ``files``: the folder's file names)."""
    lic = facts.get("license", UNKNOWN)
    teacher = str(facts.get("teacher", ""))
    head: dict[str, Any] = {"license": lic, "library_name": _library(fmt)}
    if teacher and not is_local_ref(teacher) and HUB_ID_RE.match(teacher):
        head["base_model"] = teacher
    head["tags"] = ["compressed", fmt, *(facts.get("made") or {})]
    has_kv = "kv_cache.json" in files
    needs = facts.get("runtime_needs") or {}
    lines = ["---", yaml.safe_dump(head, sort_keys=False).rstrip(), "---", "",
             f"# {facts.get('source', 'model')} ({fmt})", "",
             "## What this is", "",
             f"The compressed model in the `{fmt}` format ({_library(fmt)}), made by this project's pipeline:", "",
             *_made(fmt, facts), "",
             f"License: `{lic}` (the teacher's; " + str(facts.get("license_source", "not known")) + ")."
             + ("" if lic != UNKNOWN else " The teacher's license terms apply; check them before use."), "",
             "## Lineage", "", *_lineage(facts), "",
             "## Measured quality and size", "", *_quality(fmt, metrics, facts), "",
             "## Latency", "", *_latency(fmt, facts), "",
             "## How to load", "",
             f"Two lines (the path is this folder, written as its name `{fmt}`):", "",
             "```python", *load_lines(fmt, has_kv, needs), "```", ""]
    if fmt.startswith("bnb"):
        lines += ["The `quantization_config` is in `config.json`; `bitsandbytes` must be installed.", ""]
    if fmt == "compressed-tensors":
        lines += ["The `quantization_config` (`compressed-tensors`, `pack-quantized`) is in `config.json`; the "
                  "`compressed-tensors` package must be installed (transformers unpacks the codes to dense weights on "
                  "load; vLLM serves them as they are: `vllm serve compressed-tensors`).", ""]
    if needs:
        lines += [f"It needs at run time {', '.join(needs)} (recorded in `quantization.json`), which only "
                  "`llm_compress.modeling.load_causal_lm` re-creates. A plain `from_pretrained` (or vLLM) would "
                  "drop them and run another model, so `config.json` names the model type `llm_compress_runtime` "
                  "and they refuse to load it (with `trust_remote_code=True`, `modeling_llm_compress.py` raises, "
                  "naming the loader above).", ""]
    if has_kv:
        lines += ["`kv_cache.json` is the KV cache it was checked with: the last two lines generate through it "
                  "(`ids`: a [1, T] tensor of token ids).", ""]
    return "\n".join(lines)


def write_card(folder: Path, fmt: str, metrics: dict, facts: dict | None) -> Path:
    """Write ``folder/README.md`` for format ``fmt``; returns its path."""
    folder = Path(folder)
    path = folder / CARD_FILE
    path.write_text(render(fmt, metrics, facts or {}, sorted(f.name for f in folder.iterdir())), encoding="utf-8")
    return path
