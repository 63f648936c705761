"""The kv stage: KV-cache compression. The configured cache is written as ``kv_cache.json`` (a user builds it with
``llm_compress.kv.load_kv_cache(folder, model)``) and measured on held-out rows against the full cache: memory held
over the decode steps (mean and max bytes in a 16-bit deployment, and their ratios to a 16-bit full cache:
``memory_ratio_mean``, ``memory_ratio_min``), perplexity ratio, KL and top-1 agreement
(:mod:`llm_compress.kv.measure`). Caches: :mod:`llm_compress.kv` (KIVI, sink window, MiniCache). With
``method: kvtuner`` the stage first searches per-layer KIVI bits on training rows (:mod:`llm_compress.kv.kvtuner`)
and saves the layer-sensitivity table (kvtuner_sensitivity.json), every measured
configuration and the Pareto plot (kvtuner_pareto.png); kv_cache.json is then the chosen per-layer KIVI cache.
With ``method: cskv`` it first fits the channel-shrinking bases on training rows (:mod:`llm_compress.kv.cskv`) and
writes them as cskv_factors.safetensors beside kv_cache.json, which records the file and the model's fingerprint:
the cache then runs on this model only (evaluate measures it on the others' weights never; export copies the file).
The stage makes no new weights: later stages still take the model it was measured on.

Checked before any work: the model type has the Llama attention layout, and the spec suits the model's geometry
(group size vs head_dim, MiniCache's start layer vs depth) when that geometry can be read without a download.
"""

from __future__ import annotations

from types import SimpleNamespace

from llm_compress.errors import InputError
from llm_compress.kv.config import KVConfig
from llm_compress.refs import distilled_model_config
from llm_compress.stage import Context, Stage, Upstream


def cache_inputs(recipe, up: Upstream) -> dict[str, str]:
    """What a later stage takes from this one to build the cache (evaluate and export): ``kv_cache.json``, and with
    CSKV its factors, read next to it (an input, so the later stage's key holds their digest); none when it is off."""
    if not recipe.kv.enabled:
        return {}
    factors = {"cskv_factors": up.out("kv", "cskv_factors")} if recipe.kv.cache.method == "cskv" else {}
    return {"kv_cache": up.out("kv", "kv_cache"), **factors}


class KV(Stage):
    name = "kv"
    sections = {"kv": KVConfig}
    reads = ("models.dtype", "models.revision", "models.trust_remote_code")  # how its input model is loaded
    libraries = ("torch", "transformers")

    def check(self, recipe) -> None:
        from llm_compress.kv.spec import check_against_model, normalize_spec, prompt_length

        cache = recipe.kv.cache
        prompt = prompt_length(recipe.data.seq_len, recipe.kv.prefill)  # of KVTuner's calibration rows
        if cache.method == "kvtuner" and prompt <= cache.residual:
            raise InputError(f"kv.cache: KVTuner's calibration prompts ({prompt} "
                             f"tokens: data.seq_len x kv.prefill) fit in the residual window ({cache.residual}), so "
                             "no KV would be quantized and every configuration would score the same; lower "
                             "kv.cache.residual or raise data.seq_len")
        cfg = distilled_model_config(recipe)
        if cfg is not None and "num_attention_heads" in cfg:
            try:
                check_against_model(normalize_spec(recipe.kv.cache.model_dump()), SimpleNamespace(**cfg))
            except InputError as e:
                raise InputError(f"kv.cache: {e}") from None

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        calib = {"calib": up.out("data", "train")} if recipe.kv.cache.method in ("kvtuner", "cskv") else {}
        return {"model": up.model, "eval": up.out("data", "eval"), **calib}

    def run(self, ctx: Context):
        import torch

        from llm_compress.data import load_tokens
        from llm_compress.kv import save_kv_cache_json
        from llm_compress.kv.measure import held_out_rows, measure, rounded
        from llm_compress.kv.spec import check_against_model, normalize_spec
        from llm_compress.modeling import load_causal_lm
        from llm_compress.result import StageResult

        r, kv = ctx.recipe, ctx.recipe.kv
        model = load_causal_lm(ctx.inputs["model"], dtype=r.models.dtype, device=ctx.device,
                               trust_remote_code=r.models.trust_remote_code, revision=r.models.revision,
                               what="kv stage input")
        spec = normalize_spec(kv.cache.model_dump())
        try:
            check_against_model(spec, model)  # the checks before work could not read every model's geometry
        except InputError as e:
            raise InputError(f"kv.cache: {e}") from None
        torch.manual_seed(r.runtime.seed)
        outputs, found = {"kv_cache": "kv_cache.json"}, {}
        if spec["method"] == "kvtuner":
            spec, found, outputs = self._search(ctx, model, spec)
        elif spec["method"] == "cskv":
            spec, found, outputs = self._fit_cskv(ctx, model, spec)
        rows, prefill = held_out_rows(load_tokens(ctx.inputs["eval"]), kv, ctx.device)  # [rows, T], prompt tokens
        metrics = measure(model, rows, spec, prefill=prefill)
        save_kv_cache_json(ctx.out_dir / "kv_cache.json", spec)
        metrics = {"method": spec["method"], **found, **rounded(metrics)}
        return StageResult(outputs=outputs, metrics=metrics)

    @staticmethod
    def _search(ctx: Context, model, spec: dict) -> tuple[dict, dict, dict]:
        """KVTuner on the first ``calib_rows`` training rows: (chosen kivi spec, metrics, outputs)."""
        from llm_compress.data import load_tokens
        from llm_compress.io import write_json_atomic
        from llm_compress.kv.kvtuner import plot_pareto, search
        from llm_compress.kv.spec import prompt_length

        calib = load_tokens(ctx.inputs["calib"])[: spec["calib_rows"]].to(ctx.device)  # [rows, T]
        prefill = prompt_length(calib.shape[1], ctx.recipe.kv.prefill)
        try:
            result = search(model, calib, spec, prefill, seed=ctx.recipe.runtime.seed)
        except InputError as e:
            raise InputError(f"kv.cache: {e}") from None
        write_json_atomic(ctx.out_dir / "kvtuner_sensitivity.json",
                          {"objective": spec["objective"], "layers": result["sensitivity"],
                           "trials": result["trials"], "front": result["front"]})
        plot_pareto(result, ctx.out_dir / "kvtuner_pareto.png")
        rec = result["spec"]["search"]
        found = {"kvtuner": {k: rec[k] for k in ("strategy", "budget", "avg_bits", "value", "measured", "chosen")},
                 "kvtuner_sensitivity": [{k: float(f"{v:.4g}") for k, v in row.items()}
                                         for row in result["sensitivity"]]}
        outputs = {"kv_cache": "kv_cache.json", "kvtuner_sensitivity": "kvtuner_sensitivity.json",
                   "kvtuner_pareto": "kvtuner_pareto.png"}
        return result["spec"], found, outputs

    @staticmethod
    def _fit_cskv(ctx: Context, model, spec: dict) -> tuple[dict, dict, dict]:
        """CSKV's bases fitted on the first ``calib_rows`` training rows, written as cskv_factors.safetensors (with
        the model's fingerprint, which the spec records): (spec naming them, metrics, outputs)."""
        from llm_compress.data import load_tokens
        from llm_compress.kv.cskv import FACTORS_FILE, fit_factors
        from llm_compress.kv.spec import cskv_ranks

        calib = load_tokens(ctx.inputs["calib"])[: spec["calib_rows"]].to(ctx.device)  # [rows, T]
        r_k, r_v = cskv_ranks(spec, model)
        try:
            factors = fit_factors(model, calib, r_k, r_v, spec["init"])
        except InputError as e:
            raise InputError(f"kv.cache: {e}") from None
        path = factors.save(ctx.out_dir / FACTORS_FILE)
        spec = {**spec, "factors": {"file": FACTORS_FILE, "fingerprint": factors.fingerprint, "path": str(path)}}
        found = {"cskv": {"k_rank": r_k, "v_rank": r_v, "init": spec["init"], "calib_rows": int(calib.shape[0]),
                          "factor_bytes": factors.factor_bytes()}}
        return spec, found, {"kv_cache": "kv_cache.json", "cskv_factors": FACTORS_FILE}


STAGE = KV()
