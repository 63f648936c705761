"""The ``kv`` recipe section: one model per KV-cache method, keyed on ``method``. Torch-free."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from llm_compress.errors import CompressError
from llm_compress.schema import Strict, with_default_method


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
    def _default_method(cls, data: Any) -> Any:
        return with_default_method(data, "cache", "kivi")

    @model_validator(mode="after")
    def _spec(self) -> "KVConfig":
        from llm_compress.kv.spec import normalize_spec

        try:
            normalize_spec(self.cache.model_dump())
        except CompressError as e:
            raise ValueError(f"cache: {e}") from None
        return self

