"""Post-training quantization stage: RTN, GPTQ or OSTQuant (+ RTN/GPTQ) at a W/A/KV setting.

The stage writes a transformers checkpoint whose weights are fake-quantized (quantized, then stored
dequantized in the model's dtype) and a ``quantization.json`` that records everything the checkpoint needs at
run time beyond its weights: the setting (activation and KV bits are simulated per token when the model runs)
and, for OSTQuant, the online Hadamard before down_proj (its size and seed, re-created on load).
``load_causal_lm`` calls :func:`restore` on every local checkpoint, so evaluation and later stages run the model
as quantized. Beside them, ``quant_codes.safetensors`` holds the quantizer's integer codes, scales and zero points
(:mod:`llm_compress.quantize.codes`), which the packed export formats write as they are. Real low-bit files are made
by the export stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_compress.distributed import world_of
from llm_compress.errors import InputError
from llm_compress.quantize.codes import CODES_FILE, save_codes
from llm_compress.quantize.config import QuantizeConfig
from llm_compress.quantize.record import QUANT_FILE
from llm_compress.result import StageResult
from llm_compress.schema import ModelsConfig, RuntimeConfig


def calibration_rows(path: Path, samples: int, seed: int, *, tokenizer=None, seq_len: int | None = None,
                     text_field: str = "text", vocab_size: int | None = None) -> torch.Tensor:
    """``samples`` seeded rows [n, T] of calibration tokens.

    ``path`` is a token file written by the data stage (.safetensors), or, with ``tokenizer`` and ``seq_len``, a
    JSONL / .txt text file that is tokenized and packed into rows of ``seq_len`` (documents joined by EOS). With
    ``vocab_size``, token ids the model cannot embed are refused: they mean the file was tokenized for another model.
    """
    from llm_compress.data import load_texts, load_tokens, pack

    path = Path(path)
    if path.suffix == ".safetensors" or tokenizer is None:
        ids = load_tokens(path)
    else:
        ids = pack(load_texts([path], text_field), tokenizer, seq_len, what=f"calibration file {path}")
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise InputError(f"calibration tokens {path}: id {int(ids.max())} is outside the model's vocabulary "
                         f"({vocab_size}); they were tokenized for another model")
    g = torch.Generator().manual_seed(seed)
    return ids[torch.randperm(len(ids), generator=g)[:samples]].long()


def _rtn(model, s, setting, calib: torch.Tensor | None, codes: dict | None, rank) -> dict:
    from llm_compress.quantize.rtn import quantize_model

    return quantize_model(model, setting.w_bits, s.group_size, s.symmetric, s.skip, clip_search=s.clip_search,
                          codes=codes)


def _gptq(model, s, setting, calib: torch.Tensor | None, codes: dict | None, rank) -> dict:
    from llm_compress.quantize.gptq import gptq_quantize_model

    return gptq_quantize_model(model, calib.to(model.lm_head.weight.device), setting.w_bits, s.group_size, s.symmetric,
                               s.act_order, s.percdamp, s.clip_search, skip=tuple(s.skip), codes=codes, rank=rank)


def _ostquant(model, s, calib: torch.Tensor, *, seed: int, progress: bool, record: dict, metrics: dict) -> list[dict]:
    """Learn OSTQuant's transforms on ``calib`` and fold them into the weights; fills ``record`` and ``metrics`` and
    returns the calibration history."""
    from llm_compress.quantize.ostquant import calibrate, loss_summary
    from llm_compress.quantize.qsur import layer_qsur
    from llm_compress.quantize.transforms import check_supported

    check_supported(model)  # before QSUR, which walks the same Llama-style layers
    # QSUR needs more tokens than the widest input it measures (the MLP's, at down_proj): a diagnostic, so with
    # too few calibration tokens it is skipped (and said), never the reason a run fails
    widest = max(model.config.hidden_size, model.config.intermediate_size)
    rows = -(-(widest + 1) // calib.shape[1])  # ceil: > widest tokens
    probe = calib[:rows].to(model.lm_head.weight.device) if rows <= len(calib) else None
    if probe is not None:
        with torch.no_grad():
            qsur_before = layer_qsur(model, probe)  # the model as given
    res = calibrate(model, calib, s, seed=seed, progress=progress, qsur_ids=probe)
    history = res["history"]
    summary = loss_summary(history)
    record["online_hadamard"] = res["online_hadamard"]
    record["ostquant"] = {"loss": s.loss, "topk": s.topk, "steps": s.steps,
                          "train_weight_quant": res["train_weight_quant"], **summary}
    metrics.update({f"calib_{k}": v for k, v in summary.items()})
    if probe is None:
        record["qsur"] = (f"not measured: {len(calib)} calibration rows of {calib.shape[1]} tokens are not more "
                          f"than the widest input ({widest}); use more calibration.samples")
    else:
        qsur_after = res["qsur_after"]  # what each quantized matmul sees after the learnt transforms
        record["qsur"] = {k: {"before": round(qsur_before[k], 4), "after": round(qsur_after[k], 4)}
                          for k in qsur_before}
        metrics["qsur_mean_before"] = round(sum(qsur_before.values()) / len(qsur_before), 4)
        metrics["qsur_mean_after"] = round(sum(qsur_after.values()) / len(qsur_after), 4)
    return history


# The weight quantizers, by name: each quantizes the model's Linear weights in place as the scheme (its config model
# in quantize/config.py) says and returns their statistics; RTN and GPTQ run their own, OSTQuant its
# ``weight_quantizer``. What a method runs before that: its transforms (OSTQuant's, learnt and folded into the weights).
WEIGHT_QUANTIZERS = {"rtn": _rtn, "gptq": _gptq}
TRANSFORMS = {"ostquant": _ostquant}


def apply(model, scheme, calib: torch.Tensor | None, *, seed: int = 0, progress: bool = False,
          codes: dict | None = None, rank=None) -> dict:
    """Quantize ``model`` in place as ``scheme`` (a RTN/GPTQ/OSTQuant config) says; returns the record.
    ``codes``, if given, is filled with each quantized Linear's integer codes, scale and zero
    (:mod:`llm_compress.quantize.codes`).

    The record is what ``quantization.json`` holds (setting, weight quantizer, online Hadamard, QSUR, calibration
    losses, per-layer weight errors) plus "metrics" and "history" entries. Activation/KV fake quantization is
    attached as the setting says, so the returned model runs as quantized. ``rank``: GPTQ's share of a data-parallel
    calibration (``gptq_quantize_model``).
    """
    s = scheme
    setting = s.quant_setting()
    record: dict = {"method": s.method, "setting": s.setting, "w_bits": setting.w_bits, "a_bits": setting.a_bits,
                    "kv_bits": setting.kv_bits, "group_size": s.group_size, "symmetric": s.symmetric,
                    "clip_search": s.clip_search, "a_clip_ratio": s.a_clip_ratio, "kv_group_size": s.kv_group_size,
                    "skip": s.skip, "online_hadamard": None}
    metrics: dict = {}
    history: list[dict] = []
    if setting.a_bits < 16 or setting.kv_bits < 16:  # run-time fake quantization hooks Llama-style layers
        from llm_compress.quantize.transforms import check_supported

        check_supported(model)
    if s.calibrated:
        if calib is None:
            raise InputError(f"quantize: {s.method} needs calibration data (the data stage's training tokens)")
        metrics["calibration_rows"], metrics["calibration_tokens"] = len(calib), int(calib.numel())
    if s.method in TRANSFORMS:
        history = TRANSFORMS[s.method](model, s, calib, seed=seed, progress=progress, record=record, metrics=metrics)
    wq = getattr(s, "weight_quantizer", s.method)  # a field of the methods that choose one (OSTQuant)
    stats = WEIGHT_QUANTIZERS[wq](model, s, setting, calib, codes, rank)
    record.update(weight_quantizer=wq, quantized_params=stats["quantized_params"],
                  mean_rel_error=stats["mean_rel_error"], layers=stats["layers"])
    if setting.a_bits < 16 or setting.kv_bits < 16:
        from llm_compress.quantize.fakequant import attach_fake_quant

        attach_fake_quant(model, setting, a_clip_ratio=s.a_clip_ratio, kv_group_size=s.kv_group_size)
    label = setting.name + ("" if s.group_size else " per-channel")  # the name carries g<group> when grouped
    metrics.update({"scheme": label, "method": s.method, "weight_quantizer": wq, "w_bits": setting.w_bits,
                    "a_bits": setting.a_bits, "kv_bits": setting.kv_bits, "group_size": s.group_size,
                    "symmetric": s.symmetric, "quantized_params": stats["quantized_params"],
                    "mean_rel_error": stats["mean_rel_error"]})
    return {**record, "metrics": metrics, "history": history}


def run(cfg: QuantizeConfig, models: ModelsConfig, runtime: RuntimeConfig | None = None, *, model_dir: Path,
        out_dir: Path, calib_path: Path | None = None, calib_seq_len: int | None = None) -> StageResult:
    """Quantize the model at ``model_dir`` into ``out_dir/model`` (+ ``quantization.json``).

    ``calib_path``: the data stage's token file, or (with ``calib_seq_len``) a text file to tokenize; only the
    calibrated methods (GPTQ, OSTQuant) read it. With ``runtime.distributed`` asking for several processes, GPTQ
    calibrates data-parallel in ranks that torchrun starts (``llm_compress.worker`` running ``rank_main``); RTN and
    OSTQuant (its transforms are trained in one process) run here.
    """
    args = dict(model_dir=str(model_dir), out_dir=str(out_dir), calib_path=str(calib_path) if calib_path else None,
                calib_seq_len=calib_seq_len)
    if runtime is None or world_of(runtime) == 1 or cfg.scheme.method != "gptq" or calib_path is None:
        return run_rank(cfg, models, runtime, rank=None, **args)
    from llm_compress.distributed import launch

    return launch("llm_compress.quantize.apply:rank_main", runtime, out_dir, {"cfg": cfg, "models": models}, args,
                  [str(model_dir), str(out_dir), str(calib_path)])


def rank_main(spec: dict, rank) -> StageResult | None:
    """A rank of ``llm_compress.worker``: ``run_rank`` with the spec ``run`` wrote."""
    return run_rank(QuantizeConfig.model_validate(spec["cfg"]), ModelsConfig.model_validate(spec["models"]),
                    RuntimeConfig.model_validate(spec["runtime"]), rank=rank, **spec["args"])


def run_rank(cfg: QuantizeConfig, models: ModelsConfig, runtime: RuntimeConfig | None, *, rank, model_dir: str,
             out_dir: str, calib_path: str | None = None, calib_seq_len: int | None = None) -> StageResult | None:
    """The quantization in this process: all of it (``rank`` None), or one rank's share of GPTQ's calibration, of
    which rank 0 writes the model and returns the result (the other ranks return None)."""
    from llm_compress.distributed import devices
    from llm_compress.modeling import load_causal_lm, load_tokenizer, resolve_device, save_pretrained_atomic_into

    s = cfg.scheme
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    device = torch.device(rank.device) if rank else resolve_device(runtime.device if runtime else "cpu")
    seed = runtime.seed if runtime else 0
    if (Path(model_dir) / QUANT_FILE).is_file():
        raise InputError(f"quantize: {model_dir} is already quantized ({QUANT_FILE} is there); quantize the "
                         "full-precision model instead")
    dtype = "float32" if s.calibrated else models.dtype  # transforms and GPTQ solve in float32/64
    model = load_causal_lm(str(model_dir), dtype=dtype, device=device, what="quantize input")
    tok = load_tokenizer(str(model_dir))
    calib = None
    if calib_path and s.calibrated:
        calib = calibration_rows(Path(calib_path), s.calibration.samples, seed,
                                 tokenizer=tok if calib_seq_len else None, seq_len=calib_seq_len,
                                 text_field=s.calibration.text_field,
                                 vocab_size=model.get_input_embeddings().num_embeddings)
    codes: dict = {}
    record = apply(model, s, calib, seed=seed,
                   progress=bool(runtime and runtime.progress) and (rank is None or rank.main), codes=codes, rank=rank)
    compute = {"processes": rank.world, "devices": devices(rank)} if rank else None
    if rank is not None and not rank.main:
        return None
    metrics, history = record.pop("metrics"), record.pop("history")
    handle = getattr(model, "_fakequant_handle", None)
    if handle is not None:
        handle.remove()  # the weights are what is saved; restore() re-attaches from the record on load
    model.to(torch.device("cpu"))
    save_pretrained_atomic_into(model, tok, out_dir / "model")
    # Record the scheme next to the weights: what the model needs at run time besides them.
    # ... and the integer solution the weights are the dequantization of: what the packed exports ship
    save_codes(out_dir / "model", codes, record["w_bits"], s.group_size, s.symmetric)
    record["codes_file"] = CODES_FILE
    (out_dir / "model" / QUANT_FILE).write_text(json.dumps(record, indent=2))
    outputs = {"model": "model"}
    if history:
        (out_dir / "calibration.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        outputs["calibration"] = "calibration.jsonl"
    return StageResult(outputs=outputs, metrics=metrics, compute=compute)
