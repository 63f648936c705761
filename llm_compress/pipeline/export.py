"""The export stage: write the final model in each requested format, load it back and compare its logits with the
source's before publishing. Algorithm: :mod:`llm_compress.export`. With the KV stage on, its ``kv_cache.json`` is an
input (only then): the transformers formats carry it, checked by generating through it. Checked before any work: the
ONNX formats are refused for a model whose config they cannot export correctly (:mod:`llm_compress.export_support`).

Each format folder carries a model card (:mod:`llm_compress.card`). What it says comes from the stage's key: the teacher
(an input: its digest, and its license read from its README front matter), evaluate's ``eval.json`` (an input when
evaluate ran: it runs before export), and in the config the upstream stages' cache keys and key settings.
"""

from __future__ import annotations

from pathlib import Path

from llm_compress.errors import InputError
from llm_compress.export_support import ONNX_FORMATS, ExportConfig, onnx_export_problem, onnx_runtime_missing
from llm_compress.pipeline.kv import cache_inputs
from llm_compress.refs import distilled_model_config
from llm_compress.stage import Context, Stage, Upstream



# The stages whose results reach the export (with the model-making ones): their cache keys are in its card.
LINEAGE = ("bootstrap", "select", "data", "kv", "evaluate")


class Export(Stage):
    name = "export"
    sections = {"export": ExportConfig}
    reads = ("models.dtype",)  # the dtype its source model is loaded in, and its checks computed
    libraries = ("torch", "transformers", "safetensors", "optimum", "optimum-onnx", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "onnx-ir", "bitsandbytes")  # one of the two runtimes: the other "not installed"

    def rules(self, recipe) -> None:
        q, e = recipe.quantize, recipe.export
        if not e.enabled:
            return
        qs = q.scheme.quant_setting()
        online = q.scheme.method == "ostquant" and q.scheme.online_hadamard
        others = [f for f in e.formats if f != "safetensors"]
        if q.enabled and (qs.a_bits < 16 or qs.kv_bits < 16 or online) and others:
            raise ValueError(f"export.formats {others} load weights only, but quantize.scheme ({q.scheme.method}, "
                             f"{q.scheme.setting}{', online_hadamard' if online else ''}) "
                             "needs run-time parts (activation/KV fake quantization, online Hadamard) that only "
                             "safetensors exports keep; export [safetensors] or use a W*A16 setting "
                             "(and online_hadamard: false)")
        # the formats that ship the quantize stage's codes need them, at a bit width they can hold
        if "compressed-tensors" in e.formats and not q.enabled:
            raise ValueError("export.formats: compressed-tensors packs the quantize stage's integer codes, but "
                             "quantize.enabled is false; enable quantize (e.g. gptq at W4A16) or drop the format")
        if not q.enabled:
            return  # onnx-int4/-int8 then quantize the float model afresh with onnxruntime's quantizers
        for fmt, bits in (("onnx-int4", 4), ("onnx-int8", 8)):
            if fmt in e.formats and qs.w_bits != bits:
                raise ValueError(f"export.formats: {fmt} ships the quantize stage's codes, which are "
                                 f"{qs.w_bits}-bit ({q.scheme.setting}); re-rounding them onto a {bits}-bit grid "
                                 f"would ship another model: use a W{bits} setting or drop {fmt}")
            if fmt in e.formats and q.scheme.group_size is not None and q.scheme.group_size < 16:
                raise ValueError(f"export.formats: {fmt} (MatMulNBits) needs weight groups of at least 16 input "
                                 f"columns; quantize.scheme.group_size is {q.scheme.group_size}")

    def check(self, recipe) -> None:
        onnx = [f for f in recipe.export.formats if f in ONNX_FORMATS]
        if not onnx:
            return
        keep = [f for f in recipe.export.formats if f not in ONNX_FORMATS] or ["safetensors"]
        if why := onnx_runtime_missing():
            raise InputError(f"export.formats {onnx}: {why}; or drop the onnx formats (export.formats: "
                             f"[{', '.join(keep)}])")
        if why := onnx_export_problem(distilled_model_config(recipe)):
            raise InputError(f"export.formats {onnx}: the model to export cannot be exported to ONNX correctly: "
                             f"{why}; drop the onnx formats (export.formats: [{', '.join(keep)}])")

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        kv = cache_inputs(recipe, up)
        ev = {"evaluation": up.out("evaluate", "eval")} if "evaluate" in up else {}
        return {"model": up.model, "eval": up.out("data", "eval"), "teacher": up.teacher, **ev, **kv}

    def config(self, recipe, up: Upstream, env) -> dict:
        """Its sections, plus what its model card says of the upstream stages: the cache key of each one whose
        results reach the export (:data:`LINEAGE` and the model-making stages), the key settings of the stages
        that made the model, and which model is exported (its name in evaluate's figures)."""
        cfg = super().config(recipe, up, env)
        models = up.models()
        cfg["card"] = {"source": list(models)[-1] if models else "teacher", "made": made_settings(recipe, up),
                       "lineage": {s: m["cache_key"] for s, m in up.done.items()
                                   if "cache_key" in m and (s in LINEAGE or s in up.model_stages)},
                       "teacher": recipe.models.teacher, "student": recipe.models.student,
                       "revision": recipe.models.revision, "data": recipe.data.source,
                       "evaluate_device": (up.done.get("evaluate") or {}).get("device")}
        return cfg

    def run(self, ctx: Context):
        from llm_compress import export
        from llm_compress.data import load_tokens

        e, i = ctx.recipe.export, ctx.inputs
        ids = load_tokens(i["eval"])[: e.check_batch_size, : e.check_seq_len]
        return export.run_export(e, Path(i["model"]), ctx.out_dir, check_ids=ids, seed=ctx.recipe.runtime.seed,
                                 device=ctx.device, progress=ctx.recipe.runtime.progress,
                                 kv_spec=Path(i["kv_cache"]) if "kv_cache" in i else None, card=card_facts(ctx),
                                 dtype=ctx.recipe.models.dtype)


def made_settings(recipe, up: Upstream) -> dict[str, dict]:
    """The key settings of each enabled, finished stage that shaped the model (stage -> setting -> value)."""
    made: dict[str, dict] = {}
    if recipe.select.enabled and "select" in up:
        made["select"] = {"method": recipe.select.method}
    if "data" in up:
        made["data"] = {"source": recipe.data.source, "seq_len": recipe.data.seq_len}
    if recipe.distill.enabled and "distill" in up:
        d = recipe.distill
        made["distill"] = {"divergence": d.divergence.name, "steps": d.steps, "temperature": d.temperature}
    if recipe.unlearn.enabled and "unlearn" in up:
        made["unlearn"] = {"method": recipe.unlearn.method.method, "forget": recipe.unlearn.forget}
    if recipe.quantize.enabled and "quantize" in up:
        q = recipe.quantize.scheme
        made["quantize"] = {"method": q.method, "setting": q.setting,
                            **({"group_size": q.group_size} if getattr(q, "group_size", None) else {})}
    if recipe.kv.enabled and "kv" in up:
        made["kv"] = {"method": recipe.kv.cache.method}
    return made


def card_facts(ctx: Context) -> dict:
    """What the model card of each format says beyond the format's own figures (see :mod:`llm_compress.card`)."""
    import json

    from llm_compress.card import teacher_license

    c, i = ctx.call.config["card"], ctx.inputs
    lic, where = teacher_license(i["teacher"], c["revision"])
    ev = json.loads(Path(i["evaluation"]).read_text()) if "evaluation" in i else None
    return {**c, "license": lic, "license_source": where, "evaluation": ev, "digests": ctx.call.input_digests}


STAGE = Export()
