"""The ``kv`` recipe section, and the one definition of every KV-cache method: one pydantic model per method (its
parameters, defaults, ranges and descriptions, keyed on ``method``) and the cache class that runs it, in
``KV_METHODS``. Torch-free: :func:`llm_compress.kv.spec.normalize_spec` validates ``kv_cache.json`` specs and the
caches' own arguments through these same models, and :func:`llm_compress.kv.build_cache` builds the class the
registry names."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from llm_compress.errors import InputError
from llm_compress.quantize.setting import NO_QUANT_BITS
from llm_compress.schema import Strict, registry, union, with_default_method

KIVI_BITS = (2, 4, 8, NO_QUANT_BITS)  # packable code widths, and 16 = that tensor stays in full precision


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# Field types that check their value before pydantic converts it (so True, 2.5 or "8" are refused, not coerced) and
# name the field and its range in the error; the range is also the schema's (recipe reference, Prefect form).
def _integer(low: int) -> Any:
    """An integer >= ``low``."""
    def check(v: Any, info: ValidationInfo) -> Any:
        if not _is_int(v) or v < low:
            raise ValueError(f"{info.field_name} must be an integer >= {low}")
        return v

    return Annotated[int, Field(ge=low), BeforeValidator(check)]


def _number(low: float, high: float | None = None, *, open_low: bool = False) -> Any:
    """A number >= ``low`` (> with ``open_low``), and <= ``high`` if given."""
    rule = (f"must lie in {'(' if open_low else '['}{low}, {high}]" if high is not None
            else f"must be {'>' if open_low else '>='} {low}")

    def check(v: Any, info: ValidationInfo) -> Any:
        if not _is_number(v) or not (v > low if open_low else v >= low) or (high is not None and v > high):
            raise ValueError(f"{info.field_name} {rule}")
        return v

    bounds = {"gt" if open_low else "ge": low, **({} if high is None else {"le": high})}
    return Annotated[float, Field(**bounds), BeforeValidator(check)]


def _bits(per_layer: bool) -> Any:
    """[k_bits, v_bits] (a list or tuple of two integers), or with ``per_layer`` also one such pair per layer; as
    lists of ints. The values are KIVI's to check (``check_kivi``), with the group size."""
    shape = "a [k_bits, v_bits] pair or a list of one pair per layer" if per_layer else "a [k_bits, v_bits] pair"

    def pair(p: Any) -> list[int] | None:
        return [p[0], p[1]] if isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_is_int, p)) else None

    def check(v: Any) -> list:
        if pair(v) is not None:
            return pair(v)
        if per_layer and isinstance(v, (list, tuple)) and v and all(pair(p) is not None for p in v):
            return [pair(p) for p in v]
        raise ValueError(f"bits must be {shape}")

    return Annotated[list[int] | list[list[int]] if per_layer else list[int], BeforeValidator(check)]


def bit_pairs(bits: list) -> list[list[int]]:
    """The (k_bits, v_bits) pairs of a validated ``bits``: the one pair, or one per layer."""
    return [bits] if _is_int(bits[0]) else bits


def check_kivi(k_bits: int, v_bits: int, group_size: int, residual: int) -> None:
    """Raise ValueError naming the cause if KIVI cannot run these settings whatever the model (group_size and residual
    already positive); ``llm_compress.kv.spec.check_kivi_head_dim`` checks them against the heads."""
    for what, b in (("key", k_bits), ("value", v_bits)):
        if b not in KIVI_BITS:
            raise ValueError(f"KIVI {what} bits must be one of {KIVI_BITS} (16 = not quantized), got {b!r}")
    if residual % group_size:
        raise ValueError(f"KIVI residual must be a positive multiple of the group size {group_size} (key blocks of "
                         f"the residual length are split into groups of group_size tokens), got {residual!r}")


def parse_pair(name: Any) -> tuple[int, int]:
    """(key bits, value bits) of a KVTuner candidate name: ``KV4`` = (4, 4), ``K8V4`` = (8, 4)."""
    m = re.fullmatch(r"KV(\d+)|K(\d+)V(\d+)", name) if isinstance(name, str) else None
    if m is None:
        raise InputError(f"KVTuner candidate {name!r} is not of the form KV<bits> or K<bits>V<bits> (e.g. KV4, K8V4)")
    return (int(m[1]), int(m[1])) if m[1] else (int(m[2]), int(m[3]))


# KVTuner's candidate pairs in KIVI mode (cmd2001/KVTuner search_optuna_adaptive.py, 'per-channel-asym'): the
# standard list KV8, K8V4, KV4, K4V2, KV2 and the per-group lists that swap in value-heavier K4V8 and K2V4; this is
# their union, so a search finds whether keys or values need the bits rather than being told.
AUTHORS_CANDIDATES = ("KV8", "K8V4", "K4V8", "KV4", "K4V2", "K2V4", "KV2")


def average_bits(pairs: list) -> float:
    """KVTuner's budget measure: the mean over layers of (key bits + value bits) / 2 (codes only, no scales)."""
    return sum(k + v for k, v in pairs) / (2 * len(pairs))


class KIVIConfig(Strict):
    """KIVI-style quantized KV: keys per channel, values per token, asymmetric, a full-precision recent window."""

    method: Literal["kivi"] = "kivi"
    bits: _bits(per_layer=True) = Field(
        default_factory=lambda: [4, 4],
        description="[key bits, value bits] for every layer, or one such pair per layer; each 2, 4, 8 or 16.")
    group_size: _integer(1) = Field(32, description="Quantization group: tokens per key group (per channel), "
                                    "channels per value group (per token); divides head_dim.")
    residual: _integer(1) = Field(128, description="Most recent tokens kept in full precision (a multiple of "
                                  "group_size).")

    @model_validator(mode="after")
    def _kivi(self) -> "KIVIConfig":
        for k_bits, v_bits in bit_pairs(self.bits):
            check_kivi(k_bits, v_bits, self.group_size, self.residual)
        return self


class SinkConfig(Strict):
    """Baseline: keep the first `sinks` tokens and the last `window` tokens (StreamingLLM-style eviction)."""

    method: Literal["sink"] = "sink"
    sinks: _integer(0) = Field(4, description="Attention-sink tokens kept from the start.")
    window: _integer(1) = Field(1020, description="Most recent tokens kept.")


class MiniCacheConfig(Strict):
    """MiniCache: adjacent layers from start_layer on share SLERP-merged KV directions, keep their own magnitudes."""

    method: Literal["minicache"] = "minicache"
    start_layer: _integer(0) | None = Field(None, description="First merged layer (unset: the middle of the model).")
    t: _number(0, 1) = Field(0.6, description="SLERP interpolation from the first layer's direction toward the "
                             "second's (the paper's 0.6).")
    gamma: _number(0, 1) = Field(0.05, description="Retention threshold: per layer pair, head and K/V, the tokens in "
                                 "the top gamma of the angular-distance range stay unmerged (the paper's 0.05; 1 "
                                 "retains every token).")
    max_distance: _number(0, 1) = Field(0.5, description="Token pairs farther apart than this normalized angular "
                                        "distance always stay unmerged (0.5: more than 90 degrees; 1: never, the "
                                        "paper's rule alone).")
    bits: _bits(per_layer=False) = Field(
        default_factory=lambda: [16, 16],
        description="[key bits, value bits] of KIVI under the merge ([4, 4]: MiniCache-4; [16, 16]: no quantization).")
    group_size: _integer(1) = Field(32, description="KIVI group size (bits < 16).")
    residual: _integer(1) = Field(128, description="KIVI full-precision window.")

    @model_validator(mode="after")
    def _kivi(self) -> "MiniCacheConfig":
        check_kivi(*self.bits, self.group_size, self.residual)
        return self


class KVTunerConfig(Strict):
    """KVTuner: search one (key bits, value bits) KIVI pair per layer under an average-bit budget; the chosen
    per-layer KIVI cache is what kv_cache.json holds."""

    method: Literal["kvtuner"] = "kvtuner"
    candidates: list[str] = Field(default_factory=lambda: list(AUTHORS_CANDIDATES),
                                  description="Per-layer choices, KV<bits> or K<bits>V<bits> (bits 2, 4, 8, 16); "
                                  "the default is every pair of the authors' KIVI-mode lists, value-heavier ones too.")
    budget: _number(0, open_low=True) = Field(4.0, description="Most average bits allowed: mean over layers of "
                                              "(key bits + value bits) / 2.")
    objective: Literal["kl", "ppl"] = Field("kl", description="Minimised on the calibration rows: KL to the full "
                                            "cache, or the perplexity ratio.")
    strategy: Literal["auto", "exact", "optuna"] = Field("auto", description="exact: measure every configuration; "
                                                         "optuna: NSGA-II; auto: exact when candidates ** layers <= "
                                                         "max_exact.")
    trials: _integer(1) = Field(60, description="Configurations optuna measures.")
    max_exact: _integer(1) = Field(256, description="Largest space searched exactly (auto).")
    calib_rows: _integer(1) = Field(4, description="Training rows the search scores on.")
    groups: _integer(1) = Field(6, description="Layers are clustered by their measured sensitivity into this many "
                                "groups (at most one per layer) and the search picks one pair per group (the "
                                "authors' KIVI-mode groupings have 5 to 8; 6 for Llama-3.1-8B).")
    prune: bool = Field(True, strict=True, description="Drop, per group, the candidates another one beats on both "
                        "bits and measured sensitivity before the search (the authors' intra-layer pruning).")
    force_quant: bool = Field(True, strict=True, description="Calibration passes attend to the states as the cache "
                              "holds them, the prompt's own included (the authors' force_quant); false: each pass "
                              "attends exactly to its own tokens, which hides prompt damage.")
    group_size: _integer(1) = Field(32, description="KIVI group size.")
    residual: _integer(1) = Field(128, description="KIVI full-precision window.")

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("KVTuner candidates must be a non-empty list of distinct names")
        return v

    @model_validator(mode="after")
    def _search(self) -> "KVTunerConfig":
        try:
            pairs = [parse_pair(c) for c in self.candidates]
        except InputError as e:
            raise ValueError(str(e)) from None
        for k_bits, v_bits in pairs:
            check_kivi(k_bits, v_bits, self.group_size, self.residual)
        cheapest = min(pairs, key=lambda p: p[0] + p[1])
        if average_bits([cheapest]) > self.budget:
            raise ValueError(f"KVTuner budget {self.budget} bits is below the cheapest candidate (K{cheapest[0]}"
                             f"V{cheapest[1]}, {average_bits([cheapest])} bits): no configuration meets it")
        return self


class KVMergerConfig(Strict):
    """KVMerger (Wang et al. 2024): runs of consecutive tokens whose keys are alike (cosine to the run's latest key
    above `threshold`) merge into one Gaussian-kernel-weighted K/V state around their most attended member; how
    much merges varies per layer and head. The first `sinks` and last `window` tokens stay exact."""

    method: Literal["kvmerger"] = "kvmerger"
    threshold: _number(-1, 1) = Field(0.75, description="Cosine similarity to a merging set's latest key above which "
                                      "an earlier neighbour joins the set (the paper's 0.75; 1: no merging).")
    budget: _number(0, 1, open_low=True) | None = Field(
        None, description="Least share of each row's tokens every head keeps, a cap on merging (a head whose sets "
        "would hold fewer merges only its most similar neighbours; 1: no merging); unset: the threshold alone decides.")
    pivot: Literal["attention", "mean_key"] = Field("attention", description="The member a set merges around: the "
                                                    "one with the most accumulated attention (the paper), or the one "
                                                    "closest to the set's mean key.")
    observe: _integer(1) = Field(32, description="Last prompt queries whose attention is accumulated per token for "
                                 "the pivot (every later query adds its own).")
    sinks: _integer(0) = Field(4, description="First tokens never merged.")
    window: _integer(1) = Field(32, description="Most recent tokens never merged.")
    interval: _integer(1) = Field(32, description="Tokens added after which the cache merges again (it merges the "
                                  "prompt once, then every `interval` tokens).")


class CSKVConfig(Strict):
    """CSKV (Wang et al. 2024): tokens older than an exact window are stored as low-rank features of their pre-RoPE
    keys and of their values (bases fitted per layer on training rows, all KV heads together), rebuilt and re-rotated
    when read; the bases are written next to kv_cache.json (cskv_factors.safetensors) for that model only."""

    method: Literal["cskv"] = "cskv"
    k_rank: _integer(1) | None = Field(None, description="Key channels kept per layer, over all KV heads (at most "
                                       "kv_heads x head_dim); unset: k_ratio of them.")
    v_rank: _integer(1) | None = Field(None, description="Value channels kept per layer (at most kv_heads x "
                                       "head_dim); unset: v_ratio of them.")
    k_ratio: _number(0, 1, open_low=True) = Field(0.5, description="Share of the key channels kept when k_rank is "
                                                  "unset (rounded, at least 1).")
    v_ratio: _number(0, 1, open_low=True) = Field(0.5, description="Share of the value channels kept when v_rank is "
                                                  "unset (rounded, at least 1).")
    window: _integer(0) = Field(32, description="Most recent tokens kept exact (the paper's sliding window, 32).")
    init: Literal["pca", "svd", "asvd"] = Field("pca", description="Bases: pca of the calibration keys/values (the "
                                                "minimiser of the paper's reconstruction loss), svd of W_k/W_v "
                                                "(weights only), or asvd (activation-scaled SVD, CSKV's init).")
    calib_rows: _integer(1) = Field(16, description="Training rows the bases are fitted on (pca, asvd).")


# The KV-cache methods: name -> (parameters, the cache class that runs them; kvtuner is a search, whose result is a
# per-layer kivi spec). Adding a method: its model above, its cache class in a module of this package, a line here.
KV_METHODS = registry(
    "method",
    (KIVIConfig, "llm_compress.kv.kivi:KIVICache"),
    (SinkConfig, "llm_compress.kv.sink:SinkCache"),
    (MiniCacheConfig, "llm_compress.kv.minicache:MiniCache"),
    (KVTunerConfig, None),
    (KVMergerConfig, "llm_compress.kv.kvmerger:KVMergerCache"),
    (CSKVConfig, "llm_compress.kv.cskv:CSKVCache"),
)
KVMethod = union((m.model for m in KV_METHODS.values()), "method")


class KVConfig(Strict):
    """KV-cache compression: the cache the model generates with (kv_cache.json next to it), measured on held-out
    rows against the full cache."""

    enabled: bool = False
    cache: KVMethod = Field(default_factory=KIVIConfig)
    eval_rows: int = Field(4, ge=1, description="Held-out rows the cache is measured on.")
    prefill: float = Field(0.5, gt=0, lt=1, description="Share of each row given as the prompt; the rest is scored "
                           "one decode step at a time through the cache.")

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any) -> Any:
        return with_default_method(data, "cache", "kivi")
