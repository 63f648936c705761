"""What a quantized checkpoint needs beyond its weights: ``quantization.json``, read back on load.

``load_causal_lm`` calls :func:`restore` on every local checkpoint, so evaluation, export checks and users run the
model as quantized. torch is imported only when a record asks for run-time parts.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.errors import InputError

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
        from stages.quantize.hadamard import random_rotation
        from stages.quantize.transforms import install_online_hadamard

        import torch

        install_online_hadamard(model, random_rotation(int(online["size"]), int(online["seed"])).to(torch.float32))
    a_bits, kv_bits = int(q.get("a_bits", 16)), int(q.get("kv_bits", 16))
    if a_bits < 16 or kv_bits < 16:
        from stages.quantize.fakequant import attach_fake_quant
        from stages.quantize.setting import QuantSetting

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
