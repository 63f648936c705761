"""What the export formats can take, without torch: the export stage's validation and its run read it.

optimum's ONNX export sizes the past key values it declares from ``hidden_size // num_attention_heads``, so a config
whose ``head_dim`` is set to something else (Llama-3-style configs that set it, Mistral-NeMo: 5120 / 32 = 160 but
head_dim 128) gives a graph whose cache inputs do not fit what the attention computes. Such a model is refused for
the ``onnx*`` formats before any work, not found out after hours of distillation. So is a missing ONNX Runtime: it
comes from the project's ``cpu`` or ``gpu`` extra (onnxruntime or onnxruntime-gpu, which both install the
``onnxruntime`` module), not from its core dependencies.
"""

from __future__ import annotations

from importlib.util import find_spec

ONNX_FORMATS = ("onnx", "onnx-int8", "onnx-int4")


def onnx_export_problem(cfg: dict | None) -> str | None:
    """Why the ONNX formats cannot export a model with this ``config.json`` dict correctly, or None (also when the
    config is unknown or lacks the fields)."""
    cfg = cfg or {}
    head_dim, hidden, heads = cfg.get("head_dim"), cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (head_dim, hidden, heads)) or heads <= 0:
        return None
    if head_dim == hidden // heads:
        return None
    return (f"its config sets head_dim {head_dim}, not hidden_size // num_attention_heads ({hidden} // {heads} = "
            f"{hidden // heads}), and optimum's ONNX export sizes the KV cache from hidden_size / "
            "num_attention_heads (Llama-3-style and Mistral-NeMo configs)")


def onnx_runtime_missing() -> str | None:
    """Why the ONNX formats cannot run in this environment (no ``onnxruntime`` module), or None."""
    if find_spec("onnxruntime") is not None:
        return None
    return ("ONNX Runtime is not installed: install the project with its cpu extra (onnxruntime), or its gpu extra "
            "(onnxruntime-gpu) on a CUDA machine, e.g. pip install -e '.[cpu]'")
