"""CSKV (llm_compress.kv.cskv): the bi-branch cache against DynamicCache, the bases' fit, the factors' model binding,
padding and memory. Tiny random Llama models on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from llm_compress.errors import InputError
from llm_compress.kv import build_cache, load_kv_cache, save_kv_cache_json
from llm_compress.kv.cskv import FACTORS_FILE, CSKVCache, attention_modules, fit_factors, rope, unrope
from llm_compress.kv.measure import compare, stepwise_logits
from llm_compress.kv.spec import check_against_model, normalize_spec

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, D = 128, 32  # D: key/value channels per layer (2 KV heads x head_dim 16)


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _rows(n: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _cache(model, rank: int, window: int, init: str = "pca", v_rank: int | None = None) -> CSKVCache:
    factors = fit_factors(model, _rows(4, 48, seed=9), rank, v_rank or rank, init)
    return CSKVCache(3, k_rank=rank, v_rank=v_rank or rank, window=window, init=init).attach(model, factors)


def test_unrope_inverts_rope_also_with_attention_scaling():
    x = torch.randn(2, 3, 5, 8)
    ang = torch.rand(2, 5, 4) * 6
    for scale in (1.0, 1.3):
        cos, sin = torch.cat([ang.cos()] * 2, -1) * scale, torch.cat([ang.sin()] * 2, -1) * scale
        torch.testing.assert_close(unrope(rope(x, cos, sin), cos, sin), x)


@pytest.mark.parametrize("init", ["pca", "svd", "asvd"])
def test_full_rank_reproduces_the_dynamic_cache(model, init):
    """Rank d keeps every channel: every step's logits equal DynamicCache's to float rounding, though all but the
    last 4 tokens went through un-rotation, projection, rebuild and re-rotation; greedy generation is identical."""
    rows = _rows(2, 40, seed=1)
    got = stepwise_logits(model, rows, 12, _cache(model, D, window=4, init=init))
    want = stepwise_logits(model, rows, 12, DynamicCache(config=model.config))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    new = model.generate(rows[:, :12], past_key_values=_cache(model, D, window=4, init=init), **kwargs)
    assert torch.equal(new, model.generate(rows[:, :12], **kwargs))


def test_low_rank_changes_the_logits_and_costs_less_memory(model):
    """At rank 6 of 32 the old tokens are approximations: the logits move (the comparison can tell), memory drops."""
    rows = _rows(2, 40, seed=1)
    full = stepwise_logits(model, rows, 12, DynamicCache(config=model.config))
    cache = _cache(model, 6, window=4)
    got = compare(stepwise_logits(model, rows, 12, cache), full, rows[:, 12:])
    assert got["kl_to_full"] > 1e-4
    assert cache.memory_ratio() > 2


def test_the_window_is_exact_and_only_older_tokens_are_rebuilt(model):
    """After the rows, a layer's last `window` returned states are DynamicCache's bit for bit; the older ones are
    not (rank 1); a window wider than the rows keeps everything exact whatever the rank."""
    rows = _rows(2, 30, seed=2)
    cache, full = _cache(model, 1, window=8), DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=rows, past_key_values=cache, use_cache=True)
        model(input_ids=rows, past_key_values=full, use_cache=True)
    for i in range(3):
        k, v = cache.layers[i].past()
        assert torch.equal(k[..., -8:, :], full.layers[i].keys[..., -8:, :])
        assert torch.equal(v[..., -8:, :], full.layers[i].values[..., -8:, :])
        assert not torch.allclose(k[..., :-8, :], full.layers[i].keys[..., :-8, :], atol=1e-3)
        assert cache.layers[i].c_k.shape == (2, 22, 1)
    wide = stepwise_logits(model, rows, 10, _cache(model, 1, window=64))
    assert torch.equal(wide, stepwise_logits(model, rows, 10, DynamicCache(config=model.config)))


def _relative_error(model, factors, rows) -> tuple[float, float]:
    """Relative squared reconstruction error of the pre-RoPE keys and the values on ``rows``, all layers."""
    err, tot = {"k": 0.0, "v": 0.0}, {"k": 0.0, "v": 0.0}
    grabbed: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [proj.register_forward_hook(lambda m, a, o, key=(attn.layer_idx, w): grabbed.__setitem__(key, o))
             for attn in attention_modules(model) for w, proj in (("k", attn.k_proj), ("v", attn.v_proj))]
    with torch.no_grad():
        model(input_ids=rows, use_cache=False)
    for h in hooks:
        h.remove()
    for (layer, w), x in grabbed.items():
        p = (factors.k if w == "k" else factors.v)[layer]
        x = x.flatten(0, 1).double()
        err[w] += ((x - x @ p.double() @ p.double().T) ** 2).sum().item()
        tot[w] += (x ** 2).sum().item()
    return err["k"] / tot["k"], err["v"] / tot["v"]


def test_pca_reconstructs_held_out_activations_better_than_svd_and_asvd(model):
    """At 20 % of the channels (rank 6 of 32) the data-fitted bases lose less of held-out rows' keys and values
    than the weight-only SVD and the activation-scaled ASVD bases (CSKV's inits)."""
    calib, held_out = _rows(8, 64, seed=3), _rows(4, 64, seed=4)
    errors = {init: _relative_error(model, fit_factors(model, calib, 6, 6, init), held_out)
              for init in ("pca", "svd", "asvd")}
    for other in ("svd", "asvd"):
        assert errors["pca"][0] < errors[other][0] and errors["pca"][1] < errors[other][1], errors
    assert 0 < errors["pca"][0] < 1


def test_a_rank_above_the_channels_is_refused_naming_the_field(model):
    with pytest.raises(InputError, match="k_rank 33 exceeds the model's 32"):
        build_cache({"method": "cskv", "init": "svd", "k_rank": 33}, model)
    with pytest.raises(InputError, match="v_rank 40"):
        check_against_model(normalize_spec({"method": "cskv", "v_rank": 40}), model.config)
    with pytest.raises(InputError, match="k_ratio"):
        normalize_spec({"method": "cskv", "k_ratio": 0})


def test_data_fitted_bases_need_factors(model):
    with pytest.raises(InputError, match="needs factors fitted on data"):
        build_cache({"method": "cskv", "init": "pca"}, model)


def test_saved_factors_load_for_their_model_and_are_refused_for_another(model, tmp_path):
    """Spec + factors file round trip through load_kv_cache (same logits as the in-memory cache); another model's
    weights (same geometry) are refused by name, at load and by check_against_model (what evaluate asks)."""
    factors = fit_factors(model, _rows(4, 48, seed=9), 8, 12, "pca")
    factors.save(tmp_path / FACTORS_FILE)
    save_kv_cache_json(tmp_path, {"method": "cskv", "k_rank": 8, "v_rank": 12, "window": 4,
                                  "factors": {"file": FACTORS_FILE, "fingerprint": factors.fingerprint,
                                              "path": "/somewhere/else"}})
    assert "path" not in (tmp_path / "kv_cache.json").read_text()
    rows = _rows(1, 30, seed=5)
    loaded = stepwise_logits(model, rows, 10, load_kv_cache(tmp_path, model))
    direct = CSKVCache(3, k_rank=8, v_rank=12, window=4).attach(model, factors)
    assert torch.equal(loaded, stepwise_logits(model, rows, 10, direct))
    other = _model(seed=1)
    with pytest.raises(InputError, match="fitted for another model"):
        load_kv_cache(tmp_path, other)
    from llm_compress.kv.spec import read_spec

    with pytest.raises(InputError, match="fitted for another model"):
        check_against_model(read_spec(tmp_path), other)
    check_against_model(read_spec(tmp_path), model)
    with pytest.raises(InputError, match="ranks"):  # factors of other ranks than the spec asks
        CSKVCache(3, k_rank=4, v_rank=12).attach(model, factors)


def test_left_padding_declared_matches_the_unpadded_row_and_undeclared_is_refused(model):
    """A left-padded row decoded with set_padding gives the same logits as the same tokens alone (positions are
    re-derived from the pads); without the declaration the padded prompt is refused."""
    rows = _rows(2, 24, seed=6)
    pad = 5
    padded = rows.clone()
    padded[1, :pad] = 0
    mask = torch.ones_like(padded)
    mask[1, :pad] = 0
    cache = _cache(model, 6, window=4).set_padding(mask)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    got = model.generate(padded, attention_mask=mask, past_key_values=cache, **kwargs)
    alone = model.generate(rows[1:, pad:], past_key_values=_cache(model, 6, window=4), **kwargs)
    assert torch.equal(got.sequences[1, 24:], alone.sequences[0, 24 - pad:])
    torch.testing.assert_close(torch.stack(got.logits)[:, 1], torch.stack(alone.logits)[:, 0], atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="left-padded"):
        model.generate(padded, attention_mask=mask, past_key_values=_cache(model, 6, window=4), **kwargs)


def test_memory_counts_the_window_and_the_features_at_16_bits(model):
    """Held bytes = (features of the old tokens + the exact window) at 2 bytes each, every layer; the bases are
    weights, reported apart."""
    rows = _rows(2, 40, seed=7)
    cache = _cache(model, 6, window=4, v_rank=10)
    stepwise_logits(model, rows, 12, cache)
    seen = 39
    per_layer = 2 * ((seen - 4) * (6 + 10) + 2 * 4 * D) * 2  # rows x (features + exact K and V) x 2 bytes
    assert cache.nbytes16() == 3 * per_layer
    assert cache.full_bytes() == 3 * 2 * 2 * seen * D * 2
    assert cache.factor_bytes() == 3 * D * (6 + 10) * 2


def test_kv_stage_fits_cskv_factors_for_its_model_only(tiny_run, tiny_recipe):
    """The stage fits the bases on training rows and writes them next to kv_cache.json with the model's fingerprint;
    evaluate measures the cache on that model and says why not on the others (their weights differ); the
    safetensors export carries the factors and generates through them."""
    import json
    from pathlib import Path

    from llm_compress.config import parse_recipe
    from llm_compress.modeling import load_causal_lm
    from llm_compress.pipeline import preflight, run_local

    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["kv"] = {"enabled": True, "cache": {"method": "cskv", "k_rank": 999, "window": 8, "calib_rows": 4}}
    with pytest.raises(InputError, match="k_rank 999 exceeds"):
        preflight(parse_recipe(data))  # refused before any work
    data["kv"]["cache"].update(k_rank=4, v_rank=12)
    done = run_local(parse_recipe(data), root / "tiny-cskv", root)
    m, out = done["kv"]["metrics"], done["kv"]["outputs"]
    assert m["method"] == "cskv" and m["cskv"]["k_rank"] == 4 and m["cskv"]["calib_rows"] == 4
    assert m["memory_ratio_mean"] > 1 and m["kl_to_full"] > 0
    saved = json.loads(Path(out["kv_cache"]["path"]).read_text())
    assert saved["factors"]["file"] == FACTORS_FILE and "path" not in saved["factors"]
    assert Path(out["cskv_factors"]["path"]).is_file()
    model = load_causal_lm(done["quantize"]["outputs"]["model"]["path"])
    assert load_kv_cache(Path(out["kv_cache"]["path"]).parent, model).factors.ranks == (4, 12)
    ev = done["evaluate"]["metrics"]["models"]
    assert ev["quantize"]["kv"]["method"] == "cskv" and ev["quantize"]["kv"]["kl_to_full"] == \
        pytest.approx(m["kl_to_full"], rel=1e-4)
    for name in ("teacher", "distill"):
        assert "fitted for another model" in ev[name]["kv"]["skipped"], name
    assert "cskv_factors" in done["evaluate"]["inputs"]
    st = Path(done["export"]["outputs"]["safetensors"]["path"])
    assert (st / FACTORS_FILE).read_bytes() == Path(out["cskv_factors"]["path"]).read_bytes()
    assert done["export"]["metrics"]["safetensors"]["kv_cache"]["generated_tokens"] > 0
