"""The ``distill`` recipe section: the student, the teacher signal, on-policy sampling, the optimiser, and the
divergences (one pydantic model per divergence, keyed on ``name``; the loss functions in
:mod:`llm_compress.distill.divergences` check their parameters through these same models). Torch-free."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from llm_compress.schema import Strict, union


STUDENT_CONFIG_KEYS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                       "head_dim"}


class DeriveStudent(Strict):
    layers: Literal["every_other"] | list[int] = Field(
        "every_other", description="Teacher layers the student keeps: 'every_other' (0, 2, 4, ...) "
        "or explicit indices.")
    init: Literal["teacher", "random"] = Field(
        "teacher", description="Copy the kept layers' weights from the teacher, or start random.")
    config: dict[str, int] = Field(
        default_factory=dict, description="A smaller architecture: overrides of the teacher's config such as "
        "{hidden_size: 96, intermediate_size: 256, num_attention_heads: 4, num_key_value_heads: 2}. Needs "
        f"init: random when it changes a shape (only num_hidden_layers follows from layers). Allowed keys: "
        f"{', '.join(sorted(STUDENT_CONFIG_KEYS))}.")

    @model_validator(mode="after")
    def _shape(self) -> "DeriveStudent":
        bad = sorted(set(self.config) - STUDENT_CONFIG_KEYS)
        if bad:
            raise ValueError(f"config: unknown key(s) {bad}; allowed: {sorted(STUDENT_CONFIG_KEYS)}")
        if any(v < 1 for v in self.config.values()):
            raise ValueError("config: every value must be a positive integer")
        if self.config and self.init == "teacher":
            raise ValueError("config: a student with another shape cannot copy the teacher's weights; "
                             "set init: random")
        return self


class TeacherSignal(Strict):
    """Where the teacher's distributions come from during training."""

    source: Literal["online", "cached_topk"] = Field(
        "online", description="online: run the teacher on every batch; cached_topk: run it once over the "
        "training and held-out rows, keep its top-k log-probs + a tail bucket on disk (reused by any run "
        "with the same teacher, data, k and temperature), and train without it.")
    topk: int = Field(32, ge=1, description="Tokens kept per position for cached_topk (clipped to the vocabulary).")


class OnPolicy(Strict):
    """GKD-style on-policy distillation: part of the batches are the student's own continuations."""

    share: float = Field(0.0, ge=0, le=1, description="Fraction of micro-batches replaced by student samples "
                         "(GKD's lambda); 0 = off-policy only.")
    prompt_tokens: int = Field(32, ge=1, description="Tokens of each data row kept as the prompt; the student "
                               "samples the rest of the row and the loss covers only the sampled tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student (full vocabulary).")


# One model per divergence, keyed on ``name``: the one definition of its parameters, defaults and ranges. The recipe
# and the Prefect form show them; the loss functions (llm_compress/distill/divergences.py, whose SPECS pairs each model
# with its functions) check and complete their keyword parameters through these same models.
class ForwardKL(Strict):
    """KL(teacher || student): mode covering."""

    name: Literal["forward_kl"] = "forward_kl"


class ReverseKL(Strict):
    """KL(student || teacher): mode seeking."""

    name: Literal["reverse_kl"] = "reverse_kl"


class JS(Strict):
    """Jensen-Shannon divergence (generalised JSD at beta 0.5)."""

    name: Literal["js"] = "js"


class GJSD(Strict):
    """Generalised JSD (GKD): beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q."""

    name: Literal["gjsd"] = "gjsd"
    beta: float = Field(0.5, ge=0, le=1, description="Mixture weight of the teacher in m.")


class TVD(Strict):
    """Total variation distance."""

    name: Literal["tvd"] = "tvd"


class _Skew(Strict):
    alpha: float = Field(0.1, ge=0, lt=1, description="Skew; alpha = 1 would make the loss identically 0.")


class SkewKL(_Skew):
    """Skew KL (DistiLLM): KL(p || alpha * p + (1 - alpha) * q)."""

    name: Literal["skew_kl"] = "skew_kl"


class SkewReverseKL(_Skew):
    """Skew reverse KL (DistiLLM): KL(q || alpha * q + (1 - alpha) * p)."""

    name: Literal["skew_reverse_kl"] = "skew_reverse_kl"


class AKL(Strict):
    """Adaptive KL (Wu et al.): forward and reverse KL weighted by head / tail gaps."""

    name: Literal["akl"] = "akl"
    mu: float = Field(0.5, ge=0, le=1, description="Share of the teacher's probability mass that makes the head.")


class AlphaDivergence(Strict):
    """Amari alpha divergence."""

    name: Literal["alpha_divergence"] = "alpha_divergence"
    alpha: float = Field(0.5, ge=0, le=1, description="0 and 1 are the KL limits.")


class BDKD(Strict):
    """Entropy-weighted mix of forward and reverse KL (BD-KD)."""

    name: Literal["bdkd"] = "bdkd"
    tau: float = Field(1.0, gt=0, description="Temperature of the sigmoid of the entropy gap.")


class Sinkhorn(Strict):
    """SinKD: batch-wise optimal transport between the distributions (needs full distributions)."""

    name: Literal["sinkhorn"] = "sinkhorn"
    epsilon: float = Field(0.1, gt=0, description="Entropic regularisation.")
    iterations: int = Field(20, ge=1, description="Sinkhorn iterations.")
    debias: bool = Field(True, description="Subtract the self-transport terms (Sinkhorn divergence).")
    reduction: Literal["mean", "sum"] = "mean"


DIVERGENCE_MODELS: dict[str, type[Strict]] = {
    m.model_fields["name"].default: m
    for m in (ForwardKL, ReverseKL, JS, GJSD, TVD, SkewKL, SkewReverseKL, AKL, AlphaDivergence, BDKD, Sinkhorn)}
Divergence = union(DIVERGENCE_MODELS.values(), "name")


def divergence_params(d: BaseModel) -> dict[str, Any]:
    """The parameters of a divergence model, without its name: what the loss functions take as keywords."""
    return d.model_dump(exclude={"name"})


class DistillConfig(Strict):
    enabled: bool = True
    method: Literal["kd"] = "kd"
    divergence: Divergence = Field(
        default_factory=ForwardKL,
        description="The divergence and its parameters, keyed on name: a name alone ('forward_kl') or a mapping "
        "such as {name: skew_kl, alpha: 0.1}. forward_kl = KL(teacher || student) (mode covering); reverse_kl = "
        "KL(student || teacher) (mode seeking); js, gjsd (beta), tvd, skew_kl / skew_reverse_kl (alpha, DistiLLM), "
        "akl (mu), alpha_divergence (alpha), bdkd (tau), sinkhorn (batch-wise OT: epsilon, iterations, debias, "
        "reduction); formulas in llm_compress/distill/divergences.py.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature for both distributions.")
    chunk: Literal["auto", "always", "never"] = Field(
        "auto", description="Compute token-wise losses in chunks of tokens so memory stays bounded (never "
        "for sinkhorn); auto: when the vocabulary has 32,768 entries or more.")
    ce_weight: float = Field(0.0, ge=0, le=1, description="loss = (1 - ce_weight) * KD + ce_weight * CE.")
    student: DeriveStudent = Field(default_factory=DeriveStudent)
    teacher: TeacherSignal = Field(default_factory=TeacherSignal)
    on_policy: OnPolicy = Field(default_factory=OnPolicy)
    compile: Literal["auto", "always", "never"] = Field(
        "auto", description="torch.compile the student's forward: auto = on CUDA only.")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1, description="Held-out evaluation every N optimiser steps.")
    checkpoint_every: int = Field(
        50, ge=0, description="Save the training state every N steps; a killed run resumes from the last "
        "checkpoint with the same result as an uninterrupted one (0: off).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "divergence_params" in data:
                raise ValueError("divergence_params was replaced by typed fields next to the name: write "
                                 "divergence: {name: <divergence>, <parameter>: <value>}, e.g. "
                                 "{name: skew_kl, alpha: 0.1}")
            if isinstance(data.get("divergence"), str):  # 'forward_kl' = {name: forward_kl} with its defaults
                data = {**data, "divergence": {"name": data["divergence"]}}
        return data

    @model_validator(mode="after")
    def _params(self) -> "DistillConfig":
        if self.divergence.name == "sinkhorn" and self.chunk == "always":
            raise ValueError("sinkhorn is batch-wise and cannot be chunked over tokens; use chunk: auto or never")
        if self.divergence.name == "sinkhorn" and self.teacher.source == "cached_topk":
            raise ValueError("teacher.source: cached_topk keeps only the teacher's top-k tokens, but sinkhorn "
                             "needs full distributions; use source: online")
        return self

