"""Model and dataset references without torch: local folder or hub id, their config, their resolved commit.

A reference is a local directory if one exists at that path (or it looks like a path); otherwise a hub id
``org/name``. Stages key a hub reference by the commit it resolves to, never by ``@main``: a new commit pushed to
the hub is a new input, so the cache does not serve a result computed from the old weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llm_compress.errors import InputError

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PATH_PREFIXES = ("/", "./", "../", "~")  # a reference written like this is a path, never a hub id
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the safetensors loader refuses a longer header


def is_local_ref(ref: str) -> bool:
    return Path(ref).expanduser().exists() or ref.startswith(PATH_PREFIXES) or not HUB_ID_RE.match(ref)


def check_model_ref(ref: str, what: str) -> None:
    """Cheap pre-flight check: a local model directory must exist, hold a config.json, and its safetensors files
    must be whole (:func:`check_safetensors`)."""
    if is_local_ref(ref):
        p = Path(ref).expanduser()
        if not p.is_dir():
            raise InputError(f"{what}: model directory not found: {ref}")
        if not (p / "config.json").is_file():
            raise InputError(f"{what}: {ref} has no config.json (not a transformers checkpoint)")
        for weights in sorted(p.glob("*.safetensors")):
            check_safetensors(weights, what)


def check_safetensors(path: Path, what: str) -> None:
    """A safetensors file is whole: its header and the tensor data the header declares fill the file exactly.

    The layout is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor to its
    ``data_offsets`` [begin, end) in the data that follows, then the data. A copy cut short (an interrupted
    download or copy, a full disk) fails here from a few bytes of reading, before any stage loads torch, instead
    of as a SafetensorError traceback inside the stage; the safetensors loader refuses the same files.
    """
    def corrupt(reason: str) -> InputError:
        return InputError(f"{what}: truncated or corrupt safetensors file {path}: {reason}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8:
                raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
            if not 0 < n <= min(size - 8, SAFETENSORS_MAX_HEADER):
                raise corrupt(f"the header length reads {n} bytes, the file holds {size - 8} after it")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise corrupt(f"the header is not a safetensors header ({e})") from None
    data = size - 8 - n
    if max(ends, default=0) != data:
        raise corrupt(f"the header declares {max(ends, default=0)} bytes of tensor data, the file holds {data}")


def check_recipe_models(models) -> None:
    """The recipe's teacher and student checkpoints, when given as local folders, exist and hold a config.json
    (``models``: the recipe's ModelsConfig). Every stage that reads them calls this, so it runs whichever are on."""
    if models.teacher != "embedded":
        check_model_ref(models.teacher, "models.teacher")
    if models.student != "derive":
        check_model_ref(models.student, "models.student")


def model_config(ref: str, revision: str | None = None) -> dict | None:
    """The ``config.json`` of a local checkpoint, or of a hub id already in the local Hugging Face cache; None when
    it cannot be read without a download (the stage then checks after loading). Multimodal wrappers keep the
    language model's config under ``text_config``; that one is returned."""
    if is_local_ref(ref):
        path = Path(ref).expanduser() / "config.json"
        if not path.is_file():
            return None
    else:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(ref, "config.json", revision=revision)
        if not isinstance(hit, str):
            return None
        path = Path(hit)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{ref}: config.json is not readable JSON ({e})") from None
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else None


def _cached_commit(ref: str, revision: str, repo_type: str) -> str | None:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{ref.replace('/', '--')}"
    path = folder / "refs" / revision
    if path.is_file():
        sha = path.read_text().strip()
        return sha if COMMIT_RE.match(sha) else None
    return revision if COMMIT_RE.match(revision) and (folder / "snapshots" / revision).is_dir() else None


def hub_commit(ref: str, revision: str | None = None, repo_type: str = "model") -> str:
    """The commit a hub reference resolves to: asked of the hub when it can be reached (and HF_HUB_OFFLINE is not
    set), else read from the local cache's refs. InputError when neither knows it."""
    revision = revision or "main"
    if COMMIT_RE.match(revision):
        return revision
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            from huggingface_hub import HfApi

            return HfApi().repo_info(ref, repo_type=repo_type, revision=revision, timeout=10).sha
        except Exception:  # no network, unknown repo, rate limit: fall back to the cache, which says what it has
            pass
    sha = _cached_commit(ref, revision, repo_type)
    if sha is None:
        raise InputError(f"{repo_type} '{ref}'@{revision}: cannot resolve it to a commit: the hub is not reachable "
                         "and it is not in the local Hugging Face cache (download it once, or give a local folder)")
    return sha


def distilled_model_config(recipe) -> dict | None:
    """The config of the model the stages after distillation receive, when it is known without a download: the
    given student's config.json, else the teacher's (the embedded teacher's from the recipe) with the layer count and
    shape overrides a derived student takes (``distill.student``). None when it cannot be read up front."""
    m, e = recipe.models, recipe.embedded
    if m.student != "derive":
        return model_config(m.student, m.revision)
    if m.teacher == "embedded":
        cfg = {"model_type": "llama", "num_hidden_layers": e.num_layers, "hidden_size": e.hidden_size,
               "num_attention_heads": e.num_heads, "num_key_value_heads": e.num_kv_heads}
    else:
        cfg = model_config(m.teacher, m.revision)
    if not cfg:
        return None
    layers, n = recipe.distill.student.layers, cfg.get("num_hidden_layers", 0)
    return {**cfg, "num_hidden_layers": len(range(0, n, 2)) if layers == "every_other" else len(layers),
            **recipe.distill.student.config}
