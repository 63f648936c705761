"""00-bootstrap: the embedded default world (corpus from Python's own text, BPE tokenizer, a small Llama teacher).

Runs only when the recipe uses ``embedded`` (teacher, data or a select path). Algorithm: :mod:`llm_compress.bootstrap`.
"""

from __future__ import annotations

from llm_compress.stage import Context, Env, Stage, Upstream


class Bootstrap(Stage):
    name, index = "bootstrap", 0
    sections = ("embedded",)
    libraries = ("torch", "transformers", "tokenizers")

    def enabled(self, recipe) -> bool:
        return recipe.uses_embedded

    def config(self, recipe, up: Upstream, env: Env) -> dict:
        cfg = {**super().config(recipe, up, env), "train_teacher": recipe.models.teacher == "embedded"}
        if recipe.embedded.site_packages:  # that corpus is read from whatever is installed: part of the key
            from llm_compress.embedded import installed_distributions
            from llm_compress.io import stable_hash

            cfg["distributions"] = stable_hash(installed_distributions())
        return cfg

    def run(self, ctx: Context):
        from llm_compress import bootstrap

        return bootstrap.run(ctx.recipe.embedded, ctx.recipe.runtime, train_teacher=ctx.call.config["train_teacher"],
                             out_dir=ctx.out_dir)


STAGE = Bootstrap()
