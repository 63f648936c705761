"""08-export: write the final model in each requested format, load it back and compare its logits with the source's
before publishing. Algorithm: :mod:`stages.export`. With the KV stage on, its ``kv_cache.json`` is an input (only
then): the transformers formats carry it, checked by generating through it. Checked before any work: the ONNX
formats are refused for a model whose config they cannot export correctly (:mod:`stages.export_support`).
"""

from __future__ import annotations

from pathlib import Path

from stages.errors import InputError
from stages.export_support import ONNX_FORMATS, onnx_export_problem, onnx_runtime_missing
from stages.refs import distilled_model_config
from stages.stage import Context, Stage, Upstream


class Export(Stage):
    name, index = "export", 8
    sections = ("export",)
    libraries = ("torch", "transformers", "safetensors", "optimum", "optimum-onnx", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "onnx-ir", "bitsandbytes")  # one of the two runtimes: the other "not installed"

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
        kv = {"kv_cache": up.out("kv", "kv_cache")} if recipe.kv.enabled else {}
        return {"model": up.model, "eval": up.out("data", "eval"), **kv}

    def run(self, ctx: Context):
        from stages import export
        from stages.data import load_tokens

        e, i = ctx.recipe.export, ctx.inputs
        ids = load_tokens(i["eval"])[: e.check_batch_size, : e.check_seq_len]
        return export.run_export(e, Path(i["model"]), ctx.out_dir, check_ids=ids, seed=ctx.recipe.runtime.seed,
                                 device=ctx.device, progress=ctx.recipe.runtime.progress,
                                 kv_spec=Path(i["kv_cache"]) if "kv_cache" in i else None)


STAGE = Export()
