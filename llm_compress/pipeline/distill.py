"""The distill stage: knowledge distillation of the student from the teacher. Algorithm: :mod:`llm_compress.distill`.

The student is a checkpoint (``models.student``) or derived from the teacher (``distill.student``). With
``teacher.source: cached_topk`` the teacher's top-k log-probs are computed once into a cache shared by every run
with the same teacher, tokens, k, temperature, dtype, device and code; a killed run resumes from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from llm_compress.distill.config import DistillConfig
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
    name = "distill"
    sections = {"distill": DistillConfig}
    reads = ("models",)
    makes_model = True
    libraries = ("torch", "transformers", "tokenizers", "safetensors")

    def rules(self, recipe) -> None:
        d, op = recipe.distill, recipe.distill.on_policy
        if recipe.models.student == "derive" and not d.enabled:
            raise ValueError("models.student is 'derive' but distill.enabled is false: a derived "
                             "student must be distilled (or give a student checkpoint)")
        if not d.enabled:
            return
        if op.share > 0 and op.prompt_tokens >= recipe.data.seq_len - 1:
            raise ValueError(f"distill.on_policy.prompt_tokens ({op.prompt_tokens}) must be below data.seq_len - 1 "
                             f"({recipe.data.seq_len - 1}): the student needs room to sample")
        dist = recipe.runtime.distributed
        world = dist.processes * dist.nodes
        if d.batch_size % world:
            raise ValueError(f"distill.batch_size ({d.batch_size}) must be a multiple of the "
                             f"runtime.distributed processes x nodes ({world}): each process takes an equal share "
                             "of every batch")
        if world > 1 and dist.strategy == "fsdp" and op.share > 0:
            raise ValueError("distill.on_policy samples from the student outside its sharded forward, which "
                             "runtime.distributed.strategy fsdp does not allow; use strategy ddp or on_policy.share 0")
        if world > 1 and d.divergence.name == "sinkhorn":
            raise ValueError("sinkhorn's loss couples all the tokens of a batch, so it cannot be split over "
                             "runtime.distributed processes; use processes: 1 or a token-wise divergence")

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
        from llm_compress.distill import apply as distill

        r, i = ctx.recipe, ctx.inputs
        return distill.run(r.distill, r.models, r.runtime, teacher_ref=i["teacher"],
                           student_ref=i.get("student", "derive"), tokenizer_ref=i["tokenizer"],
                           train_path=Path(i["train"]),
                           eval_path=Path(i["eval"]), out_dir=ctx.out_dir,
                           checkpoint_dir=ctx.cache_dir("checkpoints") / ctx.call.key,
                           teacher_cache_dir=ctx.cache_dir("teacher-topk") / teacher_topk_key(r, ctx.call))


STAGE = Distill()
