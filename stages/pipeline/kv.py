"""05-kv: KV-cache compression. The configured cache is written as ``kv_cache.json`` (a user builds it with
``stages.kv.load_kv_cache(folder, model)``) and measured on held-out rows against the full cache: memory held,
perplexity ratio, KL and top-1 agreement (:mod:`stages.kv.measure`). Caches: :mod:`stages.kv` (KIVI, sink window,
MiniCache). The stage makes no new weights: later stages still take the model it was measured on.

Checked before any work: the model type has the Llama attention layout, and the spec suits the model's geometry
(group size vs head_dim, MiniCache's start layer vs depth) when that geometry can be read without a download.
"""

from __future__ import annotations

from types import SimpleNamespace

from stages.errors import InputError
from stages.refs import distilled_model_config
from stages.stage import Context, Stage, Upstream


class KV(Stage):
    name, index = "kv", 5
    sections = ("kv",)
    libraries = ("torch", "transformers")

    def check(self, recipe) -> None:
        from stages.kv.spec import check_against_model, normalize_spec

        cfg = distilled_model_config(recipe)
        if cfg is not None and "num_attention_heads" in cfg:
            try:
                check_against_model(normalize_spec(recipe.kv.cache.model_dump()), SimpleNamespace(**cfg))
            except InputError as e:
                raise InputError(f"kv.cache: {e}") from None

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        return {"model": up.model, "eval": up.out("data", "eval")}

    def run(self, ctx: Context):
        import torch

        from stages.kv import save_kv_cache_json
        from stages.kv.measure import held_out_rows, measure, rounded
        from stages.kv.spec import check_against_model, normalize_spec
        from stages.modeling import load_causal_lm
        from stages.result import StageResult

        r, kv = ctx.recipe, ctx.recipe.kv
        model = load_causal_lm(ctx.inputs["model"], dtype=r.models.dtype, device=ctx.device,
                               trust_remote_code=r.models.trust_remote_code, revision=r.models.revision,
                               what="kv stage input")
        spec = normalize_spec(kv.cache.model_dump())
        try:
            check_against_model(spec, model)  # the checks before work could not read every model's geometry
        except InputError as e:
            raise InputError(f"kv.cache: {e}") from None
        rows, prefill = held_out_rows(ctx.inputs["eval"], kv, ctx.device)  # [rows, T], prompt tokens
        torch.manual_seed(r.runtime.seed)
        metrics = measure(model, rows, spec, prefill=prefill)
        save_kv_cache_json(ctx.out_dir / "kv_cache.json", spec)
        metrics = {"method": spec["method"], **rounded(metrics)}
        return StageResult(outputs={"kv_cache": "kv_cache.json"}, metrics=metrics)


STAGE = KV()
