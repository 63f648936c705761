"""07-evaluate: quality against the teacher, size and speed of every model of the run; then the quality gates.
Algorithm: :mod:`llm_compress.evaluate`.

The models are the student checkpoint (if one is given) and each model-making stage's output, in pipeline order;
``gates.stage_ppl_ratio`` compares each with the one before it. With the KV stage on, the KV stage's
``kv_cache.json`` is an input and every model is also measured with that cache, on the rows the KV stage uses
(``kv.eval_rows``, ``kv.prefill``: in this stage's key then, and only then). With the unlearn stage on, every model
is probed on the forget and keep sets again (ROUGE-L through the KV cache where it fits), and the forget gates compare
the final model with the unlearn stage's own figures.
"""

from __future__ import annotations

from pathlib import Path

from llm_compress.refs import check_recipe_models
from llm_compress.stage import Context, Stage, Upstream


def gate_chain(up: Upstream) -> list[tuple[str, str]]:
    """(model, the model it was made from) for every model of the run, in order: what stage gates compare."""
    names = ["teacher", *up.models()]
    return [(b, a) for a, b in zip(names, names[1:])]


class Evaluate(Stage):
    name, index = "evaluate", 7
    sections = ("evaluate", "models")
    libraries = ("torch", "transformers", "safetensors")

    def check(self, recipe) -> None:
        check_recipe_models(recipe.models)  # it scores the teacher and the given student

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        kv = {"kv_cache": up.out("kv", "kv_cache")} if recipe.kv.enabled else {}
        sets = {}
        if recipe.unlearn.enabled:  # the forget and keep sets, measured again on every model (with the KV cache)
            from llm_compress.pipeline.unlearn import set_paths

            sets = {"tokenizer": up.tokenizer, **{f"set:{k}": v for k, v in set_paths(recipe, up).items()}}
        return {"teacher": up.teacher, "eval": up.out("data", "eval"), **kv, **sets,
                **{f"model:{k}": v for k, v in up.models().items()}}

    def config(self, recipe, up: Upstream, env) -> dict:
        cfg = super().config(recipe, up, env)
        if recipe.kv.enabled:  # the rows the cache is measured on; the spec is the kv_cache input
            cfg["kv"] = {"eval_rows": recipe.kv.eval_rows, "prefill": recipe.kv.prefill}
        if recipe.unlearn.enabled:  # how the sets are read and probed (the method is not: it made the models)
            cfg["unlearn"] = recipe.unlearn.model_dump(mode="json", exclude={"method", "enabled", "retain_rows"})
        return cfg

    def run(self, ctx: Context):
        from llm_compress import evaluate

        r, i = ctx.recipe, ctx.inputs
        models = {k.split(":", 1)[1]: v for k, v in i.items() if k.startswith("model:")}
        kv_spec = Path(i["kv_cache"]) if "kv_cache" in i else None
        sets = {k.split(":", 1)[1]: v for k, v in i.items() if k.startswith("set:")}
        return evaluate.run(r.evaluate, r.models, r.runtime, teacher_ref=i["teacher"], candidates=models,
                            eval_path=Path(i["eval"]), out_dir=ctx.out_dir, kv_spec=kv_spec, kv_cfg=r.kv,
                            unlearn_sets=sets or None, tokenizer_ref=i.get("tokenizer"), unlearn_cfg=r.unlearn)

    def after(self, recipe, up: Upstream) -> None:
        """Raise GateError naming every missed gate (nothing is exported then)."""
        from llm_compress.evaluate import enforce_gates

        ev = up.done["evaluate"]["metrics"]
        unlearned = up.done["unlearn"]["metrics"]["after"] if "unlearn" in up else None
        enforce_gates(recipe.gates, ev["models"], ev["final"], gate_chain(up), unlearned)


STAGE = Evaluate()
