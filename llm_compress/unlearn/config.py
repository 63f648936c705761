"""The ``unlearn`` recipe section: the forget / keep / holdout sets, the probes, and one model per method (SHRED,
K-FADE, gradient ascent, gradient difference, NPO), keyed on ``method``. Torch-free."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from llm_compress.schema import Strict, registry, union


class _UnlearnTrain(Strict):
    """What the gradient methods share: a plain AdamW loop over the forget set."""

    steps: int = Field(20, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Forget records per step (and retain rows, where used).")
    lr: float = Field(1e-4, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)


class ShredConfig(_UnlearnTrain):
    """SHRED: top-K self-distillation from the frozen original model, whose memorised token is demoted at the
    forget set's least likely positions; no retain set."""

    method: Literal["shred"] = "shred"
    forget_share: float = Field(0.2, gt=0, le=1, description="Share P of each record's forget-span positions "
                                "(the lowest original probability first) that become forget positions; the rest are "
                                "anchors whose original distribution is kept.")
    skip_tokens: int = Field(0, ge=0, description="Leading positions of each forget span never demoted (context).")
    top_k: int = Field(20, ge=2, description="K of the top-K targets.")
    demotion: Literal["subtract", "floor"] = Field(
        "subtract", description="subtract: the memorised token's logit minus `strength`; floor: set to the "
                                "smallest top-K logit minus `strength`.")
    strength: float = Field(10.0, ge=0, description="Logit demotion (nats).")
    steps: int = Field(80, ge=1, description="Optimiser steps.")


class KFadeConfig(Strict):
    """K-FADE: a few uphill Gauss-Newton steps on the forget loss, preconditioned per linear layer by K-FAC factors
    estimated on general text, each step sized by a KL trust region."""

    method: Literal["kfade"] = "kfade"
    steps: int = Field(3, ge=1, description="Gauss-Newton steps.")
    trust_region: float = Field(0.01, gt=0, description="KL ball per step (nats): step size sqrt(2 eps / g'F^-1 g).")
    damping: float = Field(1e-3, gt=0, description="Added to each K-FAC factor, relative to its mean eigenvalue.")
    fisher_rows: int = Field(32, ge=1, description="General-text rows the K-FAC factors are estimated on.")
    backtrack: int = Field(12, ge=0, description="Halvings of a step whose KL measured on the K-FAC rows exceeds "
                           "trust_region (the quadratic model can be far off: K-FAC drops cross-layer curvature); "
                           "0: trust the quadratic model.")
    layers: str = Field(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
                        description="Regex of the linear modules updated (default: every decoder-block linear; "
                                    "not lm_head, which may share the embedding).")


class GradientAscentConfig(_UnlearnTrain):
    """Gradient ascent on the forget set's negative log-likelihood."""

    method: Literal["gradient_ascent"] = "gradient_ascent"


class GradientDifferenceConfig(_UnlearnTrain):
    """Gradient ascent on the forget set plus descent on a retain set (general training rows)."""

    method: Literal["gradient_difference"] = "gradient_difference"
    retain_weight: float = Field(1.0, gt=0, description="Weight of the retain set's NLL.")


class NPOConfig(_UnlearnTrain):
    """NPO: -(2/beta) log sigmoid(-beta log(p_model / p_original)) of each forget answer, optionally with a retain
    NLL term (NPO+RT)."""

    method: Literal["npo"] = "npo"
    beta: float = Field(0.1, gt=0)
    retain_weight: float = Field(0.0, ge=0, description="Weight of the retain set's NLL (0: plain NPO).")


# The unlearning methods: name -> (parameters, the Unlearner class that runs them, built by
# llm_compress.unlearn.build). Adding a method: its model above, its class in a module of this package, a line here.
UNLEARN_METHODS = registry(
    "method",
    (ShredConfig, "llm_compress.unlearn.shred:Shred"),
    (KFadeConfig, "llm_compress.unlearn.kfade:KFade"),
    (GradientAscentConfig, "llm_compress.unlearn.gradient_ascent:GradientAscent"),
    (GradientDifferenceConfig, "llm_compress.unlearn.gradient_difference:GradientDifference"),
    (NPOConfig, "llm_compress.unlearn.npo:NPO"),
)
UnlearnMethod = union((m.model for m in UNLEARN_METHODS.values()), "method")


class UnlearnConfig(Strict):
    """Unlearning: remove the forget set from the model before quantization, measured before and after; the
    evaluate stage measures the forget set again on the final (quantized, KV-cached) model."""

    enabled: bool = False
    method: UnlearnMethod = Field(default_factory=ShredConfig, description="The method and its parameters, keyed "
                                  "on method: a name alone ('shred') or a mapping such as {method: npo, beta: 0.1}.")
    forget: str = Field("embedded:facts-forget", description="Forget set: a JSONL file (see docs/unlearn.md), "
                        "or embedded:facts-forget (the demo's planted biographies, first half).")
    keep: str | None = Field("embedded:facts-keep", description="Optional control set in the same format that must "
                             "NOT be forgotten (measured, never trained on); embedded:facts-keep: the other half.")
    holdout: str | None = Field("embedded:facts-holdout", description="Optional text of the same kind never trained "
                                "on: the non-member side of the Min-K% membership AUC.")
    text_field: str = Field("text", description="Field of a document record (the whole text, or the text holding "
                            "the answer).")
    question_field: str = Field("question", description="Field of a question/answer record's question.")
    answer_field: str = Field("answer", description="Field of the answer: of a question, or a span of the text.")
    prefix_tokens: int = Field(8, ge=1, description="A document without an answer: its first N tokens are the "
                               "prompt, the rest is what is forgotten.")
    max_records: int | None = Field(None, ge=1, description="Use the first N forget records only.")
    retain_rows: int = Field(64, ge=1, description="General training rows used as the retain set (gradient "
                             "difference, NPO+RT), K-FADE's K-FAC data and the utility check.")
    min_k: float = Field(0.4, gt=0, le=1, description="k of Min-K% Prob (share of the lowest token log-probs).")
    max_new_tokens: int = Field(48, ge=1, description="Most tokens generated per prefix for ROUGE-L (the answer's "
                                "length if shorter).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            data = {**data, "method": {"method": data["method"]}}
        return data

