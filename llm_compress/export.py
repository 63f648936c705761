"""Export: write the final model in deployable formats, and prove each one loads back and matches.

Formats (each in ``out_dir/<format>/`` with the tokenizer beside it):

- ``safetensors``: the plain transformers checkpoint, float32 (a quantized model's dequantized weights).
- ``compressed-tensors``: the quantize stage's own integer codes, scales and zero points packed as
  compressed-tensors ``pack-quantized`` (:mod:`llm_compress.packed`), loadable by stock transformers and vLLM.
- ``bnb-nf4``: bitsandbytes 4-bit NormalFloat weights with double-quantized scales (QLoRA's format).
- ``bnb-int8``: bitsandbytes LLM.int8() weights (row-wise absmax int8, outlier columns in 16 bit). Both bnb
  formats re-quantize the weights on their own grids: of a quantized model they ship another rounding.
- ``onnx``: an ONNX graph exported by optimum, run with onnxruntime (with past key values inputs).
- ``onnx-int4`` / ``onnx-int8``: that graph with MatMulNBits nodes holding the quantize stage's 4- / 8-bit codes;
  for a model the quantize stage did not touch, onnxruntime's quantizers make them (MatMulNBits RTN blocks of 32,
  or dynamic int8 MatMulInteger).

With a KV-cache spec (the KV stage's ``kv_cache.json``), the formats a transformers user loads (safetensors,
bitsandbytes) carry a copy of it, and their reload check also greedy-generates a few tokens through
``llm_compress.kv.load_kv_cache(<format dir>, reloaded model)``; the ONNX formats carry none (ONNX Runtime runs the
graph's own past key values, not transformers caches), which their metrics say.

Each published format folder carries a model card, ``README.md`` (:mod:`llm_compress.card`): recipe, lineage,
measured quality and size, the teacher's license, and how to load it in two lines.

Every format is built in a temporary sibling directory, then loaded back *from disk* in a fresh
object and run on a fixed batch of token ids; its logits are compared with the source model's. A
format that fails to build or load back, or whose comparison misses its check (``ExportConfig.checks``), is
never published: its temporary directory is removed, so ``out_dir/<format>`` does not exist. It takes no other
format down: the rest are still built, checked and published, and the stage then fails with an
:class:`ExportError` naming every failed format (the runner publishes the stage folder with the formats that
passed and a manifest marked failed, which no cache serves).
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm_compress.card import write_card
from llm_compress.errors import ExportError, InputError
from llm_compress.export_support import ExportCheck, ExportConfig
from llm_compress.export_support import ONNX_FORMATS, onnx_export_problem
from llm_compress.io import atomic_dir, path_size
from llm_compress.kv.spec import KV_CACHE_JSON, read_spec
from llm_compress.modeling import (DTYPES, check_model_ref, free_device, load_causal_lm, load_tokenizer, resolve_device,
                                   vocab_size_of)
from llm_compress.quantize.codes import CODES_FILE, load_codes
from llm_compress.quantize.record import QUANT_FILE, mark_runtime_checkpoint, runtime_needs
from llm_compress.refs import model_config
from llm_compress.result import StageResult

FORMATS = ("safetensors", "compressed-tensors", "bnb-nf4", "bnb-int8", "onnx", "onnx-int8", "onnx-int4")
# loaded with transformers: they carry KV_CACHE_JSON
KV_FORMATS = ("safetensors", "compressed-tensors", "bnb-nf4", "bnb-int8")
NO_KV_REASON = "ONNX Runtime runs the graph's own past key values, not transformers caches"
KV_CHECK_TOKENS = 8  # tokens generated through the exported cache spec after a check row


# --------------------------------------------------------------------------------------------
# comparison


def check_batch(vocab: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Fixed check batch: [batch_size, seq_len] int64 ids drawn uniformly from [0, vocab) with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq_len), generator=g, dtype=torch.long)


def compare_logits(src: torch.Tensor, exp: torch.Tensor, chunk: int = 256) -> dict[str, float]:
    """How far ``exp`` logits are from ``src`` logits, both [B, T, V]; figures are plain floats.

    max_abs_diff / mean_abs_diff: over all B*T*V logits. top1_agreement: share of the B*T positions
    whose argmax is the same. kl: mean over positions of KL(src || exp), computed in float64, ``chunk`` positions
    at a time (thousands of check tokens x a 150k vocabulary would be gigabytes at once).
    """
    if src.shape != exp.shape:
        raise ExportError(f"logits shape {tuple(exp.shape)} differs from the source's {tuple(src.shape)}")
    src, exp = src.flatten(0, -2), exp.flatten(0, -2)  # [N, V], N = B*T positions
    n = src.shape[0]
    dmax, dsum, agree, kl = 0.0, 0.0, 0, 0.0
    for i in range(0, n, chunk):
        p, q = src[i:i + chunk].double(), exp[i:i + chunk].double()  # [c, V]
        diff = (q - p).abs()
        dmax, dsum = max(dmax, float(diff.max())), dsum + float(diff.sum())
        agree += int((q.argmax(-1) == p.argmax(-1)).sum())
        logp, logq = F.log_softmax(p, -1), F.log_softmax(q, -1)
        kl += float((logp.exp() * (logp - logq)).sum())  # summed over V and the chunk's positions
    if any(x != x for x in (dmax, dsum)):  # max() drops NaN comparisons: keep a NaN diff visible
        dmax = float("nan")
    return {"max_abs_diff": dmax, "mean_abs_diff": dsum / src.numel(), "top1_agreement": agree / n, "kl": kl / n}


def check_failures(m: dict[str, float], check: ExportCheck) -> list[str]:
    """The limits ``m`` misses, as readable phrases; empty when it passes. NaN figures always fail."""
    out = []
    lim = check.max_abs_diff
    if lim is not None and not m["max_abs_diff"] <= lim:  # `not <=` so a NaN diff fails
        out.append(f"max_abs_diff {m['max_abs_diff']:.4g} exceeds the limit {lim:.4g}")
    lim = check.min_top1_agreement
    if lim is not None and not m["top1_agreement"] >= lim:
        out.append(f"top1_agreement {m['top1_agreement']:.4f} is below the minimum {lim:.4f}")
    lim = check.max_kl
    if lim is not None and not m["kl"] <= lim:
        out.append(f"kl {m['kl']:.4g} exceeds the limit {lim:.4g}")
    if not all(abs(m[k]) < float("inf") for k in ("max_abs_diff", "mean_abs_diff", "kl")):
        out.append("the exported logits hold NaN or inf")
    return out


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] float32 on CPU of a transformers causal LM for ids [B, T], no padding, no cache."""
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float().cpu()


def kv_files(kv_spec: Path) -> list[str]:
    """The files a ``kv_cache.json`` names next to itself (CSKV's factors), by name."""
    spec = read_spec(kv_spec)
    return [spec["factors"]["file"]] if "factors" in spec else []


@torch.no_grad()
def kv_generate_check(model, folder: Path, ids: torch.Tensor) -> dict[str, Any]:
    """Greedy-generate ``KV_CHECK_TOKENS`` tokens after the first check row [1, T], through
    ``load_kv_cache(folder, model)`` and through the full cache; raises ExportError if the cached run does not
    produce them. Returns the run's figures (top-1 agreement: share of generated tokens equal to the full cache's)."""
    from llm_compress.kv import load_kv_cache

    prompt = ids[:1].to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=KV_CHECK_TOKENS, min_new_tokens=KV_CHECK_TOKENS, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(prompt))
    cache = load_kv_cache(folder, model)
    new = model.generate(prompt, past_key_values=cache, **kwargs)[:, prompt.shape[1]:]  # [1, KV_CHECK_TOKENS]
    if new.shape[1] != KV_CHECK_TOKENS:
        raise ExportError(f"generated {new.shape[1]} tokens through its {KV_CACHE_JSON}, not {KV_CHECK_TOKENS}")
    full = model.generate(prompt, **kwargs)[:, prompt.shape[1]:]
    return {"file": KV_CACHE_JSON, "method": cache.spec["method"], "generated_tokens": KV_CHECK_TOKENS,
            "cache_tokens": int(cache.get_seq_length()), "cache_bytes": int(cache.nbytes()),
            "top1_agreement_with_full_cache": float((new == full).float().mean())}


# --------------------------------------------------------------------------------------------
# formats: each builds the export into `dst` and returns (a loader of a fresh object from `dst`,
# a function (model, ids [B, T]) -> logits [B, T, V] float32 on CPU, extra metrics)


def _build_safetensors(src_model, model_dir: Path, dst: Path, device: torch.device, dtype: torch.dtype):
    # The source model is already loaded (float32): saving it is the export, with the quantization record
    # that load_causal_lm uses to re-create its run-time parts (online Hadamard, activation/KV bits).
    src_model.save_pretrained(dst, safe_serialization=True)
    if (model_dir / QUANT_FILE).is_file():
        shutil.copy2(model_dir / QUANT_FILE, dst / QUANT_FILE)
    needs = runtime_needs(model_dir)
    if needs:  # stock from_pretrained / vLLM would run it without them: make them refuse it, naming our loader
        mark_runtime_checkpoint(dst, needs)

    def load():
        return load_causal_lm(str(dst), device=device, what="exported safetensors model")

    return load, hf_logits, {}


def _bnb_config(fmt: str, device: torch.device):
    from transformers import BitsAndBytesConfig

    if fmt == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # NF4 matmuls dequantize to the compute dtype: bf16 on GPUs; CPU kernels want float32.
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=True)


def _build_bnb(fmt: str):
    def build(src_model, model_dir: Path, dst: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        # bitsandbytes quantizes while loading: Linear layers (but lm_head) become Linear4bit /
        # Linear8bitLt; saving writes the packed weights and their scales as safetensors, and the
        # quantization_config into config.json, so a plain from_pretrained reloads it quantized.
        # dtype is explicit: left unset, the bitsandbytes loader puts the layers it does not quantize
        # (embeddings, norms, lm_head) in float16, and the check would measure that cast too.
        device_map = str(device)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), quantization_config=_bnb_config(fmt, device), device_map=device_map,
            dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
        model.save_pretrained(dst, safe_serialization=True)
        del model
        free_device(device)

        def load():
            return AutoModelForCausalLM.from_pretrained(
                str(dst), device_map=device_map, dtype=torch.float32, use_safetensors=True,
                trust_remote_code=False).eval()

        weights = ("re-quantized by bitsandbytes from the quantize stage's dequantized weights (not its codes)"
                   if (model_dir / CODES_FILE).is_file() else "quantized by bitsandbytes")
        return load, hf_logits, {"weights": weights}

    return build


def _ort_provider(device: torch.device) -> str:
    import onnxruntime

    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def _build_onnx(src_model, model_dir: Path, dst: Path, device: torch.device, dtype: torch.dtype = None):
    from optimum.onnxruntime import ORTModelForCausalLM

    # Exported with past key values (a decoder that also takes/returns the KV cache), so the
    # artifact serves generation; optimum feeds empty past tensors on a first, cache-less call.
    use_cache = True
    with warnings.catch_warnings():  # the tracer warns about every shape-dependent Python branch
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ort = ORTModelForCausalLM.from_pretrained(str(model_dir), export=True, use_cache=use_cache,
                                                  trust_remote_code=False)
    ort.save_pretrained(dst)
    del ort
    provider = _ort_provider(device)

    def load():
        return ORTModelForCausalLM.from_pretrained(str(dst), provider=provider, use_cache=use_cache)

    @torch.no_grad()
    def logits(model, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(model.device)  # with the CUDA provider optimum binds torch CUDA tensors
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.logits.float().cpu()  # [B, T, V]

    files = sorted(f.name for f in dst.iterdir() if ".onnx" in f.name)  # model.onnx (+ model.onnx_data)
    return load, logits, {"onnx_files": files, "provider": provider, "with_past": use_cache}


def _build_onnx_quantized(bits: int):
    """ONNX with really low-bit weights, built on the float32 ONNX export.

    A model with the quantize stage's codes (:mod:`llm_compress.quantize.codes`, at ``bits`` bits: validation checks
    it): each quantized Linear's MatMul becomes a MatMulNBits holding those codes, scales and zero points
    (:func:`llm_compress.packed.replace_matmuls`), so the graph computes the quantized model itself. A model without
    codes is quantized afresh by onnxruntime: int4 with ``MatMulNBitsQuantizer`` (blockwise symmetric, blocks of
    32), int8 with ``quantize_dynamic`` (per-channel int8 weights, activations quantized at run time,
    MatMulInteger). Embedding gathers and lm_head stay float32.
    """
    def build(src_model, model_dir: Path, dst: Path, device: torch.device, dtype: torch.dtype):
        import tempfile

        import onnx

        codes = load_codes(model_dir)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".onnx-fp32-") as tmp:
            load, logits, extra = _build_onnx(src_model, model_dir, Path(tmp), device)
            for f in Path(tmp).iterdir():  # config, generation config: everything but the float32 graph
                if ".onnx" not in f.name:
                    shutil.copy2(f, dst / f.name)
            src = Path(tmp) / "model.onnx"
            big = path_size(Path(tmp)) > 1.8e9  # protobuf's 2 GB limit: keep weights in a side file
            if codes is not None:
                from llm_compress.packed import replace_matmuls, verify_matmulnbits

                if codes.bits != bits:
                    raise ExportError(f"the quantize stage's codes are {codes.bits}-bit, not {bits}-bit")
                graph = onnx.load(str(src))
                replaced = replace_matmuls(graph, codes)
                onnx.save_model(graph, str(dst / "model.onnx"), save_as_external_data=big,
                                location="model.onnx_data" if big else None)
                extra["weights"] = f"the quantize stage's {bits}-bit codes ({len(replaced)} MatMulNBits)"
                extra["codes_verified"] = verify_matmulnbits(onnx.load(str(dst / "model.onnx")), codes)
            elif bits == 4:
                from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

                q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
                q.process()
                q.model.save_model_to_file(str(dst / "model.onnx"), use_external_data_format=big)
                extra["weights"] = "quantized by onnxruntime (RTN, blocks of 32): the model had no codes"
            else:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(src, dst / "model.onnx", weight_type=QuantType.QInt8, per_channel=True,
                                 use_external_data_format=big)
                extra["weights"] = "quantized by onnxruntime (dynamic int8, W8A8): the model had no codes"
        ops = sorted({n.op_type for n in onnx.load(str(dst / "model.onnx"), load_external_data=False).graph.node
                      if n.op_type in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear")})
        files = sorted(f.name for f in dst.iterdir() if ".onnx" in f.name)
        provider = _ort_provider(device)

        def load_q():
            from optimum.onnxruntime import ORTModelForCausalLM

            return ORTModelForCausalLM.from_pretrained(str(dst), provider=provider, use_cache=True)

        return load_q, logits, {**extra, "onnx_files": files, "quantized_ops": ops, "weight_bits": bits,
                                "from_codes": codes is not None}

    return build


def _build_compressed_tensors(src_model, model_dir: Path, dst: Path, device: torch.device, dtype: torch.dtype):
    """compressed-tensors ``pack-quantized``: the quantize stage's codes packed as they are
    (:mod:`llm_compress.packed`), the rest of the model dense in the recipe's dtype; reloaded with stock transformers
    (``from_pretrained``, the ``compressed-tensors`` package unpacks it)."""
    from transformers import AutoModelForCausalLM

    from llm_compress.packed import verify_compressed_tensors, write_compressed_tensors

    codes = load_codes(model_dir)
    if codes is None:
        raise ExportError(f"{model_dir} has no {CODES_FILE}: compressed-tensors packs the quantize stage's codes")
    sizes = write_compressed_tensors(src_model, codes, dst, dtype)
    sizes["codes_verified"] = verify_compressed_tensors(dst, codes, dtype)  # read back: the codes, bit for bit

    def load():
        return AutoModelForCausalLM.from_pretrained(str(dst), dtype=dtype, device_map=str(device),
                                                    use_safetensors=True, trust_remote_code=False).eval()

    return load, hf_logits, {**sizes, "weight_bits": codes.bits, "group_size": codes.group_size,
                             "symmetric": codes.symmetric, "packed_layers": len(codes.layers), "from_codes": True,
                             "dtype": str(dtype).removeprefix("torch.")}


BUILDERS: dict[str, Callable] = {
    "safetensors": _build_safetensors,
    "compressed-tensors": _build_compressed_tensors,
    "bnb-nf4": _build_bnb("bnb-nf4"),
    "bnb-int8": _build_bnb("bnb-int8"),
    "onnx": _build_onnx,
    "onnx-int8": _build_onnx_quantized(8),
    "onnx-int4": _build_onnx_quantized(4),
}


# --------------------------------------------------------------------------------------------
# the stage


def _check_ids(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise InputError(f"export: check_ids must be a 2-D tensor [batch, seq_len], got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"export: check_ids must hold integer token ids, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"export: check_ids range [{lo}, {hi}] is outside the model's vocabulary [0, {vocab})")
    return ids.long().cpu()


def _export_one(fmt: str, src_model, tok, model_dir: Path, dst: Path, ids: torch.Tensor, ref: torch.Tensor,
                device: torch.device, kv_spec: Path | None = None,
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Build ``fmt`` into ``dst`` with the tokenizer (and ``kv_spec`` where it applies), reload it from disk, and
    measure it against ``ref``."""
    t0 = time.perf_counter()
    with_kv = kv_spec is not None and fmt in KV_FORMATS
    beside = kv_files(kv_spec) if with_kv else []  # what the spec reads next to it (CSKV's factors)
    try:
        load, logits_of, extra = BUILDERS[fmt](src_model, model_dir, dst, device, dtype)
        tok.save_pretrained(dst)
        if with_kv:
            shutil.copy2(kv_spec, dst / KV_CACHE_JSON)
            for extra_file in beside:
                shutil.copy2(kv_spec.parent / extra_file, dst / extra_file)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = load()  # a fresh object read from dst, not the one that wrote it
        load_s = time.perf_counter() - t0
        out = logits_of(model, ids)  # [B, T, V] float32
    except Exception as e:  # noqa: BLE001 - any failure to build or reload is this format's failure
        raise ExportError(f"export {fmt}: could not build it or load it back: {type(e).__name__}: {e}") from e
    no_kv = NO_KV_REASON
    if beside:  # factors fitted for one model's weights (CSKV): a format that changes them (bnb) ships without
        from llm_compress.kv.spec import check_against_model  # the cache

        try:
            check_against_model(read_spec(dst), model)
        except InputError as e:
            with_kv, no_kv = False, f"not carried: {e}"
            for name in (KV_CACHE_JSON, *beside):
                (dst / name).unlink()
    try:
        kv_check = kv_generate_check(model, dst, ids) if with_kv else None
    except Exception as e:  # noqa: BLE001 - the reloaded model must generate through the cache it ships with
        raise ExportError(f"export {fmt}: could not generate through its kv_cache.json: {type(e).__name__}: "
                          f"{e}") from e
    finally:
        del model
        free_device(device)
    try:
        m: dict[str, Any] = compare_logits(ref, out)
    except ExportError as e:
        raise ExportError(f"export {fmt}: {e}") from None
    m.update(bytes=path_size(dst), build_seconds=round(build_s, 3), load_seconds=round(load_s, 3),
             check_tokens=int(ids.numel()), **extra)
    if kv_spec is not None:
        m["kv_cache"] = kv_check or {"file": None, "reason": no_kv}
    return m


def run_export(cfg: ExportConfig, model_dir: Path, out_dir: Path, *, check_ids: torch.Tensor | None = None,
               seed: int = 0, device: str = "cpu", progress: bool = True, kv_spec: Path | None = None,
               card: dict | None = None, dtype: str = "float32") -> StageResult:
    """Write ``model_dir`` in each of ``cfg.formats`` to ``out_dir/<format>/``, each checked after a reload;
    with ``kv_spec`` (a ``kv_cache.json``) the transformers formats carry it and are checked generating with it.
    Each published folder carries a model card (``README.md``, :mod:`llm_compress.card`) from ``card`` (its facts:
    lineage, evaluate's figures, the teacher's license) and the format's own figures.
    Metrics: one dict per format, and ``failed``, the formats that failed (empty when this returns).

    Raises InputError for a missing or unloadable ``model_dir`` (or bad ``check_ids``). Each format stands alone:
    one that fails to build, load back, or match the source within ``cfg.checks[format]`` is not published
    (``out_dir/<format>`` is absent) and its metrics hold ``passed: False`` and its ``error``; the other formats
    are still built, checked and published. If any failed, ExportError is raised once all are done, naming each
    failure; its ``partial`` (a StageResult: the published formats' outputs and every format's metrics) is what
    :func:`llm_compress.runner.execute` publishes as a failed stage, never cached.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model_ref(str(model_dir), "export: model")
    needs = runtime_needs(model_dir)
    others = [f for f in cfg.formats if f != "safetensors"]
    if needs and others:
        raise ExportError(f"export {', '.join(others)}: {model_dir} needs at run time {needs}, which only this "
                          "project's loader re-creates; export it as safetensors only, or quantize without "
                          "an online Hadamard and with A16/KV16 (see quantize.scheme)")
    facts = {**(card or {"model_dir": str(model_dir)}), "runtime_needs": needs}
    dev = resolve_device(device)
    formats = list(dict.fromkeys(cfg.formats))  # keep order, drop repeats
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer(str(model_dir), what="export: tokenizer")
    src_model = load_causal_lm(str(model_dir), device=dev, what="export: model")
    vocab = min(len(tok), vocab_size_of(src_model))  # ids the tokenizer can make and the model embeds
    if check_ids is None:
        ids = check_batch(vocab, cfg.check_batch_size, cfg.check_seq_len, seed)  # [B, T]
    else:
        ids = _check_ids(check_ids, vocab_size_of(src_model))  # [B, T]
    ref = hf_logits(src_model, ids)  # [B, T, V] float32, the reference every format is held to

    outputs: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    failed: list[str] = []
    with tqdm(formats, desc="export", unit="format", disable=not progress) as bar:
        for fmt in bar:
            bar.set_postfix_str(fmt)
            try:
                metrics[fmt] = _publish_one(fmt, cfg, src_model, tok, model_dir, out_dir, ids, ref, dev, kv_spec,
                                            facts, DTYPES[dtype])
                outputs[fmt] = str(out_dir / fmt)
            except ExportError as e:  # this format only: the others are still built, checked and published
                metrics[fmt] = {**getattr(e, "figures", {}), "passed": False, "error": str(e)}
                failed.append(fmt)
    del src_model
    free_device(dev)
    metrics["failed"] = failed
    result = StageResult(outputs=outputs, metrics=metrics)
    if failed:
        err = ExportError(f"export: {len(failed)} of {len(formats)} formats failed, not published: "
                          + "; ".join(metrics[f]["error"] for f in failed)
                          + f" (published: {', '.join(outputs) or 'none'})")
        err.metrics, err.partial = metrics, result  # the runner publishes the formats that passed, as a failed stage
        raise err
    return result


def _publish_one(fmt: str, cfg: ExportConfig, src_model, tok, model_dir: Path, out_dir: Path, ids: torch.Tensor,
                 ref: torch.Tensor, dev: torch.device, kv_spec: Path | None, facts: dict,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Export, reload and check one format, and publish it as ``out_dir/<fmt>`` with its model card (from
    ``facts``) if it passes; its metrics.

    Raises ExportError (with the figures measured so far as ``.figures``) when it fails: nothing is published then,
    and an older ``out_dir/<fmt>`` is left as it was."""
    why = onnx_export_problem(model_config(str(model_dir))) if fmt in ONNX_FORMATS else None
    if why:  # validation refuses it when it can read the config up front; this catches the rest
        raise ExportError(f"export {fmt}: {model_dir} cannot be exported to ONNX correctly: {why}")
    with atomic_dir(out_dir / fmt) as tmp:  # an exception inside removes tmp: nothing is published
        m = _export_one(fmt, src_model, tok, model_dir, tmp, ids, ref, dev, kv_spec, dtype)
        # the builder says whether it shipped the codes; the ONNX graphs compute in float32 whatever the recipe's
        # dtype, compressed-tensors in that dtype
        check = cfg.check_for(fmt, bool(m.get("from_codes")), float32=fmt.startswith("onnx") or dtype == torch.float32)
        failures = check_failures(m, check)
        m.update(passed=not failures, limit_max_abs_diff=check.max_abs_diff,
                 limit_min_top1_agreement=check.min_top1_agreement, limit_max_kl=check.max_kl)
        if failures:
            err = ExportError(f"export {fmt}: the reloaded export does not match the source model on "
                              f"{ids.shape[0]}x{ids.shape[1]} check tokens: {'; '.join(failures)}")
            err.figures = m
            raise err
        write_card(tmp, fmt, m, facts)  # in the temporary folder: published with the rest, or not at all
    return m
