"""What a quantized checkpoint needs beyond its weights: ``quantization.json``, read back on load.

``load_causal_lm`` calls :func:`restore` on every local checkpoint, so evaluation, export checks and users run the
model as quantized. torch is imported only when a record asks for run-time parts.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_compress.errors import InputError

QUANT_FILE = "quantization.json"


def _record(model_dir: str | Path) -> dict | None:
    """The ``quantization.json`` of a checkpoint folder, or None when it has none."""
    path = Path(model_dir) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def restore(model, model_dir: str | Path):
    """Re-create what ``quantization.json`` in ``model_dir`` records on a freshly loaded ``model``; returns it.

    Installs the online Hadamard (same size and seed, so the same matrix) and attaches activation/KV fake
    quantization when the setting has A or KV bits below 16. A model without the file is returned unchanged.
    """
    q = _record(model_dir)
    if q is None:
        return model
    online = q.get("online_hadamard")
    if online:
        from llm_compress.quantize.hadamard import random_rotation
        from llm_compress.quantize.transforms import install_online_hadamard

        import torch

        install_online_hadamard(model, random_rotation(int(online["size"]), int(online["seed"])).to(torch.float32))
    a_bits, kv_bits = int(q.get("a_bits", 16)), int(q.get("kv_bits", 16))
    if a_bits < 16 or kv_bits < 16:
        from llm_compress.quantize.fakequant import attach_fake_quant
        from llm_compress.quantize.setting import QuantSetting

        attach_fake_quant(model, QuantSetting(w_bits=int(q.get("w_bits", 16)), a_bits=a_bits, kv_bits=kv_bits),
                          a_clip_ratio=float(q.get("a_clip_ratio", 1.0)), kv_group_size=q.get("kv_group_size"))
    return model


def runtime_needs(model_dir: str | Path) -> dict:
    """What a checkpoint needs beyond standard transformers (empty dict: nothing)."""
    q = _record(model_dir)
    if q is None:
        return {}
    out = {}
    if q.get("online_hadamard"):
        out["online_hadamard"] = q["online_hadamard"]
    if int(q.get("a_bits", 16)) < 16 or int(q.get("kv_bits", 16)) < 16:
        out["simulated"] = f"A{q.get('a_bits', 16)} KV{q.get('kv_bits', 16)} (fake-quantized at run time)"
    return out


# An export that needs run-time parts must not load in stock transformers (or vLLM) as another model: its config
# names a model type they do not know, and the real one is kept under "llm_compress" for this project's loader.
RUNTIME_MODEL_TYPE = "llm_compress_runtime"
RUNTIME_MODULE = "modeling_llm_compress.py"
_RUNTIME_MODULE_TEXT = '''"""This checkpoint needs run-time parts that only llm-compress re-creates: {needs}.

Loaded as a plain {model_type} it would run without them, a different model; so its config.json names model type
"{marker}", which transformers and vLLM refuse. Load it with llm-compress's loader:

    from llm_compress.modeling import load_causal_lm
    model = load_causal_lm("path/to/this/folder")
"""

raise ImportError("this checkpoint needs llm-compress's loader (it re-creates {needs}): "
                  "from llm_compress.modeling import load_causal_lm; model = load_causal_lm(<this folder>)")
'''


def mark_runtime_checkpoint(folder: str | Path, needs: dict) -> None:
    """Make the checkpoint in ``folder`` refuse stock loaders: model_type becomes RUNTIME_MODEL_TYPE (the real one
    and ``needs`` go under "llm_compress"), with an auto_map to a module that raises, naming this project's loader,
    even under trust_remote_code=True."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    real = cfg["model_type"]
    cfg.update(model_type=RUNTIME_MODEL_TYPE, llm_compress={"model_type": real, "runtime_needs": needs,
                                                           "loader": "llm_compress.modeling.load_causal_lm"},
               auto_map={"AutoConfig": "modeling_llm_compress.Config",
                         "AutoModelForCausalLM": "modeling_llm_compress.Model"})
    (folder / RUNTIME_MODULE).write_text(_RUNTIME_MODULE_TEXT.format(needs=", ".join(needs), model_type=real,
                                                                     marker=RUNTIME_MODEL_TYPE))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def runtime_checkpoint_config(folder: str | Path):
    """For a folder marked by :func:`mark_runtime_checkpoint`: its transformers config with the real model type
    (to pass to from_pretrained); None for any other folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # from_pretrained names the problem
    if cfg.get("model_type") != RUNTIME_MODEL_TYPE:
        return None
    from transformers import AutoConfig

    real = cfg.pop("llm_compress")["model_type"]
    for k in ("model_type", "auto_map"):
        cfg.pop(k, None)
    return AutoConfig.for_model(real, **cfg)
