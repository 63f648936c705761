"""Post-training quantization stage (this version: RTN weight quantization)."""

from __future__ import annotations

import json
from pathlib import Path

from stages.config import ModelsConfig, QuantizeConfig
from stages.modeling import load_causal_lm, load_tokenizer, save_pretrained_atomic_into
from stages.quantize.rtn import quantize_model
from stages.result import StageResult


def run(cfg: QuantizeConfig, models: ModelsConfig, *, model_dir: Path, out_dir: Path) -> StageResult:
    s = cfg.scheme
    model = load_causal_lm(str(model_dir), dtype=models.dtype, what="quantize input")
    tok = load_tokenizer(str(model_dir))
    stats = quantize_model(model, s.bits, s.group_size, s.symmetric, s.skip)
    save_pretrained_atomic_into(model, tok, out_dir / "model")
    # Record the scheme next to the weights: the dequantized values only make sense with it.
    (out_dir / "model" / "quantization.json").write_text(json.dumps({**s.model_dump(), **stats}, indent=2))
    label = f"W{s.bits}A16" + (f" g{s.group_size}" if s.group_size else " per-channel")
    return StageResult(outputs={"model": "model"},
                       metrics={"scheme": label, "method": s.method, "bits": s.bits, "group_size": s.group_size,
                                "symmetric": s.symmetric, "quantized_params": stats["quantized_params"],
                                "mean_rel_error": stats["mean_rel_error"]})
