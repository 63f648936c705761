"""03-distill: knowledge distillation of the student from the teacher. Algorithm: :mod:`llm_compress.distill`.

The student is a checkpoint (``models.student``) or derived from the teacher (``distill.student``). With
``teacher.source: cached_topk`` the teacher's top-k log-probs are computed once into a cache shared by every run
with the same teacher, tokens, k, temperature, dtype, device and code; a killed run resumes from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from llm_compress.errors import InputError
from llm_compress.refs import check_recipe_models, model_config
from llm_compress.stage import Context, Stage, Upstream


def teacher_topk_key(recipe, call) -> str:
    """What cached teacher top-k values depend on: the teacher and token digests, k, temperature, dtype, resolved
    device and the stage's code; not the student or the divergence, so runs that differ only in those share it."""
    from llm_compress.io import stable_hash

    d, dc = call.input_digests, recipe.distill
    return stable_hash({"teacher": d["teacher"], "train": d["train"], "eval": d["eval"], "k": dc.teacher.topk,
                        "temperature": dc.temperature, "dtype": recipe.models.dtype, "device": call.device,
                        "code": call.code})[:24]


class Distill(Stage):
    name, index = "distill", 3
    sections = ("distill", "models")
    makes_model = True
    libraries = ("torch", "transformers", "tokenizers", "safetensors")

    def check(self, recipe) -> None:
        m = recipe.models
        check_recipe_models(m)
        teacher = model_config(m.teacher, m.revision) if m.teacher != "embedded" else None
        student = model_config(m.student, m.revision) if m.student != "derive" else None
        tv, sv = (c.get("vocab_size") if c else None for c in (teacher, student))
        if tv is not None and sv is not None and tv != sv:
            raise InputError(f"vocabulary mismatch: models.teacher has vocab_size {tv}, models.student has "
                             f"{sv}; teacher and student must share a tokenizer")
        layers = recipe.distill.student.layers
        n = teacher.get("num_hidden_layers") if teacher else recipe.embedded.num_layers
        if m.student == "derive" and n and layers != "every_other" and any(not 0 <= i < n for i in layers):
            raise InputError(f"distill.student.layers: {layers} must be indices in [0, {n}) (the teacher has {n} "
                             "layers)")

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        inputs = {"teacher": up.teacher, "tokenizer": up.tokenizer, "train": up.out("data", "train"),
                  "eval": up.out("data", "eval")}
        if recipe.models.student != "derive":
            inputs["student"] = recipe.models.student
        return inputs

    def run(self, ctx: Context):
        from llm_compress import distill

        r, i = ctx.recipe, ctx.inputs
        return distill.run(r.distill, r.models, r.runtime, teacher_ref=i["teacher"],
                           student_ref=i.get("student", "derive"), tokenizer_ref=i["tokenizer"],
                           train_path=Path(i["train"]),
                           eval_path=Path(i["eval"]), out_dir=ctx.out_dir,
                           checkpoint_dir=ctx.cache_dir("checkpoints") / ctx.call.key,
                           teacher_cache_dir=ctx.cache_dir("teacher-topk") / teacher_topk_key(r, ctx.call))


STAGE = Distill()
