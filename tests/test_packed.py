"""Packed exports that keep the quantizer's codes: the codes file, compressed-tensors reloaded by stock transformers
in a process that never imports this project, ONNX MatMulNBits built from the codes, and checks that a re-rounded
export fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_compress.config import parse_recipe
from llm_compress.errors import RecipeError
from llm_compress.export import check_batch, check_failures, compare_logits, run_export
from llm_compress.export_support import FROM_CODES_CHECK, ExportConfig
from llm_compress.modeling import load_causal_lm
from llm_compress.quantize.codes import CODES_FILE, load_codes
from llm_compress.quantize.config import QuantizeConfig
from llm_compress.schema import ModelsConfig, RuntimeConfig

from tests.test_export import _tokenizer

SEED = 0


def _tiny_float(d: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _quantized(tmp: Path, scheme: dict) -> Path:
    """The quantize stage's model folder (fake-quantized weights + quantization.json + quant_codes.safetensors)."""
    from llm_compress.data import save_tokens
    from llm_compress.quantize.apply import run

    src = _tiny_float(tmp / "float")
    calib = tmp / "calib.safetensors"
    save_tokens(check_batch(320, 8, 32, 2), calib)  # [8, 32] calibration rows for GPTQ / OSTQuant
    run(QuantizeConfig(scheme=scheme), ModelsConfig(), RuntimeConfig(device="cpu", progress=False), model_dir=src,
        out_dir=tmp / "q", calib_path=calib)
    return tmp / "q" / "model"


@pytest.fixture(scope="module")
def w4(tmp_path_factory) -> Path:
    """RTN W4A16, asymmetric, groups of 32: codes with zero points, so both packings of zeros are exercised."""
    return _quantized(tmp_path_factory.mktemp("w4"), {"method": "rtn", "setting": "W4A16", "group_size": 32,
                                                       "symmetric": False})


@pytest.fixture(scope="module")
def ids(w4) -> torch.Tensor:
    return check_batch(320, 4, 64, 1)  # [4, 64]: 256 check tokens


def test_codes_file_holds_the_integers_the_weights_are_made_of(w4):
    codes = load_codes(w4)
    assert (codes.bits, codes.group_size, codes.symmetric) == (4, 32, False)
    model = load_causal_lm(str(w4))
    weights = dict(model.named_parameters())
    assert len(codes.layers) == 14  # 7 Linears per layer, lm_head skipped
    for name, lc in codes.layers.items():
        assert lc.codes.dtype == torch.uint8 and int(lc.codes.max()) <= 15
        assert lc.scale.shape == (lc.codes.shape[0], lc.codes.shape[1] // 32) and lc.zero.shape == lc.scale.shape
        assert torch.equal(lc.dequantize(), weights[f"{name}.weight"])  # bit-exact: no second rounding anywhere
    assert json.loads((w4 / "quantization.json").read_text())["codes_file"] == CODES_FILE


def test_gptq_codes_are_the_solution_it_returns():
    from llm_compress.quantize.gptq import gptq_solve

    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(256, 64)
    for sym, group in ((True, 16), (False, None)):
        res = gptq_solve(w, 2 * x.t() @ x / len(x), 4, group, sym, act_order=True)
        assert res.codes.dtype == (torch.int8 if sym else torch.uint8)
        g = res.scale.shape[1]
        q = res.codes.float().reshape(16, g, 64 // g)
        assert torch.equal(((q - res.zero) * res.scale).reshape(16, 64), res.weight)


_STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
assert not [m for m in sys.modules if m.split(".")[0] in ("stages", "flows")]
print(type(model.model.layers[0].mlp.up_proj).__name__)
"""


@pytest.mark.slow  # a subprocess imports transformers and compressed-tensors
def test_compressed_tensors_reloads_in_stock_transformers_as_the_quantized_model(w4, ids, tmp_path):
    res = run_export(ExportConfig(formats=["compressed-tensors"]), w4, tmp_path, check_ids=ids, progress=False)
    d = tmp_path / "compressed-tensors"
    m = res.metrics["compressed-tensors"]
    assert m["passed"] and m["from_codes"] and m["limit_max_kl"] == FROM_CODES_CHECK.max_kl
    assert m["codes_verified"] == 14  # every layer unpacked from disk by compressed-tensors equals the codes
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["format"], cfg["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed")
    assert cfg["config_groups"]["group_0"]["weights"]["group_size"] == 32
    # the bits say it: 4-bit codes + a scale and a packed zero point per 32 weights, vs float32
    assert m["quantized_layer_size_ratio"] <= 0.3

    card = (d / "README.md").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("compressed-tensors", dtype="auto")' in card
    assert "vllm serve compressed-tensors" in card
    # a process that does not import this project: plain from_pretrained, compressed-tensors unpacks the codes
    torch.save(ids, tmp_path / "ids.pt")
    out = subprocess.run([sys.executable, "-c", _STOCK, str(d), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = load_causal_lm(str(w4))(input_ids=ids).logits.detach()
    figures = compare_logits(ref, torch.load(tmp_path / "out.pt"))
    assert figures["max_abs_diff"] < 1e-4 and figures["top1_agreement"] == 1.0  # float32: the same model


@pytest.mark.parametrize("scheme,fmt", [
    ({"method": "rtn", "setting": "W4A16", "group_size": 32, "symmetric": False}, "onnx-int4"),
    ({"method": "rtn", "setting": "W8A16"}, "onnx-int8"),  # symmetric, per channel: blocks repeat the row's scale
    # OSTQuant at W4A16: its learnt rotations are folded into the weights (no online Hadamard by default), so the
    # GPTQ codes of the rotated weights ship as a standard graph
    ({"method": "ostquant", "setting": "W4A16", "group_size": 32, "steps": 2, "batch_size": 2,
      "calibration": {"samples": 8}}, "onnx-int4"),
])
def test_onnx_low_bit_is_built_from_the_codes(scheme, fmt, ids, tmp_path):
    import onnx

    model_dir = _quantized(tmp_path, scheme)
    res = run_export(ExportConfig(formats=[fmt]), model_dir, tmp_path / "out", check_ids=ids, progress=False)
    m = res.metrics[fmt]
    assert m["passed"] and m["from_codes"] and m["quantized_ops"] == ["MatMulNBits"] and m["codes_verified"] == 14
    assert m["max_abs_diff"] < 1e-4 and m["top1_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "out" / fmt / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14 and all(a.name != "accuracy_level" for n in nbits for a in n.attribute)
    # MatMulNBits' codes are the quantize stage's: unpack one layer's B and compare
    codes = load_codes(model_dir).layers["model.layers.0.mlp.up_proj"]
    node = next(n for n in nbits if "layers.0/mlp/up_proj" in n.name)
    b = next(torch.from_numpy(onnx.numpy_helper.to_array(i)) for i in graph.initializer if i.name == node.input[1])
    bits = load_codes(model_dir).bits
    if bits == 4:
        u = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(codes.codes.shape[0], -1)
    else:
        u = b.reshape(codes.codes.shape[0], -1)
    want = codes.codes.to(torch.int16) + ((1 << (bits - 1)) if codes.codes.dtype == torch.int8 else 0)
    assert torch.equal(u.to(torch.int16), want)


def test_a_re_rounded_export_fails_the_default_check(w4, ids, tmp_path):
    """The old path (onnxruntime's RTN over the dequantized weights, what onnx-int4 does for a model without codes)
    run on the quantized model misses FROM_CODES_CHECK: the defaults tell a re-rounded export from the real one."""
    import shutil

    bare = tmp_path / "no-codes"
    shutil.copytree(w4, bare)
    (bare / CODES_FILE).unlink()
    (bare / "quantization.json").unlink()
    res = run_export(ExportConfig(formats=["onnx-int4"]), bare, tmp_path / "out", check_ids=ids, progress=False)
    m = res.metrics["onnx-int4"]
    assert m["passed"] and not m["from_codes"]  # its own default (a fresh quantization) lets it through ...
    assert check_failures(m, FROM_CODES_CHECK)  # ... but as the quantized model's export it fails


def test_packed_formats_are_refused_where_they_would_not_ship_the_codes():
    with pytest.raises(RecipeError, match="compressed-tensors packs the quantize stage's integer codes"):
        parse_recipe({"quantize": {"enabled": False}, "export": {"formats": ["compressed-tensors"]}})
    with pytest.raises(RecipeError, match="onnx-int4 ships the quantize stage's codes, which are 8-bit"):
        parse_recipe({"quantize": {"scheme": {"method": "rtn", "setting": "W8A16"}},
                      "export": {"formats": ["onnx-int4"]}})
    with pytest.raises(RecipeError, match="needs weight groups of at least 16"):
        parse_recipe({"quantize": {"scheme": {"method": "rtn", "setting": "W4A16", "group_size": 8}},
                      "export": {"formats": ["onnx-int4"]}})
    with pytest.raises(RecipeError, match="load weights only"):
        parse_recipe({"quantize": {"scheme": {"method": "rtn", "setting": "W4A4"}},
                      "export": {"formats": ["compressed-tensors"]}})
    parse_recipe({"quantize": {"enabled": False}, "export": {"formats": ["onnx-int4"]}})  # onnxruntime quantizes it


_STOCK_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "1")
except Exception as e:
    print(type(e).__name__, e)
else:
    print("LOADED")
"""


@pytest.mark.slow  # two subprocesses import transformers
def test_a_checkpoint_with_run_time_parts_refuses_stock_loaders_and_loads_with_ours(tmp_path):
    """W4A4 needs activation quantization at run time: stock from_pretrained must fail loudly (with or without
    trust_remote_code), never load it as a plain Llama; this project's loader runs it as quantized."""
    model_dir = _quantized(tmp_path, {"method": "rtn", "setting": "W4A4", "group_size": 32})
    ids = check_batch(320, 2, 16, 1)
    res = run_export(ExportConfig(formats=["safetensors"]), model_dir, tmp_path / "out", check_ids=ids,
                     progress=False)
    d = tmp_path / "out" / "safetensors"
    assert res.metrics["safetensors"]["passed"] and res.metrics["safetensors"]["max_abs_diff"] == 0.0
    for trust in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", _STOCK_LOAD, str(d), trust], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)
        assert "LOADED" not in out.stdout, out.stdout
        if trust == "0":  # the unknown model type is only served by the folder's code, which must be trusted ...
            assert "contains custom code which must be executed" in out.stdout, out.stdout
        else:  # ... and that code refuses too, naming the loader that re-creates the run-time parts
            assert "ImportError this checkpoint needs llm-compress's loader" in out.stdout, out.stdout
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["llm_compress"]["model_type"] == "llama" and "simulated" in cfg["llm_compress"]["runtime_needs"]
    ours = load_causal_lm(str(d))
    assert getattr(ours, "_fakequant_handle", None) is not None  # the activation quantization is back


def test_a_bf16_compressed_tensors_export_is_held_to_the_16_bit_default(w4, ids, tmp_path):
    from llm_compress.export_support import FROM_CODES_CHECK_16BIT

    res = run_export(ExportConfig(formats=["compressed-tensors"]), w4, tmp_path, check_ids=ids, progress=False,
                     dtype="bfloat16")
    m = res.metrics["compressed-tensors"]
    assert m["passed"] and m["dtype"] == "bfloat16" and m["limit_max_kl"] == FROM_CODES_CHECK_16BIT.max_kl
    assert 0 < m["kl"] <= FROM_CODES_CHECK_16BIT.max_kl


def test_a_changed_code_on_disk_is_caught(w4, tmp_path):
    """The read-back checks decode what was written: one code changed in the file fails them."""
    import onnx
    from safetensors.torch import load_file, save_file

    from llm_compress.errors import ExportError
    from llm_compress.packed import (replace_matmuls, verify_compressed_tensors, verify_matmulnbits,
                                     write_compressed_tensors)

    codes = load_codes(w4)
    model = load_causal_lm(str(w4))
    write_compressed_tensors(model, codes, tmp_path / "ct", torch.float32)
    assert verify_compressed_tensors(tmp_path / "ct", codes, torch.float32) == 14
    t = load_file(str(tmp_path / "ct" / "model.safetensors"))
    t["model.layers.1.mlp.down_proj.weight_packed"][0, 0] ^= 1  # one 4-bit code off by one
    save_file(t, str(tmp_path / "ct" / "model.safetensors"))
    with pytest.raises(ExportError, match="model.layers.1.mlp.down_proj on disk does not hold"):
        verify_compressed_tensors(tmp_path / "ct", codes, torch.float32)

    from optimum.onnxruntime import ORTModelForCausalLM

    ORTModelForCausalLM.from_pretrained(str(w4), export=True).save_pretrained(tmp_path / "onnx")
    proto = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    replace_matmuls(proto, codes)
    assert verify_matmulnbits(proto, codes) == 14
    b = next(i for i in proto.graph.initializer if i.name == "model.layers.0.self_attn.q_proj.nbits.B")
    raw = bytearray(b.raw_data)
    raw[0] ^= 1
    b.raw_data = bytes(raw)
    with pytest.raises(ExportError, match="MatMulNBits of model.layers.0.self_attn.q_proj does not hold"):
        verify_matmulnbits(proto, codes)
