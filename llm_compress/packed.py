"""Packed low-bit exports made from the quantizer's own codes (:mod:`llm_compress.quantize.codes`), never re-rounded.

Two layouts, one source: the integer codes q, scales s and zero points z that GPTQ / RTN / OSTQuant's weight
quantizer chose for each Linear W [N = out, K = in], with W = (q - z) * s per group of G input columns.

compressed-tensors ``pack-quantized`` (what llm-compressor writes; transformers loads it with the
``compressed-tensors`` package, vLLM serves it with its Marlin / Machete kernels), per quantized Linear:
    weight_packed      int32 [N, ceil(K / (32 / b))]   signed codes + 2^(b-1), LSB first along K
    weight_scale       [N, K / G] (or [N, 1] per channel), in the checkpoint's dtype
    weight_zero_point  int32 [ceil(N / (32 / b)), K / G], asymmetric only: signed zero + 2^(b-1), packed along N
    weight_shape       int64 [2] = [N, K]
and ``quantization_config`` in config.json (status "compressed", so the loader packs its empty model before reading
the tensors). The packing is compressed-tensors' own ``pack_to_int32``.

ONNX Runtime ``MatMulNBits`` (com.microsoft; b = 4 or 8), replacing each quantized Linear's MatMul in a float graph:
    B           uint8 [N, K / bs, bs * b / 8]   unsigned codes along K, first value in the low bits
    scales      float32 [N, K / bs]
    zero_points uint8 [N, ceil((K / bs) * b / 8)]  asymmetric only (absent: 2^(b-1), the symmetric codes' offset)
with the block size bs = G, or for per-channel codes a power of two dividing K with the row's scale repeated (exact).
No ``accuracy_level`` attribute: the activations stay float (level 4 would quantize them to int8).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_compress.errors import ExportError
from llm_compress.quantize.codes import Codes, LayerCodes

CT_METHOD = "compressed-tensors"


# --------------------------------------------------------------------------------------------
# compressed-tensors


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' codes are signed int8 in [-2^(b-1), 2^(b-1) - 1]: asymmetric (uint8) codes shift down."""
    if codes.dtype == torch.int8:
        return codes
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def ct_quantization_config(codes: Codes) -> dict:
    """The ``quantization_config`` block of config.json for weight-only integer codes (no preset names: explicit
    arguments, the same in every compressed-tensors version that loads them)."""
    import compressed_tensors

    weights = {"num_bits": codes.bits, "type": "int", "symmetric": codes.symmetric,
               "strategy": "group" if codes.group_size else "channel", "group_size": codes.group_size,
               "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": CT_METHOD, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": sorted(codes.layers), "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": "pack-quantized"}},
            "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "version": compressed_tensors.__version__}


def ct_tensors(model, codes: Codes, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: each quantized Linear as packed codes + scale (+ zero point) + shape, the rest of
    the model dense in ``dtype``. Checks that every coded layer is a Linear of the model with the codes' shape."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding: stored once, re-tied on load
    out: dict[str, torch.Tensor] = {}
    for name, lc in codes.layers.items():
        w = state.pop(f"{name}.weight", None)
        if w is None or tuple(w.shape) != tuple(lc.codes.shape):
            raise ExportError(f"compressed-tensors: the codes of {name} ({tuple(lc.codes.shape)}) do not belong to a "
                              f"Linear weight of the model ({None if w is None else tuple(w.shape)})")
        out[f"{name}.weight_packed"] = pack_to_int32(_signed(lc.codes, codes.bits), codes.bits, packed_dim=1)
        out[f"{name}.weight_scale"] = lc.scale.to(dtype)
        if lc.zero is not None:
            out[f"{name}.weight_zero_point"] = pack_to_int32(_signed(lc.zero, codes.bits), codes.bits, packed_dim=0)
        out[f"{name}.weight_shape"] = torch.tensor(lc.codes.shape, dtype=torch.int64)
    for k, v in state.items():
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return {k: v.contiguous() for k, v in out.items()}


def write_compressed_tensors(model, codes: Codes, dst: Path, dtype: torch.dtype) -> dict:
    """Write ``model`` with its quantized Linears as ``codes`` into ``dst`` (config.json, model.safetensors,
    generation config); returns the byte counts of the quantized layers packed and in float32."""
    from safetensors.torch import save_file

    tensors = ct_tensors(model, codes, dtype)
    config = model.config.to_dict()
    config["quantization_config"] = ct_quantization_config(codes)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.pop("dtype", None)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dst)
    prefixes = tuple(f"{n}.weight_" for n in codes.layers)  # weight_packed, _scale, _zero_point, _shape
    packed = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(prefixes))
    dense32 = sum(lc.codes.numel() * 4 for lc in codes.layers.values())
    return {"quantized_layer_bytes": int(packed), "quantized_layer_float32_bytes": int(dense32),
            "quantized_layer_size_ratio": round(packed / dense32, 4)}


def verify_compressed_tensors(dst: Path, codes: Codes, dtype: torch.dtype) -> int:
    """Read the written checkpoint back and unpack every layer with compressed-tensors' own unpacker: raise
    ExportError unless its codes and zero points are ``codes``' and its scales theirs in ``dtype``; returns the
    number of layers checked."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        for name, lc in codes.layers.items():
            shape = torch.Size(f.get_tensor(f"{name}.weight_shape").tolist())
            q = unpack_from_int32(f.get_tensor(f"{name}.weight_packed"), codes.bits, shape)
            ok = torch.equal(q, _signed(lc.codes, codes.bits))
            ok = ok and torch.equal(f.get_tensor(f"{name}.weight_scale"), lc.scale.to(dtype))
            if lc.zero is not None:
                z = unpack_from_int32(f.get_tensor(f"{name}.weight_zero_point"), codes.bits, lc.zero.shape, 0)
                ok = ok and torch.equal(z, _signed(lc.zero, codes.bits))
            if not ok:
                raise ExportError(f"compressed-tensors: {name} on disk does not hold the quantize stage's codes")
    return len(codes.layers)


# --------------------------------------------------------------------------------------------
# ONNX Runtime MatMulNBits


def block_size_for(codes: Codes, k: int) -> int:
    """MatMulNBits' block size: the group size, or for per-channel codes the largest power of two <= 128 that
    divides K (the channel's scale repeated over its blocks). Must be a power of two >= 16."""
    if codes.group_size is not None:
        if codes.group_size < 16:
            raise ExportError(f"MatMulNBits needs blocks of at least 16 input columns; the codes have groups of "
                              f"{codes.group_size} (quantize with group_size >= 16, or per channel)")
        return codes.group_size
    for bs in (128, 64, 32, 16):
        if k % bs == 0:
            return bs
    raise ExportError(f"MatMulNBits: no block size in 16..128 divides the input size {k} of a per-channel layer")


def _pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes u [..., n] (n * bits a multiple of 8) into uint8 [..., n * bits / 8], the first value
    in the low bits of each byte."""
    per = 8 // bits
    u = u.to(torch.int32).reshape(*u.shape[:-1], u.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (u << shifts).sum(-1).to(torch.uint8)


def _unpack_rows(b: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`_pack_rows`: uint8 bytes [n, ...] -> unsigned codes int16 [n, m]."""
    b = b.to(torch.int16)
    return torch.stack([(b >> (bits * j)) & ((1 << bits) - 1) for j in range(8 // bits)], -1).reshape(n, -1)


def _unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """MatMulNBits' unsigned codes (int16): symmetric (int8) codes shift up by 2^(b-1), its default zero point."""
    return codes.to(torch.int16) + ((1 << (bits - 1)) if codes.dtype == torch.int8 else 0)


def matmulnbits_inputs(lc: LayerCodes, codes: Codes) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """B, scales (and zero points) of one layer, and the node's attributes."""
    bits = codes.bits
    if bits not in (4, 8):
        raise ExportError(f"MatMulNBits from codes supports 4- and 8-bit codes here, not {bits}")
    n, k = lc.codes.shape
    bs = block_size_for(codes, k)
    blocks = k // bs
    u = _unsigned(lc.codes, bits)
    rep = blocks // lc.scale.shape[1]  # 1 for group codes (bs = G); K / bs per channel
    b = _pack_rows(u.reshape(n, blocks, bs), bits)  # [N, blocks, bs * bits / 8]
    out = {"B": b, "scales": lc.scale.repeat_interleave(rep, dim=1).float().contiguous()}  # [N, blocks]
    if lc.zero is not None:
        z = lc.zero.repeat_interleave(rep, dim=1).to(torch.int16)  # [N, blocks]
        per = 8 // bits
        pad = (-blocks) % per
        out["zero_points"] = _pack_rows(torch.nn.functional.pad(z, (0, pad)), bits)  # [N, ceil(blocks*bits/8)]
    return out, {"K": k, "N": n, "bits": bits, "block_size": bs}


def _linear_name(node_name: str) -> str:
    """``/model/layers.0/self_attn/q_proj/MatMul`` -> ``model.layers.0.self_attn.q_proj`` (the exporter names
    nodes by module scope)."""
    return node_name.strip("/").rsplit("/", 1)[0].replace("/", ".")


def replace_matmuls(onnx_model, codes: Codes) -> list[str]:
    """Replace, in place, every MatMul of ``onnx_model`` whose weight is a coded Linear by a MatMulNBits built from
    its codes; returns the replaced Linear names. Each one's float weight initializer [K, N] must equal the codes'
    dequantization (transposed), which proves the node-to-layer mapping; every coded layer must be found."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    done: list[str] = []
    new_nodes = []
    for node in graph.node:
        name = _linear_name(node.name) if node.op_type == "MatMul" else None
        lc = codes.layers.get(name) if name else None
        if lc is None or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])  # [K, N]
        ref = lc.dequantize().t().numpy()
        if w.shape != ref.shape or not np.allclose(w, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max())):
            raise ExportError(f"onnx: the MatMul {node.name} does not carry the dequantized codes of {name}")
        tensors, attrs = matmulnbits_inputs(lc, codes)
        prefix = f"{name}.nbits"
        inputs = [node.input[0]]
        for key in ("B", "scales", "zero_points"):
            if key in tensors:
                graph.initializer.append(numpy_helper.from_array(tensors[key].numpy(), f"{prefix}.{key}"))
                inputs.append(f"{prefix}.{key}")
        new_nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}NBits",
                                          domain="com.microsoft", **attrs))
        users[node.input[1]] -= 1
        if users[node.input[1]] == 0:  # the float weight is gone from the graph
            graph.initializer.remove(inits[node.input[1]])
        done.append(name)
    missing = sorted(set(codes.layers) - set(done))
    if missing:
        raise ExportError(f"onnx: no MatMul found for {len(missing)} coded layers (e.g. {missing[0]}); the graph's "
                          "node names do not follow the model's modules")
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def verify_matmulnbits(onnx_model, codes: Codes) -> int:
    """Decode every MatMulNBits of ``onnx_model`` (as read back from disk) into unsigned codes and zero points and
    raise ExportError unless they are the quantize stage's; returns the number of layers checked."""
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx_model.graph.initializer}
    seen = 0
    for node in onnx_model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        name = _linear_name(node.name.removesuffix("NBits"))
        lc = codes.layers[name]
        attrs = {a.name: a.i for a in node.attribute}
        bits, n = attrs["bits"], attrs["N"]
        def init(i: int) -> torch.Tensor:
            return torch.tensor(numpy_helper.to_array(inits[node.input[i]]))

        u = _unpack_rows(init(1), bits, n)  # [N, K] from B [N, blocks, blob]
        scales = init(2)  # [N, blocks]
        rep = scales.shape[1] // lc.scale.shape[1]
        ok = torch.equal(u, _unsigned(lc.codes, bits)) and torch.equal(scales, lc.scale.repeat_interleave(rep, dim=1))
        if lc.zero is not None:
            z = _unpack_rows(init(3), bits, n)[:, : scales.shape[1]]  # [N, blocks], the row's padding dropped
            ok = ok and torch.equal(z, lc.zero.repeat_interleave(rep, dim=1).to(torch.int16))
        if not ok:
            raise ExportError(f"onnx: the MatMulNBits of {name} does not hold the quantize stage's codes")
        seen += 1
    if seen != len(codes.layers):
        raise ExportError(f"onnx: {seen} MatMulNBits for {len(codes.layers)} coded layers")
    return seen
