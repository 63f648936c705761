"""KV-cache specs: validation (through the method models of :mod:`llm_compress.kv.config`, the one definition of
every method's parameters) and the checks against a model, in plain Python (no torch), so a recipe or a
``kv_cache.json`` can be checked without importing torch. The spec format is documented in ``llm_compress.kv``'s module
docstring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llm_compress.errors import InputError
from llm_compress.kv.config import KV_METHODS, average_bits, parse_pair  # noqa: F401 (average_bits: re-exported)
from llm_compress.quantize.setting import NO_QUANT_BITS

KV_CACHE_JSON = "kv_cache.json"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Keys any spec may carry besides its method's parameters: ``search`` holds what a search (KVTuner) found, kept in
# kv_cache.json for the record; building the cache ignores it. ``factors`` (CSKV): {"file", "fingerprint"} of the
# bases fitted for one model, the file next to kv_cache.json (``read_spec`` adds its "path").
METADATA_KEYS = ("search", "factors")
# Methods that hold fewer rows than tokens seen and report it through get_mask_sizes (eager/SDPA attention only).
EVICTING = {"sink": "the sink cache", "kvmerger": "the KVMerger cache"}


def _explain(err: dict) -> str:
    """One pydantic error as a line: the models' own messages name the field; pydantic's get the field's name."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error" and err["loc"]:
        msg = f"{'.'.join(map(str, err['loc']))}: {msg}"
    got = err.get("input")
    return msg if isinstance(got, dict) else f"{msg}, got {got!r}"


def check_params(method: str, params: dict) -> dict:
    """``params`` of a registered ``method`` with its defaults filled, validated by its model: the normalized spec
    (``method`` first, then the parameters in the model's order). InputError naming the parameter and the cause."""
    try:
        return KV_METHODS[method].model.model_validate({**params, "method": method}).model_dump()
    except ValidationError as e:
        raise InputError(f"KV-cache {method}: {'; '.join(_explain(err) for err in e.errors())}") from None


def normalize_spec(spec: dict) -> dict:
    """The spec with defaults filled and bits as lists; InputError for an unknown method or key, or a bad value.

    Checks what does not depend on the model; ``check_against_model`` checks the rest.
    """
    if not isinstance(spec, dict):
        raise InputError(f"a KV-cache spec must be a dict (JSON object), got {type(spec).__name__}")
    method = spec.get("method")
    if not isinstance(method, str) or method not in KV_METHODS:
        raise InputError(f"unknown KV-cache method {method!r}; known: {', '.join(KV_METHODS)}")
    known = [k for k in KV_METHODS[method].model.model_fields if k != "method"]
    unknown = sorted(set(spec) - set(known) - {"method", *METADATA_KEYS})
    if unknown:
        raise InputError(f"unknown {method} parameter(s) {unknown}; known: {sorted(known)}")
    if "search" in spec and not isinstance(spec["search"], dict):
        raise InputError(f"a spec's 'search' record must be a dict, got {type(spec['search']).__name__}")
    factors = spec.get("factors", {"file": None, "fingerprint": None})
    if not (isinstance(factors, dict) and {"file", "fingerprint"} <= set(factors)):
        raise InputError("a spec's 'factors' record must be a dict with 'file' and 'fingerprint'")
    out = check_params(method, {k: v for k, v in spec.items() if k in known})
    return {**out, **{k: spec[k] for k in METADATA_KEYS if k in spec}}


def check_kivi_head_dim(k_bits: int, v_bits: int, group_size: int, head_dim: int) -> None:
    """Raise InputError naming the cause if KIVI settings (valid on their own) cannot run on heads of ``head_dim``."""
    if v_bits < NO_QUANT_BITS and head_dim % group_size:
        raise InputError(f"KIVI group size {group_size} does not divide head_dim {head_dim} (values are grouped "
                         "along head_dim)")
    for b in (k_bits, v_bits):
        if b < NO_QUANT_BITS and head_dim * b % 8:
            raise InputError(f"head_dim {head_dim} at {b} bits does not pack into whole bytes")


def check_minicache_head_dim(bits: Any, group_size: int, head_dim: int) -> None:
    """Raise InputError if MiniCache over KIVI (bits < 16) cannot code layer s+1's retained states, which are coded
    per token in groups of ``group_size`` along head_dim, keys too (``check_kivi_head_dim`` checks the rest)."""
    if min(bits) < NO_QUANT_BITS and head_dim % group_size:
        raise InputError(f"MiniCache group size {group_size} does not divide head_dim {head_dim} (retained keys and "
                         "values are coded per token, in groups along head_dim)")


def check_minicache_depth(start_layer: int, num_layers: int) -> None:
    """Raise InputError naming the cause if MiniCache cannot start merging at ``start_layer`` of ``num_layers``."""
    if start_layer >= num_layers:
        raise InputError(f"MiniCache start layer {start_layer} is beyond the model's depth ({num_layers} layers, "
                         f"0..{num_layers - 1})")
    if start_layer + 1 >= num_layers:
        raise InputError(f"MiniCache start layer {start_layer} leaves no layer pair to merge in a {num_layers}-layer "
                         "model")


def prompt_length(tokens: int, share: float) -> int:
    """The prompt of a ``tokens``-long row given as the share ``share`` (``kv.prefill``), at least one token: what
    the KV stage, KVTuner's calibration and evaluate's KV figures all split rows with."""
    return max(1, int(tokens * share))


def per_layer_bits(bits: list, num_layers: int) -> list[list[int]]:
    """One [k_bits, v_bits] pair per layer, from a validated ``bits`` (one pair for all layers, or one per layer)."""
    if not isinstance(bits[0], list):  # one pair for every layer
        return [bits] * num_layers
    if len(bits) != num_layers:
        raise InputError(f"{len(bits)} per-layer [k_bits, v_bits] pairs for a {num_layers}-layer model")
    return bits


def kv_dims(model: Any) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a model or config: the shape of its KV cache per token."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers), int(kv_heads), int(head_dim)


def model_geometry(model: Any) -> tuple[int, int]:
    """(num_layers, head_dim) of a supported model or config; InputError naming an unsupported type or layout."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"model type {model_type!r} is not supported by the KV caches (supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}: the Llama attention layout)")
    num_layers, kv_heads, head_dim = kv_dims(config)
    if config.num_attention_heads % kv_heads:
        raise InputError(f"{model_type} attention layout not supported: {config.num_attention_heads} query heads are "
                         f"not a multiple of {kv_heads} key/value heads")
    return num_layers, head_dim


def cskv_ranks(spec: dict, model: Any) -> tuple[int, int]:
    """(k_rank, v_rank) of a normalized CSKV spec for a model or config: the rank if set, else round(ratio x d), at
    least 1, d = kv_heads x head_dim (a layer's key channels); InputError naming the field if a rank exceeds d."""
    model_geometry(model)  # a supported layout
    _, kv_heads, head_dim = kv_dims(model)
    d = kv_heads * head_dim
    ranks = []
    for which in ("k", "v"):
        rank = spec[f"{which}_rank"]
        if rank is not None and rank > d:
            raise InputError(f"CSKV {which}_rank {rank} exceeds the model's {d} key/value channels per layer "
                             "(kv_heads x head_dim)")
        ranks.append(rank if rank is not None else max(1, round(spec[f"{which}_ratio"] * d)))
    return ranks[0], ranks[1]


def check_against_model(spec: dict, model: Any) -> tuple[int, int]:
    """Check a normalized spec against a model or config; returns (num_layers, head_dim). A CSKV spec whose factors
    were fitted for other weights is refused for a model (not for a bare config, whose weights are unknown)."""
    num_layers, head_dim = model_geometry(model)
    if spec["method"] == "cskv":
        cskv_ranks(spec, model)
        if "factors" in spec and hasattr(model, "named_parameters"):
            from llm_compress.kv.fingerprint import fingerprint

            if fingerprint(model) != spec["factors"]["fingerprint"]:
                raise InputError(f"the CSKV factors {spec['factors']['file']} were fitted for another model (their "
                                 "k/v projection fingerprint differs from this model's)")
        return num_layers, head_dim
    if spec["method"] in EVICTING:
        attn = getattr(getattr(model, "config", model), "_attn_implementation", None)
        if attn not in (None, "eager", "sdpa"):
            raise InputError(f"{EVICTING[spec['method']]} needs eager or sdpa attention (it holds fewer tokens than "
                             f"it has seen, and only those attention paths take the mask sizes it reports), the "
                             f"model uses {attn!r}")
        return num_layers, head_dim
    pairs = [parse_pair(c) for c in spec["candidates"]] if spec["method"] == "kvtuner" else \
        per_layer_bits(spec["bits"], num_layers)
    for kb, vb in pairs:
        check_kivi_head_dim(kb, vb, spec["group_size"], head_dim)
    if spec["method"] == "minicache":
        check_minicache_depth(num_layers // 2 if spec["start_layer"] is None else spec["start_layer"], num_layers)
        check_minicache_head_dim(spec["bits"], spec["group_size"], head_dim)
    return num_layers, head_dim


def read_spec(path: str | Path) -> dict:
    """The spec in a JSON file (or a folder's ``kv_cache.json``), normalized."""
    path = Path(path)
    if path.is_dir():
        path = path / KV_CACHE_JSON
    if not path.is_file():
        raise InputError(f"no KV-cache spec at {path}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the KV-cache spec {path}: {e}") from None
    spec = normalize_spec(raw)
    if "factors" in spec:  # the file named next to the spec
        spec["factors"] = {**spec["factors"], "path": str(path.parent / spec["factors"]["file"])}
    return spec
