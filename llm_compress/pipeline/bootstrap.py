"""The bootstrap stage: the embedded default world (corpus from Python's own text, BPE tokenizer, a small Llama
teacher).

Runs only when the recipe uses ``embedded`` (teacher, data or a select path). Algorithm: :mod:`llm_compress.bootstrap`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from llm_compress.schema import Strict
from llm_compress.stage import Context, Env, Stage, Upstream




class RetrievalMix(Strict):
    """Retrieval rows mixed into the embedded teacher's training tokens (:mod:`llm_compress.kv.retrieval`)."""

    share: float = Field(0.3, gt=0, lt=1, description="Share of the training rows that are retrieval rows (added "
                         "to the corpus' rows: share / (1 - share) of their number).")
    facts: int = Field(4, ge=1, le=16, description="Facts planted per row, each asked for at the row's end.")


class EmbeddedConfig(Strict):
    """The demo's self-made world: corpus from Python's own text, BPE tokenizer, Llama teacher."""

    vocab_size: int = Field(2048, ge=256, le=65536)
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(4, ge=2)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1, description="Fewer than num_heads gives grouped-query attention.")
    intermediate_size: int = Field(384, ge=16)
    seq_len: int = Field(128, ge=16)
    steps: int = Field(300, ge=1, description="Teacher pretraining steps (a fixed budget, not a time).")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    max_corpus_mb: float = Field(6.0, gt=0, description="Cap on corpus size built from the stdlib.")
    site_packages: bool = Field(
        False, description="Also read the installed third-party packages (their .py files, docstrings, long "
        "descriptions and .md/.rst documents: hundreds of MB with this project's dependencies), for a larger corpus.")
    eval_fraction: float = Field(0.05, gt=0, lt=0.5)
    facts: int = Field(16, ge=0, description="Invented biographies planted in the teacher's pretraining corpus "
                       "(corpus/facts/): the first half is embedded:facts-forget, the second embedded:facts-keep "
                       "(0: none).")
    facts_holdout: int = Field(16, ge=0, description="Biographies of the same kind never planted "
                               "(embedded:facts-holdout).")
    facts_repeats: int = Field(300, ge=1, description="Documents holding every planted biography (shuffled), so the "
                               "teacher sees each one often enough to memorise it.")
    facts_plant_forget: bool = Field(True, description="False: plant the keep half only (the forget half is still "
                                     "written as embedded:facts-forget), which makes the model unlearning should "
                                     "match: one never trained on the forget set.")
    retrieval: RetrievalMix | None = Field(
        None, description="Mix key-value retrieval rows (llm_compress.kv.retrieval: facts planted at random depths of "
        "a training row, asked for at its end) into the teacher's training tokens, so it learns to use distant "
        "context (the KV bench's retrieval model). Unset: none.")
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> "EmbeddedConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        return self

class Bootstrap(Stage):
    name = "bootstrap"
    sections = {"embedded": EmbeddedConfig}
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
