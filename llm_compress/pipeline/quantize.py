"""The quantize stage: post-training quantization (RTN, GPTQ, OSTQuant) at a W/A/KV setting. Algorithm:
:mod:`llm_compress.quantize.apply`.

Calibrated methods read rows of the data stage's training tokens (the DSIR selection when select ran), or
``calibration.file``. Checked before any work: the file exists, and the model type can take OSTQuant's transforms
or run-time activation / KV quantization (Llama, Mistral, Qwen2 layouts).
"""

from __future__ import annotations

from pathlib import Path

from llm_compress.errors import InputError
from llm_compress.quantize.config import QuantizeConfig
from llm_compress.quantize.support import SUPPORTED_MODEL_TYPES
from llm_compress.refs import check_recipe_models, distilled_model_config
from llm_compress.stage import Context, Env, Stage, Upstream


class Quantize(Stage):
    name = "quantize"
    sections = {"quantize": QuantizeConfig}
    reads = ("models.dtype",)
    makes_model = True
    libraries = ("torch", "transformers", "safetensors")

    def check(self, recipe) -> None:
        check_recipe_models(recipe.models)  # the model it quantizes may be the given student (distill off)
        s = recipe.quantize.scheme
        if s.calibrated and s.calibration.file and not Path(s.calibration.file).is_file():
            raise InputError(f"quantize.scheme.calibration.file: not found: {s.calibration.file}")
        qs = s.quant_setting()
        needs_layout = s.method == "ostquant" or qs.a_bits < 16 or qs.kv_bits < 16
        mt = (distilled_model_config(recipe) or {}).get("model_type")
        if needs_layout and mt is not None and mt not in SUPPORTED_MODEL_TYPES:
            what = "OSTQuant" if s.method == "ostquant" else f"{qs.name}'s activation/KV quantization"
            raise InputError(f"quantize.scheme: {what} supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                             f"the model to quantize is a '{mt}' (use rtn or gptq at a W*A16 setting)")

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        inputs = {"model": up.model}
        s = recipe.quantize.scheme
        if s.calibrated:  # calibrated methods: a given file, or the (DSIR-selected) training tokens
            inputs["calib"] = s.calibration.file or up.out("data", "train")
        return inputs

    def config(self, recipe, up: Upstream, env: Env) -> dict:
        cfg = super().config(recipe, up, env)
        if recipe.quantize.scheme.calibrated and recipe.quantize.scheme.calibration.file:
            cfg["calib_seq_len"] = recipe.data.seq_len  # a text file is packed into rows of this length
        return cfg

    def run(self, ctx: Context):
        from llm_compress.quantize.apply import run

        r, i = ctx.recipe, ctx.inputs
        return run(r.quantize, r.models, r.runtime, model_dir=Path(i["model"]), out_dir=ctx.out_dir,
                   calib_path=Path(i["calib"]) if "calib" in i else None,
                   calib_seq_len=ctx.call.config.get("calib_seq_len"))


STAGE = Quantize()
