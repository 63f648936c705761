"""KV-cache specs: defaults, validation and the model check, in plain Python (no torch), so a recipe can be checked
without importing torch. The spec format is documented in ``llm_compress.kv``'s module docstring."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llm_compress.errors import InputError
from llm_compress.quantize.setting import NO_QUANT_BITS

KV_CACHE_JSON = "kv_cache.json"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
KIVI_BITS = (2, 4, 8, NO_QUANT_BITS)

DEFAULTS: dict[str, dict[str, Any]] = {
    "kivi": {"bits": [4, 4], "group_size": 32, "residual": 128},
    "sink": {"sinks": 4, "window": 1020},
    "minicache": {"start_layer": None, "t": 0.5, "gamma": 0.05, "bits": [16, 16], "group_size": 32,
                  "residual": 128},
    # A search, not a cache: llm_compress.kv.kvtuner turns it into a per-layer "kivi" spec (what is saved and loaded).
    "kvtuner": {"candidates": ["KV8", "K8V4", "KV4", "K4V2", "KV2"], "budget": 4.0, "objective": "kl",
                "strategy": "auto", "trials": 60, "max_exact": 256, "calib_rows": 4, "group_size": 32,
                "residual": 128},
    "kvmerger": {"budget": 0.5, "threshold": 0.8, "sinks": 4, "window": 32, "interval": 32},
}
# Keys any spec may carry besides its method's parameters: ``search`` holds what a search (KVTuner) found, kept in
# kv_cache.json for the record; building the cache ignores it.
METADATA_KEYS = ("search",)
KVTUNER_OBJECTIVES = ("kl", "ppl")
KVTUNER_STRATEGIES = ("auto", "exact", "optuna")
# Methods that hold fewer rows than tokens seen and report it through get_mask_sizes (eager/SDPA attention only).
EVICTING = {"sink": "the sink cache", "kvmerger": "the KVMerger cache"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_kivi_settings(k_bits: int, v_bits: int, group_size: int, residual: int, head_dim: int | None = None) -> None:
    """Raise InputError naming the cause if KIVI cannot run these settings (on heads of size ``head_dim``)."""
    for what, b in (("key", k_bits), ("value", v_bits)):
        if not _is_int(b) or b not in KIVI_BITS:
            raise InputError(f"KIVI {what} bits must be one of {KIVI_BITS} (16 = not quantized), got {b!r}")
    if not _is_int(group_size) or group_size <= 0:
        raise InputError(f"KIVI group size must be a positive integer, got {group_size!r}")
    if not _is_int(residual) or residual <= 0 or residual % group_size:
        raise InputError(f"KIVI residual must be a positive multiple of the group size {group_size} (key blocks of "
                         f"the residual length are split into groups of group_size tokens), got {residual!r}")
    if head_dim is None:
        return
    if v_bits < NO_QUANT_BITS and head_dim % group_size:
        raise InputError(f"KIVI group size {group_size} does not divide head_dim {head_dim} (values are grouped "
                         "along head_dim)")
    for b in (k_bits, v_bits):
        if b < NO_QUANT_BITS and head_dim * b % 8:
            raise InputError(f"head_dim {head_dim} at {b} bits does not pack into whole bytes")


def check_sink_settings(sinks: int, window: int) -> None:
    """Raise InputError naming the cause if the sink cache cannot run these settings."""
    if not _is_int(sinks) or sinks < 0:
        raise InputError(f"sink count must be an integer >= 0, got {sinks!r}")
    if not _is_int(window) or window < 1:
        raise InputError(f"sink cache window must be an integer >= 1, got {window!r}")


def check_kvmerger_settings(budget: float, threshold: float, sinks: int, window: int, interval: int) -> None:
    """Raise InputError naming the field if KVMerger cannot run these settings."""
    if not _is_number(budget) or not 0.0 < budget <= 1.0:
        raise InputError(f"KVMerger budget (share of the tokens seen to hold) must lie in (0, 1], got {budget!r}")
    if not _is_number(threshold) or not -1.0 <= threshold <= 1.0:
        raise InputError(f"KVMerger threshold (key cosine similarity) must lie in [-1, 1], got {threshold!r}")
    for name, value, low in (("sinks", sinks, 0), ("window", window, 1), ("interval", interval, 1)):
        if not _is_int(value) or value < low:
            raise InputError(f"KVMerger {name} must be an integer >= {low}, got {value!r}")


def check_minicache_settings(start_layer: int | None, t: float, gamma: float, num_layers: int | None = None) -> None:
    """Raise InputError naming the cause if MiniCache cannot run these settings (on ``num_layers`` layers)."""
    if start_layer is not None and (not _is_int(start_layer) or start_layer < 0):
        raise InputError(f"MiniCache start layer must be an integer >= 0 or null, got {start_layer!r}")
    if not _is_number(t) or not 0.0 <= t <= 1.0:
        raise InputError(f"MiniCache interpolation t must lie in [0, 1], got {t!r}")
    if not _is_number(gamma) or not gamma >= 0.0:
        raise InputError(f"MiniCache retention threshold gamma must be >= 0, got {gamma!r}")
    if num_layers is None or start_layer is None:
        return
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


def parse_pair(name: Any) -> tuple[int, int]:
    """(key bits, value bits) of a KVTuner candidate name: ``KV4`` = (4, 4), ``K8V4`` = (8, 4)."""
    m = re.fullmatch(r"KV(\d+)|K(\d+)V(\d+)", name) if isinstance(name, str) else None
    if m is None:
        raise InputError(f"KVTuner candidate {name!r} is not of the form KV<bits> or K<bits>V<bits> (e.g. KV4, K8V4)")
    return (int(m[1]), int(m[1])) if m[1] else (int(m[2]), int(m[3]))


def average_bits(pairs: list) -> float:
    """KVTuner's budget measure: the mean over layers of (key bits + value bits) / 2 (codes only, no scales)."""
    return sum(k + v for k, v in pairs) / (2 * len(pairs))


def check_kvtuner_settings(spec: dict) -> None:
    """Raise InputError naming the cause if the KVTuner search cannot run ``spec`` (normalized kvtuner keys)."""
    cands = spec["candidates"]
    if not isinstance(cands, list) or not cands or len(set(map(str, cands))) != len(cands):
        raise InputError(f"KVTuner candidates must be a non-empty list of distinct names, got {cands!r}")
    pairs = [parse_pair(c) for c in cands]
    for kb, vb in pairs:
        check_kivi_settings(kb, vb, spec["group_size"], spec["residual"])
    budget = spec["budget"]
    if not _is_number(budget) or not budget > 0:
        raise InputError(f"KVTuner budget (average bits per KV element) must be a positive number, got {budget!r}")
    cheapest = min(pairs, key=lambda p: p[0] + p[1])
    if average_bits([cheapest]) > budget:
        raise InputError(f"KVTuner budget {budget} bits is below the cheapest candidate "
                         f"(K{cheapest[0]}V{cheapest[1]}, {average_bits([cheapest])} bits): no configuration meets it")
    if spec["objective"] not in KVTUNER_OBJECTIVES:
        raise InputError(f"KVTuner objective must be one of {KVTUNER_OBJECTIVES}, got {spec['objective']!r}")
    if spec["strategy"] not in KVTUNER_STRATEGIES:
        raise InputError(f"KVTuner strategy must be one of {KVTUNER_STRATEGIES}, got {spec['strategy']!r}")
    for key in ("trials", "max_exact", "calib_rows"):
        if not _is_int(spec[key]) or spec[key] < 1:
            raise InputError(f"KVTuner {key} must be a positive integer, got {spec[key]!r}")


def _bits_pairs(bits: Any, per_layer: bool) -> list:
    """[k, v] or (per_layer) [[k, v], ...] as lists of ints; InputError naming the expected shape otherwise."""
    def pair(p: Any) -> list[int] | None:
        ok = isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(b) for b in p)
        return [int(p[0]), int(p[1])] if ok else None

    if pair(bits) is not None:
        return pair(bits)
    if per_layer and isinstance(bits, (list, tuple)) and bits and all(pair(p) is not None for p in bits):
        return [pair(p) for p in bits]
    shape = "a [k_bits, v_bits] pair or a list of one pair per layer" if per_layer else "a [k_bits, v_bits] pair"
    raise InputError(f"bits must be {shape}, got {bits!r}")


def normalize_spec(spec: dict) -> dict:
    """The spec with defaults filled and bits as lists; InputError for an unknown method or key, or a bad value.

    Checks what does not depend on the model; ``check_against_model`` checks the rest.
    """
    if not isinstance(spec, dict):
        raise InputError(f"a KV-cache spec must be a dict (JSON object), got {type(spec).__name__}")
    method = spec.get("method")
    if method not in DEFAULTS:
        raise InputError(f"unknown KV-cache method {method!r}; known: {', '.join(DEFAULTS)}")
    unknown = sorted(set(spec) - set(DEFAULTS[method]) - {"method", *METADATA_KEYS})
    if unknown:
        raise InputError(f"unknown {method} parameter(s) {unknown}; known: {sorted(DEFAULTS[method])}")
    if "search" in spec and not isinstance(spec["search"], dict):
        raise InputError(f"a spec's 'search' record must be a dict, got {type(spec['search']).__name__}")
    out = {"method": method, **DEFAULTS[method], **{k: v for k, v in spec.items() if k != "method"}}
    if method == "kvtuner":
        out["candidates"] = list(out["candidates"]) if isinstance(out["candidates"], (list, tuple)) else \
            out["candidates"]
        check_kvtuner_settings(out)
        return out
    if method == "sink":
        check_sink_settings(out["sinks"], out["window"])
        return out
    if method == "kvmerger":
        check_kvmerger_settings(out["budget"], out["threshold"], out["sinks"], out["window"], out["interval"])
        return out
    out["bits"] = _bits_pairs(out["bits"], per_layer=method == "kivi")
    for kb, vb in [out["bits"]] if _is_int(out["bits"][0]) else out["bits"]:
        check_kivi_settings(kb, vb, out["group_size"], out["residual"])
    if method == "minicache":
        check_minicache_settings(out["start_layer"], out["t"], out["gamma"])
    return out


def per_layer_bits(bits: Any, num_layers: int) -> list[list[int]]:
    """One [k_bits, v_bits] pair per layer, from one pair for all layers or a list of one pair per layer."""
    bits = _bits_pairs(bits, per_layer=True)
    if _is_int(bits[0]):
        return [bits] * num_layers
    if len(bits) != num_layers:
        raise InputError(f"{len(bits)} per-layer [k_bits, v_bits] pairs for a {num_layers}-layer model")
    return bits


def model_geometry(model: Any) -> tuple[int, int]:
    """(num_layers, head_dim) of a supported model or config; InputError naming an unsupported type or layout."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"model type {model_type!r} is not supported by the KV caches (supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}: the Llama attention layout)")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise InputError(f"{model_type} attention layout not supported: {heads} query heads are not a multiple of "
                         f"{kv_heads} key/value heads")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers), int(head_dim)


def check_against_model(spec: dict, model: Any) -> tuple[int, int]:
    """Check a normalized spec against a model or config; returns (num_layers, head_dim)."""
    num_layers, head_dim = model_geometry(model)
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
        check_kivi_settings(kb, vb, spec["group_size"], spec["residual"], head_dim)
    if spec["method"] == "minicache":
        start = num_layers // 2 if spec["start_layer"] is None else spec["start_layer"]
        check_minicache_settings(start, spec["t"], spec["gamma"], num_layers)
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
    return normalize_spec(raw)
