"""The unlearn stage: remove a forget set from the model before it is quantized.
Algorithms: :mod:`llm_compress.unlearn`.

Order: distill -> unlearn -> quantize -> kv. Unlearning runs on the float model that will be compressed, because
(1) the gradient methods and K-FADE need float weights to update, (2) quantizing afterwards is what a user ships,
and quantization is known to bring unlearned text back, so evaluate re-measures the forget set on the final,
quantized model with its KV cache, next to this stage's figures (``gates.max_forget_rouge`` /
``max_forget_regain``). Unlearning after quantization would train a fake-quantized model whose codes the export
then re-rounds.

Inputs: the model (the distilled student, or the given student / teacher), the forget set and the optional keep
and holdout sets (``embedded:facts-*``: the biographies the bootstrap planted in the embedded teacher's corpus), the
tokenizer, and the data stage's rows: training rows are the retain set / K-FAC data, held-out rows the utility
check. Writes the unlearned model, ``unlearn.json`` (figures before and after, per record, and the method's history).
Checked before any work: the set files exist and every record has the named fields and its answer inside its text;
after loading the tokenizer, before the method runs: no record is longer than the model's context.
"""

from __future__ import annotations

import re
from pathlib import Path

from llm_compress.errors import InputError
from llm_compress.refs import check_recipe_models
from llm_compress.stage import Context, Env, Stage, Upstream
from llm_compress.unlearn.config import UnlearnConfig

_EMBEDDED = {"embedded:facts-forget": "forget.jsonl", "embedded:facts-keep": "keep.jsonl",
             "embedded:facts-holdout": "holdout.jsonl"}


def set_paths(recipe, up: Upstream | None = None) -> dict[str, str]:
    """name -> file of the unlearn sets the recipe names: ``embedded:facts-*`` resolved in the bootstrap corpus once
    it exists (``up``), else kept as written; an unknown ``embedded:`` name is refused either way."""
    u = recipe.unlearn
    out = {}
    for name, ref in (("forget", u.forget), ("keep", u.keep), ("holdout", u.holdout)):
        if ref is None:
            continue
        if ref.startswith("embedded:"):
            if ref not in _EMBEDDED:
                raise InputError(f"unlearn.{name}: unknown embedded set '{ref}'; embedded sets: {', '.join(_EMBEDDED)}")
            out[name] = str(Path(up.out("bootstrap", "corpus")) / "facts" / _EMBEDDED[ref]) if up else ref
        else:
            out[name] = ref
    return out


class Unlearn(Stage):
    name = "unlearn"
    sections = {"unlearn": UnlearnConfig}
    reads = ("models",)
    makes_model = True
    libraries = ("torch", "transformers", "rouge-score", "scikit-learn")

    def rules(self, recipe) -> None:
        u = recipe.unlearn
        if u.enabled and recipe.models.teacher != "embedded" and any(
                (p or "").startswith("embedded:") for p in (u.forget, u.keep, u.holdout)):
            raise ValueError("unlearn: the embedded:facts-* sets are planted in the embedded teacher only; give "
                             "forget (and keep/holdout, or null) as JSONL files for models.teacher "
                             f"'{recipe.models.teacher}'")

    def check(self, recipe) -> None:
        from llm_compress.unlearn.data import read_records

        check_recipe_models(recipe.models)
        u = recipe.unlearn
        for name, ref in set_paths(recipe).items():
            if ref.startswith("embedded:"):  # a known name: set_paths refused the others
                if not recipe.embedded.facts:
                    raise InputError(f"unlearn.{name}: {ref} needs planted facts, but embedded.facts is 0")
                continue
            read_records(ref, text_field=u.text_field, question_field=u.question_field, answer_field=u.answer_field,
                         what=f"unlearn.{name}")  # existence, JSON, fields, answer spans: before any work
        if u.method.method == "kfade":
            try:
                re.compile(u.method.layers)
            except re.error as e:
                raise InputError(f"unlearn.method.layers: not a regular expression ({e})") from None

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        sets = {f"set:{k}": v for k, v in set_paths(recipe, up).items()}
        return {"model": up.model, "tokenizer": up.tokenizer, "train": up.out("data", "train"),
                "eval": up.out("data", "eval"), **sets}

    def config(self, recipe, up: Upstream, env: Env) -> dict:
        return {**super().config(recipe, up, env), "batch_size": recipe.evaluate.batch_size}

    def run(self, ctx: Context):
        import copy

        import torch
        from transformers import AutoConfig

        from llm_compress.data import load_tokens
        from llm_compress.io import write_json_atomic
        from llm_compress.modeling import load_causal_lm, load_tokenizer, save_pretrained_atomic_into
        from llm_compress.result import StageResult
        from llm_compress.unlearn import build, load_sets, measure, summary
        from llm_compress.unlearn.base import UnlearnData
        from llm_compress.unlearn.metrics import utility_metrics

        r, i, u = ctx.recipe, ctx.inputs, ctx.recipe.unlearn
        m = r.models
        tok = load_tokenizer(i["tokenizer"], trust_remote_code=m.trust_remote_code, revision=m.revision)
        config = AutoConfig.from_pretrained(i["model"], trust_remote_code=m.trust_remote_code, revision=m.revision)
        config = getattr(config, "text_config", None) or config
        max_len = getattr(config, "max_position_embeddings", None) or 10**9
        # the sets against the model's context before its weights are loaded
        sets = load_sets({k.split(":", 1)[1]: v for k, v in i.items() if k.startswith("set:")}, tok, u, max_len)
        model = load_causal_lm(i["model"], dtype=m.dtype, device=ctx.device, trust_remote_code=m.trust_remote_code,
                               revision=m.revision, what="unlearn stage input")
        general = load_tokens(i["train"])[: u.retain_rows]  # [R, T] retain set / K-FAC rows
        held_out = load_tokens(i["eval"])[: u.retain_rows]  # [R, T] utility rows
        bs = ctx.call.config["batch_size"]
        original = copy.deepcopy(model).eval().requires_grad_(False)
        before = {**measure(original, sets, tok, u, batch_size=bs),
                  "utility": utility_metrics(original, None, held_out.to(ctx.device), batch_size=bs)}
        torch.manual_seed(r.runtime.seed)
        method = build(u.method)
        history = method(model, UnlearnData(forget=sets["forget"].to(ctx.device), general=general.to(ctx.device)),
                         seed=r.runtime.seed, progress=r.runtime.progress)
        model.eval()
        after = {**measure(model, sets, tok, u, batch_size=bs),
                 "utility": utility_metrics(model, original, held_out.to(ctx.device), batch_size=bs)}
        del original
        save_pretrained_atomic_into(model.cpu(), tok, ctx.out_dir / "model")
        extra = method.report()
        write_json_atomic(ctx.out_dir / "unlearn.json", {"method": u.method.model_dump(mode="json"), "before": before,
                                                         "after": after, "history": history, **extra})
        rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in (history[-1] if history else {}).items()}
        metrics = {"method": u.method.method, "records": len(sets["forget"]), "before": summary(before),
                   "after": summary(after), "last_step": rounded, **extra}
        return StageResult(outputs={"model": "model", "unlearn": "unlearn.json"}, metrics=metrics)


STAGE = Unlearn()
