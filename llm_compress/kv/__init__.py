"""KV-cache compression as Hugging Face caches: one file per method behind ``llm_compress.kv.base`` (``KVCache``/``KVLayer``).

Methods (``method`` in a spec; every parameter optional, defaults shown):

=========  ============================  ==================================================================
method     class (file)                  parameters
=========  ============================  ==================================================================
kivi       ``KIVICache`` (kivi.py)       bits: [4, 4], one [k_bits, v_bits] pair for all layers, or one pair
                                         per layer [[k, v], ...] (KVTuner); each 2, 4, 8 or 16 (not
                                         quantized); group_size: 32 (divides head_dim); residual: 128 (a
                                         multiple of group_size)
sink       ``SinkCache`` (sink.py)       sinks: 4; window: 1020
minicache  ``MiniCache`` (minicache.py)  start_layer: null (= layers // 2); t: 0.5; gamma: 0.05;
                                         bits: [16, 16] (KIVI under the merge: [4, 4] is MiniCache-4);
                                         group_size: 32; residual: 128
kvmerger   ``KVMergerCache``             budget: 0.5 (share of the tokens seen held, in (0, 1]); threshold:
           (kvmerger.py)                 0.8 (key cosine similarity for merging neighbours, in [-1, 1]);
                                         sinks: 4; window: 32 (never merged); interval: 32 (tokens over
                                         the budget between compressions)
kvtuner    (a search, kvtuner.py)        candidates: [KV8, K8V4, KV4, K4V2, KV2]; budget: 4.0 (average bits);
                                         objective: kl (or ppl); strategy: auto (exact | optuna); trials: 60;
                                         max_exact: 256; calib_rows: 4; group_size: 32; residual: 128.
                                         ``kvtuner.search`` returns the chosen per-layer ``kivi`` spec
=========  ============================  ==================================================================

A spec is a plain JSON-able dict, e.g. ``{"method": "kivi", "bits": [[4, 2], [4, 4], [8, 4], [4, 2]],
"group_size": 32, "residual": 128}``. ``normalize_spec`` fills the defaults; that form is what is saved and what
``cache.spec`` holds. Next to a checkpoint it lives in ``kv_cache.json``, and generating with it takes two lines::

    cache = load_kv_cache(model_dir, model)  # add attention_mask=inputs["attention_mask"] for a left-padded batch
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Build one cache per ``generate`` call (or forward sequence). Supported models have the Llama attention layout
(``SUPPORTED_MODEL_TYPES``: separate k/v projections, RoPE applied before ``cache.update``, MHA or GQA); other model
types are refused by name. Errors caused by a spec or a model are ``InputError``s naming the cause.

Nothing heavy is imported here: ``llm_compress.kv.spec`` validates specs without torch; the caches import on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_compress.errors import InputError
from llm_compress.io import write_json_atomic
from llm_compress.kv.spec import (DEFAULTS, KV_CACHE_JSON, SUPPORTED_MODEL_TYPES, check_against_model, normalize_spec,
                            read_spec)


def build_cache(spec: dict | str | Path, model: Any, attention_mask: Any = None):
    """A fresh cache for ``model`` (a model or its config) from a spec dict, or a spec JSON file or its folder.

    ``attention_mask`` [B, L] (optional): the prompt's left padding, which the caches holding fewer tokens than
    they have seen (sink, kvmerger) need in a padded batch; the other methods return every token and ignore it.
    """
    spec = read_spec(spec) if isinstance(spec, (str, Path)) else normalize_spec(spec)
    num_layers, _ = check_against_model(spec, model)
    method = spec["method"]
    if method == "kvtuner":
        raise InputError("a kvtuner spec describes a search, not a cache: run it (the KV stage, or "
                         "llm_compress.kv.kvtuner.search) and build the per-layer kivi spec it returns")
    if method == "kivi":
        from llm_compress.kv.kivi import KIVICache

        return KIVICache(num_layers, spec["bits"], spec["group_size"], spec["residual"], spec=spec)
    if method == "sink":
        from llm_compress.kv.sink import SinkCache

        cache = SinkCache(num_layers, spec["sinks"], spec["window"], spec=spec)
        return cache.set_padding(attention_mask) if attention_mask is not None else cache
    if method == "kvmerger":
        from llm_compress.kv.kvmerger import KVMergerCache

        cache = KVMergerCache(num_layers, spec["budget"], spec["threshold"], spec["sinks"], spec["window"],
                              spec["interval"], spec=spec)
        return cache.set_padding(attention_mask) if attention_mask is not None else cache
    from llm_compress.kv.minicache import MiniCache

    return MiniCache(num_layers, spec["start_layer"], spec["t"], spec["gamma"], tuple(spec["bits"]),
                     spec["group_size"], spec["residual"], spec=spec)


def load_kv_cache(model_dir: str | Path, model: Any, attention_mask: Any = None):
    """The cache that ``kv_cache.json`` in ``model_dir`` describes, built for ``model`` (see ``build_cache``)."""
    path = Path(model_dir) / KV_CACHE_JSON
    if not path.is_file():
        raise InputError(f"no {KV_CACHE_JSON} in {model_dir}")
    return build_cache(path, model, attention_mask)


def save_kv_cache_json(path: str | Path, spec: dict) -> Path:
    """Write the normalized spec to ``path`` (a ``.json`` file, or a folder: its ``kv_cache.json``), atomically
    (temp file + ``os.replace``); returns the file. Validated first; the model-dependent checks run on load."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / KV_CACHE_JSON
    write_json_atomic(path, normalize_spec(spec))
    return path


__all__ = ["DEFAULTS", "KV_CACHE_JSON", "SUPPORTED_MODEL_TYPES", "build_cache", "load_kv_cache", "normalize_spec",
           "save_kv_cache_json"]
