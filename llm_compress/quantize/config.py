"""The ``quantize`` recipe section: the W/A/KV setting and the weight grid every method shares, then one model per
method (RTN, GPTQ, OSTQuant), keyed on ``method``. Torch-free."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from llm_compress.schema import Strict, union, with_default_method


# the settings the quantization papers report (GPTQ, QuaRot, SpinQuant, OSTQuant): the form's dropdown
COMMON_SETTINGS = ("W4A16", "W3A16", "W2A16", "W8A16", "W8A8", "W4A8", "W6A6", "W4A4", "W4A16KV4", "W4A16KV8",
                   "W8A8KV8", "W4A8KV4", "W4A8KV8", "W4A4KV4", "W4A4KV8")


class _QuantBase(Strict):
    """What every quantization method shares: the setting and the weight grid."""

    # the form offers the settings the papers report as a dropdown, and any other W/A/KV combination as text
    setting: Annotated[Literal[COMMON_SETTINGS], Field(title="Common setting")] | Annotated[
        str, Field(title="Other setting")] = Field(
        "W4A16", description="Bits as the papers name them: W<weights>A<activations>[KV<kv cache>], e.g. W4A16, "
        "W8A8, W4A8, W4A4KV4, W4A4KV16 (KV defaults to 16; bits 2-8 or 16, weights 2-8). Activations are "
        "fake-quantized per token and KV per head (asymmetric) when the model runs; weights are quantized into "
        "the checkpoint.")
    group_size: int | None = Field(
        None, description="Weight quantization group along the input dimension (e.g. 32, 64, 128); "
        "unset = one scale per output channel.")
    symmetric: bool = Field(True, description="Symmetric weights (zero point 0) or asymmetric (min/max).")
    clip_search: bool = Field(False, description="Search a per-row (per-group) clipping ratio of the weight range "
                              "that minimises the quantization error.")
    a_clip_ratio: float = Field(1.0, gt=0, le=1, description="Clipping ratio of the per-token activation range.")
    kv_group_size: int | None = Field(None, description="KV quantization group along head_dim (unset: whole head).")
    skip: list[str] = Field(default_factory=lambda: ["lm_head"],
                            description="Linear modules left in full precision (name suffixes).")

    @field_validator("group_size", "kv_group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and (v < 2 or v & (v - 1)):
            raise ValueError("must be a power of two >= 2 (e.g. 32, 64, 128) or unset")
        return v

    @field_validator("setting")
    @classmethod
    def _setting(cls, v: str) -> str:
        from llm_compress.quantize.setting import parse_setting

        try:
            s = parse_setting(v)
        except Exception as e:
            raise ValueError(str(e)) from None
        if not 2 <= s.w_bits <= 8:  # parse_setting allows W16; A and KV are 2-8 or 16 there already
            raise ValueError(f"weight bits must be 2-8, got W{s.w_bits}")
        return v.upper()

    @model_validator(mode="after")
    def _one_group_size(self) -> "_QuantBase":
        # A group suffix in the setting ("W4A16g128") and group_size are one fact: keep it in group_size only,
        # so every quantizer reads the same value (a suffix the weight quantizer ignored gave per-channel
        # weights under a g128 label).
        from llm_compress.quantize.setting import parse_setting

        g = parse_setting(self.setting).w_group_size
        if g is not None:
            if self.group_size is not None and self.group_size != g:
                raise ValueError(f"setting {self.setting} names group size {g} but group_size is {self.group_size}")
            if g < 2 or g & (g - 1):
                raise ValueError(f"setting {self.setting}: group size must be a power of two >= 2")
            s = parse_setting(self.setting)
            kv = f"KV{s.kv_bits}" if s.kv_bits < 16 else ""
            self.setting, self.group_size = f"W{s.w_bits}A{s.a_bits}{kv}", g
        return self

    def quant_setting(self):
        from llm_compress.quantize.setting import parse_setting

        return parse_setting(self.setting, w_group_size=self.group_size, w_symmetric=self.symmetric)

    @property
    def calibrated(self) -> bool:
        """Whether the method reads calibration data: its model has a ``calibration`` section (GPTQ, OSTQuant)."""
        return "calibration" in type(self).model_fields


class RTNConfig(_QuantBase):
    """Round-to-nearest weights (fake-quantized), activations/KV as the setting says."""

    method: Literal["rtn"] = "rtn"


class Calibration(Strict):
    samples: int = Field(128, ge=1, description="Calibration rows (seeded draw) of data.seq_len tokens.")
    file: str | None = Field(
        None, description="Where the rows come from. Unset: the data stage's training tokens (the DSIR selection "
        "when select is enabled). Else a file: JSONL (field text_field) or .txt text, tokenized with the model's "
        "tokenizer and packed into rows of data.seq_len; or a .safetensors token file written by the data stage.")
    text_field: str = Field("text", description="Field holding the text in a JSONL calibration file.")


class GPTQConfig(_QuantBase):
    """GPTQ weights (second-order error compensation, layer by layer on calibration data)."""

    method: Literal["gptq"] = "gptq"
    act_order: bool = Field(False, description="Quantize columns in order of decreasing Hessian diagonal.")
    percdamp: float = Field(0.01, gt=0, le=1, description="Hessian damping, a fraction of its mean diagonal.")
    calibration: Calibration = Field(default_factory=Calibration)


class OSTTransforms(Strict):
    rotate_res: bool = Field(True, description="Global orthogonal transform of the residual stream (R_res).")
    rotate_ov: bool = Field(True, description="Per-head orthogonal transform between v_proj and o_proj.")
    smooth_norm: bool = Field(True, description="Smoothing scales after the norms (S_attn, S_ffn).")
    smooth_qk: bool = Field(True, description="Smoothing scales between q and k (equal on RoPE pairs).")
    smooth_ov: bool = Field(True, description="Smoothing scales between v and o.")
    smooth_up_down: bool = Field(True, description="Smoothing scales between up and down.")


class OSTQuantConfig(_QuantBase):
    """OSTQuant: learnable orthogonal + scaling transforms, calibrated with KL-Top, fused, then RTN or GPTQ."""

    method: Literal["ostquant"] = "ostquant"
    weight_quantizer: Literal["rtn", "gptq"] = Field("gptq", description="Quantizer of the fused weights.")
    act_order: bool = Field(False, description="GPTQ act-order (weight_quantizer gptq).")
    percdamp: float = Field(0.01, gt=0, le=1)
    loss: Literal["kl_top", "kl", "mse"] = Field(
        "kl_top", description="Calibration loss vs the full-precision model: kl_top (KL on its top-k tokens, the "
        "paper's), kl (full forward KL) or mse (of the logits).")
    topk: int = Field(1000, ge=1, description="k of kl_top (clipped to the vocabulary).")
    steps: int = Field(100, ge=0, description="Optimisation steps (0: fixed random-Hadamard rotation only).")
    batch_size: int = Field(4, ge=1)
    rotate_lr: float = Field(0.016, gt=0, description="Cayley Adam learning rate of the orthogonal transforms.")
    smooth_lr: float = Field(0.0018, gt=0, description="Adam learning rate of the log smoothing scales.")
    train_weight_quant: bool | None = Field(
        None, description="Fake-quantize weights while learning the transforms (unset: on for A16 settings, off "
        "otherwise, as the paper's scripts).")
    online_hadamard: bool | None = Field(
        None, description="A fixed Hadamard on every down_proj input (folded into W_down; applied at run time, so "
        "only this project's loader runs the checkpoint). Unset: on when activations are quantized (A < 16), off "
        "for weight-only settings, whose checkpoint is then a standard one (the learnt rotations are folded into "
        "the weights) that exports to every format.")
    init: Literal["hadamard", "klt"] = Field("hadamard", description="Init of R_res: random Hadamard, or KLT of "
                                             "the weights times a random Hadamard.")
    transforms: OSTTransforms = Field(default_factory=OSTTransforms)
    calibration: Calibration = Field(default_factory=Calibration)

    @model_validator(mode="after")
    def _online_hadamard(self) -> "OSTQuantConfig":
        if self.online_hadamard is None:
            self.online_hadamard = self.quant_setting().a_bits < 16
        return self


# The methods, keyed on ``method``; llm_compress.quantize.apply dispatches them (WEIGHT_QUANTIZERS, TRANSFORMS).
QuantMethod = union((RTNConfig, GPTQConfig, OSTQuantConfig), "method")


class QuantizeConfig(Strict):
    enabled: bool = True
    scheme: QuantMethod = Field(default_factory=RTNConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any) -> Any:
        return with_default_method(data, "scheme", "rtn")

