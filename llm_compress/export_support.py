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
from typing import Literal

from pydantic import Field

from llm_compress.schema import Strict


ExportFormat = Literal["safetensors", "compressed-tensors", "bnb-nf4", "bnb-int8", "onnx", "onnx-int8", "onnx-int4"]


class ExportCheck(Strict):
    max_abs_diff: float | None = Field(None, ge=0, description="Max |logit difference| vs the source.")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="Share of positions whose argmax matches.")
    max_kl: float | None = Field(None, ge=0, description="Max mean KL(source || export) per position.")


# Formats that ship the quantize stage's own codes (compressed-tensors; ONNX int4/int8 of a model quantized at 4/8
# bits) must reproduce the quantized model: exactly up to float32 rounding, or up to the rounding of a bf16/fp16
# checkpoint (measured on the demo's W4 model: KL 3e-5, top-1 0.988 in bf16). A re-rounded export (another grid over
# the same weights: onnxruntime's RTN, bitsandbytes nf4, onnxruntime-genai's builder) measured KL 5e-4 to 2e-3 and
# top-1 0.93-0.97 there, so both defaults fail it (the 16-bit one on KL: bf16 near-ties flip top-1 on a random tiny
# model down to 0.977, so its top-1 floor is only a sanity bound). The exports also decode their codes from disk.
FROM_CODES_CHECK = ExportCheck(max_abs_diff=1e-3, min_top1_agreement=0.999, max_kl=1e-6)


FROM_CODES_CHECK_16BIT = ExportCheck(min_top1_agreement=0.95, max_kl=2e-4)


def _default_checks() -> dict[str, ExportCheck]:
    return {
        "safetensors": ExportCheck(max_abs_diff=1e-4, min_top1_agreement=0.99),
        "onnx": ExportCheck(max_abs_diff=1e-2, min_top1_agreement=0.99),
        "bnb-int8": ExportCheck(min_top1_agreement=0.80),
        "bnb-nf4": ExportCheck(min_top1_agreement=0.50),
        # a model without the quantize stage's codes: onnxruntime quantizes it afresh (a new model, loose limits);
        # with codes (see export.run_export) FROM_CODES_CHECK applies unless the recipe sets a check
        "onnx-int8": ExportCheck(min_top1_agreement=0.80),
        "onnx-int4": ExportCheck(min_top1_agreement=0.50),
    }


class ExportConfig(Strict):
    enabled: bool = True
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["safetensors", "bnb-nf4", "bnb-int8", "onnx"],
        description="compressed-tensors and onnx-int4/-int8 ship the quantize stage's own codes (W4/W8 for ONNX); "
        "bnb-* re-quantize the weights on bitsandbytes' grids.")
    checks: dict[ExportFormat, ExportCheck] = Field(
        default_factory=dict,
        description="Per format: how close the reloaded export's logits must be to the source's (unset: the "
        "format's default; see check_for).")
    check_batch_size: int = Field(16, ge=1, description="Held-out rows the export checks run (eval rows).")
    check_seq_len: int = Field(256, ge=2, description="Tokens per check row (at most the eval rows' length).")

    def check_for(self, fmt: str, from_codes: bool = False, float32: bool = True) -> ExportCheck:
        """The recipe's check of ``fmt``, else its default: for a format built from codes FROM_CODES_CHECK, or
        FROM_CODES_CHECK_16BIT when it computes in bf16/fp16 (``float32`` false)."""
        if fmt in self.checks:
            return self.checks[fmt]
        if from_codes:
            return FROM_CODES_CHECK if float32 else FROM_CODES_CHECK_16BIT
        return _default_checks().get(fmt, ExportCheck())

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
