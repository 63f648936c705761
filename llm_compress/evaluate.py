"""Evaluation: quality against the teacher, size and speed, and the recipe's quality gates.

Per model, on the held-out token rows [rows, T] (the first ``max_eval_tokens`` tokens):
- ``ppl``: exp of the mean next-token cross-entropy;
- ``kl_to_teacher``: mean over positions of KL(teacher || model) summed over the vocabulary;
- ``top1_agreement``: share of positions where the model's argmax equals the teacher's;
- ``params``, ``bytes_on_disk`` (weights files) and ``latency_ms_per_token`` (greedy decoding
  with the KV cache, median over repeats after a warm-up).
With the KV stage on, each model the cache supports also gets ``kv``: the cache's bytes over the decode steps (mean and
max) against a 16-bit full cache (``memory_ratio_mean``, ``memory_ratio_min``), perplexity ratio, KL and top-1
agreement to the full cache on the KV stage's held-out rows
(:func:`llm_compress.kv.measure.measure`), and greedy decode tokens/s with the cache and with the full ``DynamicCache``
(the latency figure's code, given a cache per ``generate``); a model it does not support gets ``kv.skipped``.
All models are scored batch by batch against one teacher forward (:func:`llm_compress.scoring.score`), so teacher logits
are never stored for the whole eval set (they would be rows x T x V floats).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from llm_compress.data import load_tokens
from llm_compress.errors import InputError
from llm_compress.kv.config import KVConfig
from llm_compress.modeling import count_parameters, free_device, load_causal_lm, resolve_device
from llm_compress.quantize.codes import CODES_FILE
from llm_compress.quantize.record import runtime_needs
from llm_compress.result import StageResult
from llm_compress.schema import ModelsConfig, RuntimeConfig
from llm_compress.scoring import score

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data")


def weights_bytes(model_dir: str | Path) -> int:
    p = Path(model_dir)
    if not p.is_dir():
        return 0  # a hub id: not on local disk
    # the quantize stage's codes file sits beside its weights (for the packed exports); it is not the checkpoint
    return sum(f.stat().st_size for f in p.rglob("*")
               if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES) and f.name != CODES_FILE)


def fits_together(refs, device: torch.device, headroom: float = 0.7) -> bool:
    """Whether every model (local folders' weight bytes) fits the device's free memory at once, with room for
    activations (``headroom``: the share of free memory the weights may take). Always true off CUDA (host memory
    is the limit there either way) and when a size is unknown (a hub id: measured by loading)."""
    if device.type != "cuda":
        return True
    sizes = [weights_bytes(r) for r in refs]
    if not all(sizes):
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return sum(sizes) <= headroom * free


@torch.no_grad()
def latency_per_token(model, prompt: torch.Tensor, new_tokens: int, repeats: int,
                      new_cache: Callable[[], Any] | None = None) -> float:
    """Median milliseconds per generated token, greedy decoding with the KV cache: the one ``generate`` makes, or
    a fresh ``new_cache()`` per call (building it is timed too)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, attention_mask=torch.ones_like(prompt))

    def decode() -> None:
        model.generate(prompt, **kwargs, **({} if new_cache is None else {"past_key_values": new_cache()}))

    decode()  # warm-up: first call allocates caches and picks kernels
    times = []
    for _ in range(repeats):
        if prompt.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        decode()
        if prompt.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000 / new_tokens)
    return statistics.median(times)


def kv_metrics(model, spec: dict, rows: torch.Tensor, prefill: int, prompt: torch.Tensor, cfg) -> dict:
    """One model's ``kv`` figures with the cache ``spec`` (see the module docstring), or the reason it has none."""
    from transformers import DynamicCache

    from llm_compress.kv import build_cache
    from llm_compress.kv.measure import measure, rounded
    from llm_compress.kv.spec import check_against_model

    try:
        check_against_model(spec, model)
    except InputError as e:
        return {"method": spec["method"], "skipped": str(e)}
    figures = measure(model, rows, spec, prefill)  # rows [B, T]: memory and quality against the full cache
    ms = {name: latency_per_token(model, prompt, cfg.latency_new_tokens, cfg.latency_repeats, new_cache)
          for name, new_cache in (("cache", lambda: build_cache(spec, model)),
                                  ("full", lambda: DynamicCache(config=model.config)))}
    return rounded({"method": spec["method"], **figures, "decode_tokens_per_s": 1000 / ms["cache"],
                    "decode_tokens_per_s_full": 1000 / ms["full"]})


def forget_figures(model, sets: dict, tokenizer, ucfg, batch_size: int, kv_spec: dict | None) -> dict:
    """The forget and keep sets' figures of one model (:func:`llm_compress.unlearn.measure`), generating through the KV
    cache ``kv_spec`` when it fits the model (``kv_cache`` says which)."""
    from llm_compress.kv.spec import check_against_model
    from llm_compress.unlearn import measure, summary

    if kv_spec is not None:
        try:
            check_against_model(kv_spec, model)
        except InputError:
            kv_spec = None
    figures = summary(measure(model, sets, tokenizer, ucfg, kv_spec=kv_spec, batch_size=batch_size))
    return {**figures, "kv_cache": kv_spec["method"] if kv_spec else None}


def run(cfg, models_cfg: ModelsConfig, runtime: RuntimeConfig, *, teacher_ref: str,
        candidates: dict[str, str], eval_path: Path, out_dir: Path, kv_spec: Path | None = None,
        kv_cfg: KVConfig | None = None, unlearn_sets: dict[str, str] | None = None, tokenizer_ref: str | None = None,
        unlearn_cfg=None) -> StageResult:
    """Score the teacher and every candidate model (name -> model dir); write ``eval.json``. With ``kv_spec``
    (the KV stage's ``kv_cache.json``) and the recipe's ``kv`` section, each model also gets its ``kv`` figures."""
    device = resolve_device(runtime.device)
    torch.manual_seed(runtime.seed)
    all_ids = load_tokens(eval_path)  # [rows, T]: scored up to max_eval_tokens; the KV figures take their own rows
    rows = max(1, min(len(all_ids), cfg.max_eval_tokens // all_ids.shape[1]))
    eval_ids = all_ids[:rows]
    load = dict(dtype=models_cfg.dtype, device=device, trust_remote_code=models_cfg.trust_remote_code,
                revision=models_cfg.revision)
    refs = {"teacher": teacher_ref, **candidates}
    resident = fits_together(refs.values(), device)
    teacher = load_causal_lm(teacher_ref, what="teacher", **load)
    models = {"teacher": teacher}
    if resident:  # all on the device: one pass over the data scores every model
        for name, ref in candidates.items():
            models[name] = load_causal_lm(ref, what=f"{name} model", **load)
    # else the teacher stays, and each candidate comes to the device alone below, is scored against it, and leaves
    scores = score(models, teacher, eval_ids, cfg.batch_size, device, runtime.progress)
    prompt = eval_ids[:1, : cfg.latency_prompt_tokens].to(device)
    if kv_spec is not None:
        from llm_compress.kv.measure import held_out_rows
        from llm_compress.kv.spec import read_spec

        spec = read_spec(kv_spec)
        kv_rows, kv_prefill = held_out_rows(all_ids, kv_cfg or KVConfig(), device)  # the KV stage's rows [rows, T]
    if unlearn_sets:
        from llm_compress.modeling import load_tokenizer
        from llm_compress.unlearn import load_sets

        tok = load_tokenizer(tokenizer_ref, trust_remote_code=models_cfg.trust_remote_code,
                             revision=models_cfg.revision)
        max_len = getattr(teacher.config, "max_position_embeddings", None) or 10**9
        sets = load_sets(unlearn_sets, tok, unlearn_cfg, max_len)
    for name in refs:
        model = models.get(name)
        if model is None:  # not resident: load it now, drop it after its figures
            model = load_causal_lm(refs[name], what=f"{name} model", **load)
            scores.update(score({name: model}, teacher, eval_ids, cfg.batch_size, device, runtime.progress))
        scores[name]["placement"] = "all models on the device" if resident else "one candidate at a time"
        scores[name]["params"] = count_parameters(model)
        scores[name]["bytes_on_disk"] = weights_bytes(refs[name])
        needs = runtime_needs(refs[name]) if Path(refs[name]).is_dir() else {}
        scores[name]["runtime"] = ", ".join(
            ([f"online Hadamard ({needs['online_hadamard']['size']})"] if "online_hadamard" in needs else [])
            + ([needs["simulated"]] if "simulated" in needs else [])) or "standard"
        scores[name]["latency_ms_per_token"] = latency_per_token(model, prompt, cfg.latency_new_tokens,
                                                                 cfg.latency_repeats)
        if kv_spec is not None:
            scores[name]["kv"] = kv_metrics(model, spec, kv_rows, kv_prefill, prompt, cfg)
        if unlearn_sets:
            scores[name]["unlearn"] = forget_figures(model, sets, tok, unlearn_cfg, cfg.batch_size,
                                                     spec if kv_spec is not None else None)
        if name not in models:
            del model
            free_device(device)
    t = scores["teacher"]
    for name, s in scores.items():
        s["ppl_ratio"] = s["ppl"] / t["ppl"]
        s["size_ratio"] = s["bytes_on_disk"] / t["bytes_on_disk"] if t["bytes_on_disk"] else None
    rounded = {k: {m: (round(v, 6) if isinstance(v, float) else v) for m, v in s.items()} for k, s in scores.items()}
    (out_dir / "eval.json").write_text(json.dumps(rounded, indent=2))
    final = list(candidates)[-1] if candidates else "teacher"
    return StageResult(outputs={"eval": "eval.json"}, metrics={"final": final, "models": rounded})
