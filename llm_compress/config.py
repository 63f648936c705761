"""The recipe schema: one pydantic model per stage, all in this file.

A recipe is YAML validated by :class:`Recipe`. Unknown fields are rejected (``extra="forbid"``),
choices are ``Literal``s, and :func:`load_recipe` turns any validation failure into a
:class:`~llm_compress.errors.RecipeError` that names the field and the allowed values, before any work.

Stages whose algorithms are not built yet still have a slot here, so a recipe that asks for one
fails validation with a clear message instead of being silently skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llm_compress.dsir.config import DSIRConfig, TargetSpec
from llm_compress.errors import CompressError, RecipeError

# Methods users may know from the design that are planned but not in this version. Asking for one
# is an error that says so, rather than "not a valid choice".
PLANNED = {
    "quantize": {},
    "kv": {},
    "unlearn": {},
}

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_built(kind: str, value: Any) -> None:
    if isinstance(value, str) and value in PLANNED[kind]:
        raise ValueError(f"{PLANNED[kind][value]} is planned but not built yet in this version")


def _method_union(data: Any, field: str, default: str, kind: str) -> Any:
    """A section's raw ``data`` with ``default`` as the method of its ``field`` union when none is given, and a
    planned method refused by name (``_not_built``): the before-validator of the quantize and kv sections."""
    if isinstance(data, dict) and isinstance(data.get(field), dict):
        data = {**data, field: {"method": default, **data[field]}}
        _not_built(kind, data[field]["method"])
    return data


# --------------------------------------------------------------------------------------------
# models and data


class ModelsConfig(Strict):
    teacher: str = Field(
        "embedded",
        description="'embedded' (the demo teacher the bootstrap step trains), a local directory "
        "holding a transformers checkpoint, or a hub id such as 'Qwen/Qwen2.5-1.5B'.")
    student: str = Field(
        "derive",
        description="'derive' to build the student from the teacher (see distill.student), or a "
        "local directory / hub id of a checkpoint that shares the teacher's tokenizer.")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; the teacher's if unset.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype while training and evaluating.")


class HFDataset(Strict):
    name: str = Field(description="A `datasets` dataset: hub id or local path (e.g. a folder of JSONL).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); the run is keyed by the "
                                 "commit it resolves to.")
    config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"


class DataConfig(Strict):
    source: Literal["embedded", "files", "hf"] = Field(
        "embedded", description="'embedded': the corpus the bootstrap step builds from Python's own "
        "text; 'files': JSONL (one object per line) or .txt (one document per line) files; "
        "'hf': a `datasets` dataset.")
    train: list[str] = Field(default_factory=list, description="Training files (source: files).")
    eval: list[str] = Field(default_factory=list, description="Held-out files (source: files).")
    hf: HFDataset | None = None
    text_field: str = Field("text", description="Field holding the text in JSONL / datasets rows.")
    domains: list[str] | None = Field(
        None, description="Embedded corpus: the domains to train and evaluate on (all if unset).")
    seq_len: int = Field(128, ge=8, le=32768, description="Tokens per training/eval sequence.")
    max_train_docs: int | None = Field(None, ge=1, description="Read at most this many training documents.")

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source == "files" and not (self.train and self.eval):
            raise ValueError("source 'files' needs both data.train and data.eval file lists")
        if self.source == "hf" and self.hf is None:
            raise ValueError("source 'hf' needs data.hf (name, config, splits)")
        return self


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
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> "EmbeddedConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        return self


# --------------------------------------------------------------------------------------------
# stages


class SelectConfig(Strict):
    """Data selection (DSIR): pick the raw documents that best match the target(s); they become the
    distillation training data (``data.train`` / the embedded training splits are then not used)."""

    enabled: bool = False
    method: Literal["dsir"] = Field("dsir", description="Selection method.")
    raw: list[str] = Field(
        default_factory=lambda: ["embedded"],
        description="The raw pool: JSONL / .txt / Parquet files or folders, saved `datasets` folders; 'embedded' "
        "means every training split of the embedded corpus, 'embedded:<domain>' one of them.")
    targets: list[TargetSpec] = Field(
        default_factory=list, description="Target distribution(s): each a list of paths (same forms as raw), with "
        "an optional proportion of k.")
    dsir: DSIRConfig | None = Field(None, description="DSIR settings; dsir.k (documents to select) is required.")

    @model_validator(mode="after")
    def _complete(self) -> "SelectConfig":
        if self.enabled and (not self.targets or self.dsir is None or not self.raw):
            raise ValueError("an enabled select stage needs select.raw, select.targets and select.dsir.k")
        return self

    def references(self) -> list[str]:
        return list(self.raw) + [p for t in self.targets for p in t.paths]


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


# One model per divergence, keyed on ``name``: the recipe and the Prefect form show which parameters exist.
# The loss functions (llm_compress/distill/divergences.py) check their parameters through these same models.


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
Divergence = Annotated[Union[ForwardKL, ReverseKL, JS, GJSD, TVD, SkewKL, SkewReverseKL, AKL, AlphaDivergence, BDKD,
                             Sinkhorn], Field(discriminator="name")]


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


# the settings the quantization papers report (GPTQ, QuaRot, SpinQuant, OSTQuant): the form's dropdown
COMMON_SETTINGS = ("W4A16", "W3A16", "W2A16", "W8A16", "W8A8", "W4A8", "W6A6", "W4A4", "W4A16KV4", "W4A16KV8",
                   "W8A8KV8", "W4A8KV4", "W4A8KV8", "W4A4KV4", "W4A4KV8")


class _QuantBase(Strict):
    """What every quantization method shares: the setting and the weight grid."""

    # the form offers the settings the papers report as a dropdown, and any other W/A/KV combination as text
    setting: Annotated[Literal[COMMON_SETTINGS], Field(title="Common setting")] | Annotated[
        str, Field(title="Other setting")] = Field(
        "W4A16", description="Bits as the papers name them: W<weights>A<activations>[KV<kv cache>], e.g. W4A16, "
        "W8A8, W4A8, W4A4KV4, W4A4KV16 (KV defaults to 16; bits 2-8 or 16, weights 2-8). Activations are "
        "fake-quantized per token and KV per head (asymmetric) when the model runs; weights are quantized into "
        "the checkpoint.")
    group_size: int | None = Field(
        None, description="Weight quantization group along the input dimension (e.g. 32, 64, 128); "
        "unset = one scale per output channel.")
    symmetric: bool = Field(True, description="Symmetric weights (zero point 0) or asymmetric (min/max).")
    clip_search: bool = Field(False, description="Search a per-row (per-group) clipping ratio of the weight range "
                              "that minimises the quantization error.")
    a_clip_ratio: float = Field(1.0, gt=0, le=1, description="Clipping ratio of the per-token activation range.")
    kv_group_size: int | None = Field(None, description="KV quantization group along head_dim (unset: whole head).")
    skip: list[str] = Field(default_factory=lambda: ["lm_head"],
                            description="Linear modules left in full precision (name suffixes).")

    @field_validator("group_size", "kv_group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and (v < 2 or v & (v - 1)):
            raise ValueError("must be a power of two >= 2 (e.g. 32, 64, 128) or unset")
        return v

    @field_validator("setting")
    @classmethod
    def _setting(cls, v: str) -> str:
        from llm_compress.quantize.setting import parse_setting

        try:
            s = parse_setting(v)
        except Exception as e:
            raise ValueError(str(e)) from None
        if not 2 <= s.w_bits <= 8:  # parse_setting allows W16; A and KV are 2-8 or 16 there already
            raise ValueError(f"weight bits must be 2-8, got W{s.w_bits}")
        return v.upper()

    @model_validator(mode="after")
    def _one_group_size(self) -> "_QuantBase":
        # A group suffix in the setting ("W4A16g128") and group_size are one fact: keep it in group_size only,
        # so every quantizer reads the same value (a suffix the weight quantizer ignored gave per-channel
        # weights under a g128 label).
        from llm_compress.quantize.setting import parse_setting

        g = parse_setting(self.setting).w_group_size
        if g is not None:
            if self.group_size is not None and self.group_size != g:
                raise ValueError(f"setting {self.setting} names group size {g} but group_size is {self.group_size}")
            if g < 2 or g & (g - 1):
                raise ValueError(f"setting {self.setting}: group size must be a power of two >= 2")
            s = parse_setting(self.setting)
            kv = f"KV{s.kv_bits}" if s.kv_bits < 16 else ""
            self.setting, self.group_size = f"W{s.w_bits}A{s.a_bits}{kv}", g
        return self

    def quant_setting(self):
        from llm_compress.quantize.setting import parse_setting

        return parse_setting(self.setting, w_group_size=self.group_size, w_symmetric=self.symmetric)


class RTNConfig(_QuantBase):
    """Round-to-nearest weights (fake-quantized), activations/KV as the setting says."""

    method: Literal["rtn"] = "rtn"


class Calibration(Strict):
    samples: int = Field(128, ge=1, description="Calibration rows (seeded draw) of data.seq_len tokens.")
    file: str | None = Field(
        None, description="Where the rows come from. Unset: the data stage's training tokens (the DSIR selection "
        "when select is enabled). Else a file: JSONL (field text_field) or .txt text, tokenized with the model's "
        "tokenizer and packed into rows of data.seq_len; or a .safetensors token file written by the data stage.")
    text_field: str = Field("text", description="Field holding the text in a JSONL calibration file.")


class GPTQConfig(_QuantBase):
    """GPTQ weights (second-order error compensation, layer by layer on calibration data)."""

    method: Literal["gptq"] = "gptq"
    act_order: bool = Field(False, description="Quantize columns in order of decreasing Hessian diagonal.")
    percdamp: float = Field(0.01, gt=0, le=1, description="Hessian damping, a fraction of its mean diagonal.")
    calibration: Calibration = Field(default_factory=Calibration)


class OSTTransforms(Strict):
    rotate_res: bool = Field(True, description="Global orthogonal transform of the residual stream (R_res).")
    rotate_ov: bool = Field(True, description="Per-head orthogonal transform between v_proj and o_proj.")
    smooth_norm: bool = Field(True, description="Smoothing scales after the norms (S_attn, S_ffn).")
    smooth_qk: bool = Field(True, description="Smoothing scales between q and k (equal on RoPE pairs).")
    smooth_ov: bool = Field(True, description="Smoothing scales between v and o.")
    smooth_up_down: bool = Field(True, description="Smoothing scales between up and down.")


class OSTQuantConfig(_QuantBase):
    """OSTQuant: learnable orthogonal + scaling transforms, calibrated with KL-Top, fused, then RTN or GPTQ."""

    method: Literal["ostquant"] = "ostquant"
    weight_quantizer: Literal["rtn", "gptq"] = Field("gptq", description="Quantizer of the fused weights.")
    act_order: bool = Field(False, description="GPTQ act-order (weight_quantizer gptq).")
    percdamp: float = Field(0.01, gt=0, le=1)
    loss: Literal["kl_top", "kl", "mse"] = Field(
        "kl_top", description="Calibration loss vs the full-precision model: kl_top (KL on its top-k tokens, the "
        "paper's), kl (full forward KL) or mse (of the logits).")
    topk: int = Field(1000, ge=1, description="k of kl_top (clipped to the vocabulary).")
    steps: int = Field(100, ge=0, description="Optimisation steps (0: fixed random-Hadamard rotation only).")
    batch_size: int = Field(4, ge=1)
    rotate_lr: float = Field(0.016, gt=0, description="Cayley Adam learning rate of the orthogonal transforms.")
    smooth_lr: float = Field(0.0018, gt=0, description="Adam learning rate of the log smoothing scales.")
    train_weight_quant: bool | None = Field(
        None, description="Fake-quantize weights while learning the transforms (unset: on for A16 settings, off "
        "otherwise, as the paper's scripts).")
    online_hadamard: bool | None = Field(
        None, description="A fixed Hadamard on every down_proj input (folded into W_down; applied at run time, so "
        "only this project's loader runs the checkpoint). Unset: on when activations are quantized (A < 16), off "
        "for weight-only settings, whose checkpoint is then a standard one (the learnt rotations are folded into "
        "the weights) that exports to every format.")
    init: Literal["hadamard", "klt"] = Field("hadamard", description="Init of R_res: random Hadamard, or KLT of "
                                             "the weights times a random Hadamard.")
    transforms: OSTTransforms = Field(default_factory=OSTTransforms)
    calibration: Calibration = Field(default_factory=Calibration)

    @model_validator(mode="after")
    def _online_hadamard(self) -> "OSTQuantConfig":
        if self.online_hadamard is None:
            self.online_hadamard = self.quant_setting().a_bits < 16
        return self


QuantMethod = Annotated[Union[RTNConfig, GPTQConfig, OSTQuantConfig], Field(discriminator="method")]


class QuantizeConfig(Strict):
    enabled: bool = True
    scheme: QuantMethod = Field(default_factory=RTNConfig)

    @model_validator(mode="before")
    @classmethod
    def _planned(cls, data: Any) -> Any:
        return _method_union(data, "scheme", "rtn", "quantize")


# KV-cache methods, keyed on ``method``. Defaults and ranges are those of ``llm_compress.kv.spec`` (torch-free), which
# validates every spec, here and when a cache is built; the stage writes the validated spec as kv_cache.json.


def _kv_default(method: str, key: str) -> Any:
    from llm_compress.kv.spec import DEFAULTS

    return DEFAULTS[method][key]


class KIVICache(Strict):
    """KIVI-style quantized KV: keys per channel, values per token, asymmetric, a full-precision recent window."""

    method: Literal["kivi"] = "kivi"
    bits: list[int] | list[list[int]] = Field(
        default_factory=lambda: list(_kv_default("kivi", "bits")),
        description="[key bits, value bits] for every layer, or one such pair per layer; each 2, 4, 8 or 16.")
    group_size: int = Field(_kv_default("kivi", "group_size"), description="Quantization group: tokens per key "
                            "group (per channel), channels per value group (per token); divides head_dim.")
    residual: int = Field(_kv_default("kivi", "residual"), description="Most recent tokens kept in full precision "
                          "(a multiple of group_size).")


class SinkWindowCache(Strict):
    """Baseline: keep the first `sinks` tokens and the last `window` tokens (StreamingLLM-style eviction)."""

    method: Literal["sink"] = "sink"
    sinks: int = Field(_kv_default("sink", "sinks"), description="Attention-sink tokens kept from the start.")
    window: int = Field(_kv_default("sink", "window"), description="Most recent tokens kept.")


class MiniCacheConfig(Strict):
    """MiniCache: adjacent layers from start_layer on share SLERP-merged KV directions, keep their own magnitudes."""

    method: Literal["minicache"] = "minicache"
    start_layer: int | None = Field(_kv_default("minicache", "start_layer"),
                                    description="First merged layer (unset: the middle of the model).")
    t: float = Field(_kv_default("minicache", "t"), description="SLERP interpolation between the pair's directions.")
    gamma: float = Field(_kv_default("minicache", "gamma"), description="Retention threshold on the relative "
                         "angular distance: tokens above it stay unmerged (0 retains every token).")
    bits: list[int] = Field(default_factory=lambda: list(_kv_default("minicache", "bits")),
                            description="[key bits, value bits] of KIVI under the merge ([4, 4]: MiniCache-4; "
                            "[16, 16]: no quantization).")
    group_size: int = Field(_kv_default("minicache", "group_size"), description="KIVI group size (bits < 16).")
    residual: int = Field(_kv_default("minicache", "residual"), description="KIVI full-precision window.")


class KVTunerConfig(Strict):
    """KVTuner: search one (key bits, value bits) KIVI pair per layer under an average-bit budget; the chosen
    per-layer KIVI cache is what kv_cache.json holds."""

    method: Literal["kvtuner"] = "kvtuner"
    candidates: list[str] = Field(default_factory=lambda: list(_kv_default("kvtuner", "candidates")),
                                  description="Per-layer choices, KV<bits> or K<bits>V<bits> (bits 2, 4, 8, 16).")
    budget: float = Field(_kv_default("kvtuner", "budget"), description="Most average bits allowed: mean over layers "
                          "of (key bits + value bits) / 2.")
    objective: Literal["kl", "ppl"] = Field(_kv_default("kvtuner", "objective"), description="Minimised on the "
                                            "calibration rows: KL to the full cache, or the perplexity ratio.")
    strategy: Literal["auto", "exact", "optuna"] = Field(_kv_default("kvtuner", "strategy"), description="exact: "
                                                         "measure every configuration; optuna: NSGA-II; auto: exact "
                                                         "when candidates ** layers <= max_exact.")
    trials: int = Field(_kv_default("kvtuner", "trials"), description="Configurations optuna measures.")
    max_exact: int = Field(_kv_default("kvtuner", "max_exact"), description="Largest space searched exactly (auto).")
    calib_rows: int = Field(_kv_default("kvtuner", "calib_rows"), description="Training rows the search scores on.")
    group_size: int = Field(_kv_default("kvtuner", "group_size"), description="KIVI group size.")
    residual: int = Field(_kv_default("kvtuner", "residual"), description="KIVI full-precision window.")


class KVMergerConfig(Strict):
    """KVMerger: runs of consecutive tokens with similar keys merge into one Gaussian-weighted K/V state each, down
    to a share of the tokens seen; the first `sinks` and last `window` tokens stay exact."""

    method: Literal["kvmerger"] = "kvmerger"
    budget: float = Field(_kv_default("kvmerger", "budget"), description="Share of the tokens seen the cache holds "
                          "after a compression, in (0, 1] (1: no merging).")
    threshold: float = Field(_kv_default("kvmerger", "threshold"), description="Cosine similarity of neighbouring "
                             "keys at or above which the two tokens may merge, in [-1, 1].")
    sinks: int = Field(_kv_default("kvmerger", "sinks"), description="First tokens never merged.")
    window: int = Field(_kv_default("kvmerger", "window"), description="Most recent tokens never merged.")
    interval: int = Field(_kv_default("kvmerger", "interval"), description="Tokens held over the budget before the "
                          "next compression (so most decode steps only append).")


KVMethod = Annotated[Union[KIVICache, SinkWindowCache, MiniCacheConfig, KVTunerConfig, KVMergerConfig],
                     Field(discriminator="method")]


class KVConfig(Strict):
    """KV-cache compression: the cache the model generates with (kv_cache.json next to it), measured on held-out
    rows against the full cache."""

    enabled: bool = False
    cache: KVMethod = Field(default_factory=KIVICache)
    eval_rows: int = Field(4, ge=1, description="Held-out rows the cache is measured on.")
    prefill: float = Field(0.5, gt=0, lt=1, description="Share of each row given as the prompt; the rest is scored "
                           "one decode step at a time through the cache.")

    @model_validator(mode="before")
    @classmethod
    def _planned(cls, data: Any) -> Any:
        return _method_union(data, "cache", "kivi", "kv")

    @model_validator(mode="after")
    def _spec(self) -> "KVConfig":
        from llm_compress.kv.spec import normalize_spec

        try:
            normalize_spec(self.cache.model_dump())
        except CompressError as e:
            raise ValueError(f"cache: {e}") from None
        return self


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


UnlearnMethod = Annotated[Union[ShredConfig, KFadeConfig, GradientAscentConfig, GradientDifferenceConfig, NPOConfig],
                          Field(discriminator="method")]


class UnlearnConfig(Strict):
    """Unlearning: remove the forget set from the model before quantization, measured before and after; the
    evaluate stage measures the forget set again on the final (quantized, KV-cached) model."""

    enabled: bool = False
    method: UnlearnMethod = Field(default_factory=ShredConfig, description="The method and its parameters, keyed "
                                  "on method: a name alone ('shred') or a mapping such as {method: npo, beta: 0.1}.")
    forget: str = Field("embedded:facts-forget", description="Forget set: a JSONL file (see README, 'Unlearning'), "
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
    stage_ppl_ratio: dict[Literal["distill", "unlearn", "quantize"], Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Per model-changing stage: max perplexity of its output / "
        "perplexity of its input (e.g. quantize: 1.02).")
    max_forget_rouge: float | None = Field(None, ge=0, le=1, description="Unlearning: the final model's (quantized, "
                                           "with its KV cache) forget-set ROUGE-L at most this.")
    max_forget_regain: float | None = Field(None, ge=0, le=1, description="Unlearning: the final model's forget-set "
                                            "ROUGE-L at most this much above the unlearned model's (compression "
                                            "must not bring forgotten text back).")


ExportFormat = Literal["safetensors", "compressed-tensors", "bnb-nf4", "bnb-int8", "onnx", "onnx-int8", "onnx-int4"]


class ExportCheck(Strict):
    max_abs_diff: float | None = Field(None, ge=0, description="Max |logit difference| vs the source.")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="Share of positions whose argmax matches.")
    max_kl: float | None = Field(None, ge=0, description="Max mean KL(source || export) per position.")


# Formats that ship the quantize stage's own codes (compressed-tensors; ONNX int4/int8 of a model quantized at 4/8
# bits) must reproduce the quantized model: exactly up to float32 rounding, or up to the rounding of a bf16/fp16
# checkpoint (measured on the demo's W4 model: KL 3e-5, top-1 0.988 in bf16). A re-rounded export (another grid over
# the same weights: onnxruntime's RTN, bitsandbytes nf4, onnxruntime-genai's builder) measured KL 5e-4 to 2e-3 and
# top-1 0.93-0.97 there, so both defaults fail it (the 16-bit one on KL: bf16 near-ties flip top-1 on a random tiny
# model down to 0.977, so its top-1 floor is only a sanity bound). The exports also decode their codes from disk.
FROM_CODES_CHECK = ExportCheck(max_abs_diff=1e-3, min_top1_agreement=0.999, max_kl=1e-6)
FROM_CODES_CHECK_16BIT = ExportCheck(min_top1_agreement=0.95, max_kl=2e-4)


def _default_checks() -> dict[str, ExportCheck]:
    return {
        "safetensors": ExportCheck(max_abs_diff=1e-4, min_top1_agreement=0.99),
        "onnx": ExportCheck(max_abs_diff=1e-2, min_top1_agreement=0.99),
        "bnb-int8": ExportCheck(min_top1_agreement=0.80),
        "bnb-nf4": ExportCheck(min_top1_agreement=0.50),
        # a model without the quantize stage's codes: onnxruntime quantizes it afresh (a new model, loose limits);
        # with codes (see export.run_export) FROM_CODES_CHECK applies unless the recipe sets a check
        "onnx-int8": ExportCheck(min_top1_agreement=0.80),
        "onnx-int4": ExportCheck(min_top1_agreement=0.50),
    }


class ExportConfig(Strict):
    enabled: bool = True
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["safetensors", "bnb-nf4", "bnb-int8", "onnx"],
        description="compressed-tensors and onnx-int4/-int8 ship the quantize stage's own codes (W4/W8 for ONNX); "
        "bnb-* re-quantize the weights on bitsandbytes' grids.")
    checks: dict[ExportFormat, ExportCheck] = Field(
        default_factory=dict,
        description="Per format: how close the reloaded export's logits must be to the source's (unset: the "
        "format's default; see check_for).")
    check_batch_size: int = Field(16, ge=1, description="Held-out rows the export checks run (eval rows).")
    check_seq_len: int = Field(256, ge=2, description="Tokens per check row (at most the eval rows' length).")

    def check_for(self, fmt: str, from_codes: bool = False, float32: bool = True) -> ExportCheck:
        """The recipe's check of ``fmt``, else its default: for a format built from codes FROM_CODES_CHECK, or
        FROM_CODES_CHECK_16BIT when it computes in bf16/fp16 (``float32`` false)."""
        if fmt in self.checks:
            return self.checks[fmt]
        if from_codes:
            return FROM_CODES_CHECK if float32 else FROM_CODES_CHECK_16BIT
        return _default_checks().get(fmt, ExportCheck())


class ExecutorConfig(Strict):
    """Where sharded work (DSIR's shards) runs: this machine's processes, or a Dask or Ray cluster."""

    kind: Literal["local", "dask", "ray"] = Field(
        "local", description="local: a process pool here (select.dsir.processes); dask / ray: a cluster (the "
        "project's dask / ray extra), given by address or started here with `workers` processes.")
    address: str | None = Field(None, description="dask: the scheduler (tcp://host:8786); ray: the cluster "
                                "(ray://host:10001, or auto). Unset: a local cluster of `workers`.")
    workers: int = Field(2, ge=1, description="Worker processes of a local Dask / Ray cluster.")
    retries: int = Field(1, ge=0, le=10, description="Times a failed shard is retried on the cluster.")


class DistributedConfig(Strict):
    """Data-parallel distillation: processes on this node (and more nodes), launched with torchrun by the stage."""

    processes: int = Field(1, ge=1, description="Processes per node that distill together (DDP): one per GPU on "
                           "CUDA, or CPU processes (gloo). Each takes distill.batch_size / (processes x nodes) rows "
                           "of every batch; 1: one process, no torch.distributed.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every process holds the whole student (DistributedDataParallel); fsdp: the "
        "student's weights, gradients and optimiser state (and an online teacher's weights) are sharded over the "
        "processes (FSDP2 fully_shard, per decoder layer), for a student that does not fit one device.")
    nodes: int = Field(1, ge=1, description="Nodes taking part; this one is node 0. The others join with torchrun "
                       "(README, 'Scaling out') and must see the artifacts folder at the same path.")
    master_addr: str | None = Field(None, description="With nodes > 1: this node's address as the others reach it.")
    master_port: int = Field(29500, ge=1, le=65535, description="With nodes > 1: the port the others join on.")

    @model_validator(mode="after")
    def _master(self) -> "DistributedConfig":
        if self.nodes > 1 and not self.master_addr:
            raise ValueError("nodes > 1 needs master_addr: this node's address as the other nodes reach it")
        return self


class RuntimeConfig(Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (all cores if unset).")
    progress: bool = Field(True, description="Show progress bars.")
    retries: int = Field(1, ge=0, le=10, description="Prefect flow runs: times a stage is retried after a transient "
                         "error (I/O or network: OSError, e.g. a hub download); never after bad input, a missed gate, "
                         "a NaN loss, a failed export check, a missing file or a timeout.")
    retry_delay_s: float = Field(30.0, ge=0, description="Seconds before a retry.")
    gpu_slot: str | None = Field(None, description="Prefect flow runs: the global concurrency limit (e.g. "
                                 "'gpu:node-a') of which every stage running on CUDA holds one slot, so two runs never "
                                 "share a GPU by accident; create it first (prefect gcl create gpu:node-a --limit 1). "
                                 "Unset: no limit.")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig,
                                     description="Where sharded work runs (data selection's shards).")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="Data-parallel distillation over processes and nodes.")
    timeouts: dict[str, float] = Field(default_factory=dict, description="Prefect flow runs: wall-clock limit in "
                                       "seconds per stage name, e.g. {distill: 36000}; a stage not named has none.")

    @field_validator("timeouts")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if not t > 0}
        if bad:
            raise ValueError(f"timeouts must be positive seconds, got {bad}")
        return v


class Recipe(Strict):
    """A whole pipeline run. Every section is optional; defaults make the embedded demo."""

    name: str = Field("recipe", description="Recipe name; the default run name starts with it.")
    description: str = ""
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    kv: KVConfig = Field(default_factory=KVConfig)
    unlearn: UnlearnConfig = Field(default_factory=UnlearnConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_run_name(v)
        return v

    @model_validator(mode="after")
    def _consistency(self) -> "Recipe":
        if self.models.student == "derive" and not self.distill.enabled:
            raise ValueError("models.student is 'derive' but distill.enabled is false: a derived "
                             "student must be distilled (or give a student checkpoint)")
        if self.evaluate.enabled is False and any(v for v in self.gates.model_dump().values()):
            raise ValueError("gates are set but evaluate.enabled is false")
        forget_gates = [g for g in ("max_forget_rouge", "max_forget_regain") if getattr(self.gates, g) is not None]
        if forget_gates and not self.unlearn.enabled:
            raise ValueError(f"gates {forget_gates} judge unlearning but unlearn.enabled is false")
        u = self.unlearn
        if u.enabled and self.models.teacher != "embedded" and any(
                (p or "").startswith("embedded:") for p in (u.forget, u.keep, u.holdout)):
            raise ValueError("unlearn: the embedded:facts-* sets are planted in the embedded teacher only; give "
                             "forget (and keep/holdout, or null) as JSONL files for models.teacher "
                             f"'{self.models.teacher}'")
        q = self.quantize.scheme
        qs = q.quant_setting()
        runtime_parts = qs.a_bits < 16 or qs.kv_bits < 16 or (q.method == "ostquant" and q.online_hadamard)
        others = [f for f in self.export.formats if f != "safetensors"]
        if self.quantize.enabled and self.export.enabled and runtime_parts and others:
            online = ", online_hadamard" if q.method == "ostquant" and q.online_hadamard else ""
            raise ValueError(f"export.formats {others} load weights only, but quantize.scheme ({q.method}, "
                             f"{q.setting}{online}) "
                             "needs run-time parts (activation/KV fake quantization, online Hadamard) that only "
                             "safetensors exports keep; export [safetensors] or use a W*A16 setting "
                             "(and online_hadamard: false)")
        if self.export.enabled:
            self._packed_exports(qs)
        op = self.distill.on_policy
        if self.distill.enabled and op.share > 0 and op.prompt_tokens >= self.data.seq_len - 1:
            raise ValueError(f"distill.on_policy.prompt_tokens ({op.prompt_tokens}) must be below data.seq_len - 1 "
                             f"({self.data.seq_len - 1}): the student needs room to sample")
        d = self.runtime.distributed
        world = d.processes * d.nodes
        if self.distill.enabled and self.distill.batch_size % world:
            raise ValueError(f"distill.batch_size ({self.distill.batch_size}) must be a multiple of the "
                             f"runtime.distributed processes x nodes ({world}): each process takes an equal share "
                             "of every batch")
        if self.distill.enabled and world > 1 and d.strategy == "fsdp" and self.distill.on_policy.share > 0:
            raise ValueError("distill.on_policy samples from the student outside its sharded forward, which "
                             "runtime.distributed.strategy fsdp does not allow; use strategy ddp or on_policy.share 0")
        if self.distill.enabled and world > 1 and self.distill.divergence.name == "sinkhorn":
            raise ValueError("sinkhorn's loss couples all the tokens of a batch, so it cannot be split over "
                             "runtime.distributed processes; use processes: 1 or a token-wise divergence")
        return self

    def _packed_exports(self, qs) -> None:
        """The formats that ship the quantize stage's codes need them, at a bit width they can hold."""
        formats, q = self.export.formats, self.quantize
        if "compressed-tensors" in formats and not q.enabled:
            raise ValueError("export.formats: compressed-tensors packs the quantize stage's integer codes, but "
                             "quantize.enabled is false; enable quantize (e.g. gptq at W4A16) or drop the format")
        if not q.enabled:
            return  # onnx-int4/-int8 then quantize the float model afresh with onnxruntime's quantizers
        for fmt, bits in (("onnx-int4", 4), ("onnx-int8", 8)):
            if fmt in formats and qs.w_bits != bits:
                raise ValueError(f"export.formats: {fmt} ships the quantize stage's codes, which are "
                                 f"{qs.w_bits}-bit ({q.scheme.setting}); re-rounding them onto a {bits}-bit grid "
                                 f"would ship another model: use a W{bits} setting or drop {fmt}")
            if fmt in formats and q.scheme.group_size is not None and q.scheme.group_size < 16:
                raise ValueError(f"export.formats: {fmt} (MatMulNBits) needs weight groups of at least 16 input "
                                 f"columns; quantize.scheme.group_size is {q.scheme.group_size}")

    @property
    def uses_embedded(self) -> bool:
        sel = self.select.enabled and any(r.split(":")[0] == "embedded" for r in self.select.references())
        return self.models.teacher == "embedded" or self.data.source == "embedded" or sel


# --------------------------------------------------------------------------------------------
# loading


def default_run_name(recipe: "Recipe") -> str:
    """<recipe name>-<first 8 hex of the recipe's hash>: the run folder when none is given."""
    from llm_compress.io import stable_hash

    return f"{recipe.name}-{stable_hash(recipe.model_dump(mode='json'))[:8]}"


def check_run_name(name: str) -> str:
    if not RUN_NAME_RE.match(name) or ".." in name:
        raise ValueError(f"'{name}' is not a safe name: use letters, digits, '.', '_' and '-' "
                         "(no '/', no '..', at most 100 characters)")
    return name


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else ""
            msg = f"unknown field{(' in ' + parent) if parent else ''}; allowed: {', '.join(_fields_at(parent))}"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {loc or '<recipe>'}: {msg}{shown}")
    return "\n".join(lines)


def _fields_at(dotted: str) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in filter(None, dotted.split(".")):
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to the raw recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise RecipeError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: invalid recipe:\n{_format_errors(e)}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe; any problem is a RecipeError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data or {}, overrides or [])
    return parse_recipe(data, str(path))
