"""The evaluate stage: quality against the teacher, size and speed of every model of the run; then the quality gates.
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
from typing import Annotated

from pydantic import Field

from llm_compress.errors import GateError
from llm_compress.pipeline.kv import cache_inputs
from llm_compress.refs import check_recipe_models
from llm_compress.schema import Strict
from llm_compress.stage import Context, Stage, Upstream


class EvaluateConfig(Strict):
    enabled: bool = True
    max_eval_tokens: int = Field(8192, ge=64, description="Held-out tokens scored per model.")
    batch_size: int = Field(8, ge=1)
    latency_prompt_tokens: int = Field(16, ge=1)
    latency_new_tokens: int = Field(32, ge=1)
    latency_repeats: int = Field(3, ge=1)


class GatesConfig(Strict):
    """Quality gates checked after evaluation; a miss fails the run and nothing is published."""

    max_ppl_ratio: float | None = Field(None, gt=0, description="Final perplexity / teacher perplexity.")
    max_kl: float | None = Field(None, ge=0, description="Final mean KL(teacher || model) per token.")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="Final top-1 agreement with the teacher.")
    stage_ppl_ratio: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Per model-changing stage: max perplexity of its output / "
        "perplexity of its input (e.g. quantize: 1.02).")
    max_forget_rouge: float | None = Field(None, ge=0, le=1, description="Unlearning: the final model's (quantized, "
                                           "with its KV cache) forget-set ROUGE-L at most this.")
    max_forget_regain: float | None = Field(None, ge=0, le=1, description="Unlearning: the final model's forget-set "
                                            "ROUGE-L at most this much above the unlearned model's (compression "
                                            "must not bring forgotten text back).")


def gate_chain(up: Upstream) -> list[tuple[str, str]]:
    """(model, the model it was made from) for every model of the run, in order: what stage gates compare."""
    names = ["teacher", *up.models()]
    return [(b, a) for a, b in zip(names, names[1:])]


class Evaluate(Stage):
    name = "evaluate"
    sections = {"evaluate": EvaluateConfig, "gates": GatesConfig}
    unkeyed = ("gates",)  # judged by `after` on the finished evaluation: a changed gate re-judges, never re-measures
    reads = ("models",)
    libraries = ("torch", "transformers", "safetensors")

    def rules(self, recipe) -> None:
        gates = recipe.gates
        if recipe.evaluate.enabled is False and any(v for v in gates.model_dump().values()):
            raise ValueError("gates are set but evaluate.enabled is false")
        forget_gates = [g for g in ("max_forget_rouge", "max_forget_regain") if getattr(gates, g) is not None]
        if forget_gates and not recipe.unlearn.enabled:
            raise ValueError(f"gates {forget_gates} judge unlearning but unlearn.enabled is false")
        bad = sorted(set(gates.stage_ppl_ratio) - set(recipe.model_stages))
        if bad:
            raise ValueError(f"gates.stage_ppl_ratio: {bad} make no model; stages that do: "
                             f"{', '.join(recipe.model_stages)}")

    def check(self, recipe) -> None:
        check_recipe_models(recipe.models)  # it scores the teacher and the given student

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        kv = cache_inputs(recipe, up)
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

        ev = up.done["evaluate"]["metrics"]
        unlearned = up.done["unlearn"]["metrics"]["after"] if "unlearn" in up else None
        enforce_gates(recipe.gates, ev["models"], ev["final"], gate_chain(up), unlearned)


STAGE = Evaluate()


def check_gates(gates: GatesConfig, models: dict[str, dict], final: str, chain: list[tuple[str, str]],
                unlearned: dict | None = None) -> list[str]:
    """Return one message per missed gate (empty if all pass).

    ``models``: evaluation metrics per model name; ``final``: the model the run would publish;
    ``chain``: (stage, input model name) for each model-changing stage, in order; ``unlearned``: the unlearn
    stage's figures of its own output (``after``), what the forget gates compare the final model with.
    """
    f = models[final]
    misses = []
    fr = f.get("unlearn", {}).get("forget", {}).get("rouge_l")
    if gates.max_forget_rouge is not None and fr is not None and fr > gates.max_forget_rouge:
        misses.append(f"gates.max_forget_rouge: final model ({final}) reproduces the forget set with ROUGE-L "
                      f"{fr:.4f} (limit {gates.max_forget_rouge})")
    if gates.max_forget_regain is not None and fr is not None and unlearned is not None:
        regain = fr - unlearned["forget"]["rouge_l"]
        if regain > gates.max_forget_regain:
            misses.append(f"gates.max_forget_regain: compression brought forgotten text back: forget-set ROUGE-L "
                          f"{unlearned['forget']['rouge_l']:.4f} right after unlearning, {fr:.4f} in the final model "
                          f"({final}), +{regain:.4f} (limit {gates.max_forget_regain})")
    if gates.max_ppl_ratio is not None and f["ppl_ratio"] > gates.max_ppl_ratio:
        misses.append(f"gates.max_ppl_ratio: final model ({final}) perplexity {f['ppl']:.3f} is "
                      f"{f['ppl_ratio']:.4f}x the teacher's {models['teacher']['ppl']:.3f} "
                      f"(limit {gates.max_ppl_ratio})")
    if gates.max_kl is not None and f["kl_to_teacher"] > gates.max_kl:
        misses.append(f"gates.max_kl: KL(teacher || {final}) = {f['kl_to_teacher']:.4f} (limit {gates.max_kl})")
    if gates.min_top1_agreement is not None and f["top1_agreement"] < gates.min_top1_agreement:
        misses.append(f"gates.min_top1_agreement: {final} agrees with the teacher on "
                      f"{f['top1_agreement']:.4f} of tokens (limit {gates.min_top1_agreement})")
    for stage, src in chain:
        limit = gates.stage_ppl_ratio.get(stage)
        if limit is None or stage not in models:
            continue
        ratio = models[stage]["ppl"] / models[src]["ppl"]
        if ratio > limit:
            misses.append(f"gates.stage_ppl_ratio.{stage}: perplexity {models[stage]['ppl']:.3f} is {ratio:.4f}x "
                          f"its input's ({src}: {models[src]['ppl']:.3f}) (limit {limit})")
    return misses


def enforce_gates(gates: GatesConfig, models: dict[str, dict], final: str, chain: list[tuple[str, str]],
                  unlearned: dict | None = None) -> None:
    misses = check_gates(gates, models, final, chain, unlearned)
    if misses:
        raise GateError("quality gate(s) missed, nothing published:\n" + "\n".join(f"  - {m}" for m in misses))
