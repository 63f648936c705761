"""DSIR settings: the pydantic models a recipe embeds (pydantic and the standard library only, so a recipe can be
validated without importing numpy or the selection code)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm_compress.schema import Strict


class TargetSpec(BaseModel):
    """One target distribution: one or more inputs, with an optional share of k."""

    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, description="Files, folders or saved-dataset folders of this target.")
    proportion: float | None = Field(None, gt=0, description="Share of k for this target (normalised over targets).")
    name: str | None = Field(None, description="Label in metrics; defaults to the first path's stem.")


class DSIRConfig(BaseModel):
    """DSIR data selection settings (Xie et al. 2023). Defaults follow the reference package where it has one."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(ge=1, description="Number of raw documents to select.")
    num_buckets: int = Field(10_000, ge=2, le=2**31 - 1, description="Hash buckets of the n-gram features.")
    ngrams: int = Field(2, ge=1, le=5, description="Largest n-gram order: 2 means unigrams and bigrams.")
    laplace: float = Field(0.0, ge=0.0, description="Laplace pseudo-count added to every target bucket before "
                           "normalising (0: none, as in the reference package).")
    seed: int = Field(0, description="Seed of the Gumbel noise (selection is reproducible for a fixed seed).")
    deterministic: bool = Field(False, description="Take the k highest weights instead of Gumbel top-k sampling.")
    min_length: int = Field(100, ge=0, description="Minimum document length in word/punctuation tokens; shorter "
                            "documents are never selected (the reference package's min_example_length).")
    text_field: str = Field("text", min_length=1, description="Field holding the text in JSONL/Parquet/dataset rows.")
    target_proportions: list[float] | None = Field(
        None, description="Share of k per target, in the order targets are given (normalised). Default: each "
        "target's share of all target n-grams, as in the reference package.")
    pool_targets: bool = Field(False, description="Treat all target inputs as one target distribution.")
    raw_sample_docs: int | None = Field(None, ge=1, description="Fit the raw distribution on about this many raw "
                                        "documents, spread over the shards by size; None: the whole pool.")
    processes: int | None = Field(None, ge=1, description="Worker processes (spawned); 1: in-process; None: all "
                                  "usable cores, for inputs large enough to pay for starting them (in-process below "
                                  "32 MiB beside the largest shard).")
    shard_bytes: int = Field(64 << 20, ge=1, description="Bytes of input per shard (the unit of parallelism, caching "
                             "and resume).")
    max_doc_bytes: int = Field(4 << 20, ge=1, description="Longer documents/lines are skipped as 'oversized' "
                               "(bounds memory per document).")
    hash: Literal["fast", "dsir-compat"] = Field(
        "fast", description="'fast': vectorised 64-bit polynomial hash; 'dsir-compat': the reference package's "
        "sha256 buckets (same tokenizer), for weights that match it.")
    batch_chars: int = Field(1 << 18, ge=1, description="Characters featurized per vectorised batch (speed only).")
    keep_features_bytes: int = Field(
        64 << 20, ge=0, description="In-process runs: up to this many bytes of plain (not gzipped) JSONL/.txt raw "
        "input keep their n-gram features in memory from the fit to the weights pass, which then neither reads nor "
        "featurizes them again (about 4 bytes of memory per input byte; speed only). 0: read twice.")

    @model_validator(mode="after")
    def _proportions_positive(self) -> "DSIRConfig":
        if self.target_proportions is not None and (not self.target_proportions
                                                     or any(not p > 0 for p in self.target_proportions)):
            raise ValueError("target_proportions must be positive numbers, one per target")
        return self


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

