"""KV-cache compression as Hugging Face caches: one file per method behind ``llm_compress.kv.base``
(``KVCache``/``KVLayer``).

Methods (``method`` in a spec): ``kivi`` (``KIVICache``, kivi.py), ``sink`` (``SinkCache``, sink.py), ``minicache``
(``MiniCache``, minicache.py), ``kvmerger`` (``KVMergerCache``, kvmerger.py), and ``kvtuner``, a search (kvtuner.py)
whose ``kvtuner.search`` returns the chosen per-layer ``kivi`` spec. Each method's parameters, defaults and ranges
are defined once, by its model in :mod:`llm_compress.kv.config`, whose registry ``KV_METHODS`` names the class that
``build_cache`` builds; every parameter is optional (``docs/recipe-reference.md`` lists them under ``kv.cache``).

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
from llm_compress.kv.config import KV_METHODS
from llm_compress.kv.spec import KV_CACHE_JSON, SUPPORTED_MODEL_TYPES, check_against_model, normalize_spec, read_spec


def build_cache(spec: dict | str | Path, model: Any, attention_mask: Any = None):
    """A fresh cache for ``model`` (a model or its config) from a spec dict, or a spec JSON file or its folder.

    ``attention_mask`` [B, L] (optional): the prompt's left padding, which the caches holding fewer tokens than
    they have seen (sink, kvmerger) need in a padded batch; the other methods return every token and ignore it.
    """
    spec = read_spec(spec) if isinstance(spec, (str, Path)) else normalize_spec(spec)
    num_layers, _ = check_against_model(spec, model)
    method = KV_METHODS[spec["method"]]
    if method.runs is None:
        raise InputError(f"a {spec['method']} spec describes a search, not a cache: run it (the KV stage, or "
                         f"llm_compress.kv.{spec['method']}.search) and build the per-layer kivi spec it returns")
    params = {k: v for k, v in spec.items() if k in method.model.model_fields and k != "method"}
    cache = method.load()(num_layers, **params, spec=spec)
    if hasattr(cache, "attach") and hasattr(model, "named_modules"):  # a cache that hooks the model's attention
        cache.attach(model)
    return cache.set_padding(attention_mask) if attention_mask is not None and hasattr(cache, "set_padding") else cache


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
    spec = normalize_spec(spec)
    if "factors" in spec:  # the file is named relative to the spec's folder, never by where it was written
        spec["factors"] = {k: v for k, v in spec["factors"].items() if k != "path"}
    write_json_atomic(path, spec)
    return path


__all__ = ["KV_CACHE_JSON", "KV_METHODS", "SUPPORTED_MODEL_TYPES", "build_cache", "load_kv_cache", "normalize_spec",
           "save_kv_cache_json"]
