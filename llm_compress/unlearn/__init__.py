"""Unlearning: remove a forget set from a model, keep its general ability, and measure both.

One file per method behind :class:`llm_compress.unlearn.base.Unlearner` (``method`` in the recipe's ``unlearn`` section;
its parameters and the class that runs it are registered once, in ``UNLEARN_METHODS`` of
:mod:`llm_compress.unlearn.config`):

===================  ==============================  =========================================================
method               class (file)                    what it does
===================  ==============================  =========================================================
shred                ``Shred`` (shred.py)            top-K self-distillation from the frozen original, its
                                                     memorised token demoted at the least likely positions;
                                                     no retain set
kfade                ``KFade`` (kfade.py)            uphill Gauss-Newton steps on the forget loss, K-FAC
                                                     preconditioned on general text, KL trust region
gradient_ascent      ``GradientAscent``              ascend the forget NLL
gradient_difference  ``GradientDifference``          ascend the forget NLL, descend a retain NLL
npo                  ``NPO`` (npo.py)                negative preference optimisation against the original
===================  ==============================  =========================================================

The gradient methods share one loop and one loss signature (:mod:`llm_compress.unlearn.loop`). The forget-set format is
in :mod:`llm_compress.unlearn.data`; the metrics (ROUGE-L, extraction strength, answer probability, Min-K% AUC,
perplexity and KL) in :mod:`llm_compress.unlearn.metrics`, used by the unlearn stage and by evaluate.
"""

from __future__ import annotations

from pathlib import Path

from llm_compress.unlearn.config import UNLEARN_METHODS

SETS = ("forget", "keep", "holdout")  # the forget set, the control set that must stay, never-seen text


def build(cfg):
    """The method object for ``cfg`` (the recipe's ``unlearn.method`` section): its registered class, built on it."""
    return UNLEARN_METHODS[cfg.method].load()(cfg)


def load_sets(paths: dict[str, str], tokenizer, ucfg, max_len: int) -> dict:
    """Tokenized sets (name -> ForgetSet) of ``paths`` (name -> JSONL file); errors name the set and the cause."""
    from llm_compress.unlearn.data import read_records, tokenize

    out = {}
    for name, path in paths.items():
        what = f"unlearn.{name}"
        records = read_records(Path(path), text_field=ucfg.text_field, question_field=ucfg.question_field,
                               answer_field=ucfg.answer_field, what=what)
        if name == "forget" and ucfg.max_records:
            records = records[: ucfg.max_records]
        out[name] = tokenize(records, tokenizer, prefix_tokens=ucfg.prefix_tokens, max_len=max_len, what=what)
    return out


def measure(model, sets: dict, tokenizer, ucfg, *, kv_spec: dict | None = None, batch_size: int = 8) -> dict:
    """Forget-side figures of ``model`` on the forget and keep sets (Min-K% AUC against the holdout set)."""
    from llm_compress.unlearn.metrics import forget_metrics

    out = {}
    for name in ("forget", "keep"):
        if name in sets:
            m = forget_metrics(model, sets[name], tokenizer=tokenizer, holdout=sets.get("holdout"), min_k=ucfg.min_k,
                               max_new_tokens=ucfg.max_new_tokens, batch_size=batch_size, kv_spec=kv_spec)
            out[name] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}
    return out


def summary(figures: dict) -> dict:
    """``figures`` without the per-record lists (what goes in manifests and the report)."""
    return {s: {k: v for k, v in f.items() if k != "per_record"} for s, f in figures.items()}
