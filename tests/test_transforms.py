"""OST transforms: Hadamard constructions, RMSNorm folding, exact learnable transforms, Cayley optimiser, QSUR.

Every model here is a tiny random Llama/Qwen2/Mistral (2 layers, hidden 64) with randomised norm weights and biases,
so folding and transforms are checked against non-trivial values. Exactness is relative to the largest |logit|.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llm_compress.errors import InputError
from llm_compress.quantize.hadamard import (OnlineHadamard, hadamard_matrix, has_hadamard, random_hadamard,
                                            random_orthogonal, random_rotation)
from llm_compress.quantize.qsur import layer_qsur, log_qsur, qsur
from llm_compress.quantize.transforms import (CayleySGD, HadamardInputLinear, OSTParams, build_optimizers,
                                              check_supported, fold_rmsnorm, fuse_transforms_, get_online_hadamard,
                                              install_online_hadamard, transformed_weights)

D, I, V = 64, 96, 96  # hidden, intermediate (96 = 8 * 12: Sylvester x Paley I), vocab


# ------------------------------------------------------------------ helpers

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(kind: str) -> nn.Module:
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, initializer_range=0.15)
    if kind == "llama_gqa":  # GQA + every optional bias (q/k/v/o and MLP)
        cfg, cls = LlamaConfig(**common, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                               tie_word_embeddings=False), LlamaForCausalLM
    elif kind == "qwen2":  # GQA + q/k/v biases
        cfg, cls = Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False), Qwen2ForCausalLM
    elif kind == "mistral_tied":  # MHA + tied embeddings
        cfg, cls = MistralConfig(**common, num_key_value_heads=4, tie_word_embeddings=True), MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def _ids(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    if weights is None:
        return model(ids).logits
    return functional_call(model, {**dict(model.named_parameters()), **weights}, (ids,)).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomise(params: OSTParams, seed: int = 0) -> None:
    """Non-identity orthogonal matrices and random positive scales (log-scales ~ N(0, 0.5^2))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if params.r_res is not None:
            params.r_res.copy_(random_orthogonal(params.r_res.shape[0], seed + 100))
        if params.r_ov is not None:
            L, kv, d, _ = params.r_ov.shape
            params.r_ov.copy_(torch.stack([random_orthogonal(d, seed + 200 + j) for j in range(L * kv)])
                              .reshape(L, kv, d, d))
        for s in params.scales():
            s.copy_(torch.randn(s.shape, generator=g) * 0.5)


KINDS = ["llama_gqa", "qwen2", "mistral_tied"]


# ------------------------------------------------------------------ hadamard.py

@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 96, 384])
def test_hadamard_constructions_are_exact(n):
    h = hadamard_matrix(n)
    hi = torch.round(h * n**0.5)  # the +-1 matrix
    assert torch.equal(hi.abs(), torch.ones(n, n, dtype=hi.dtype))
    assert torch.equal(hi @ hi.T, n * torch.eye(n, dtype=hi.dtype))  # H H^T = n I exactly
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)


def test_hadamard_4864_is_built_from_a_paley_core_and_unbuildable_sizes_fail():
    # 4864 = 256 * 19 and 19 is no Hadamard order, but 4864 = 64 * 76 with 76 / 2 - 1 = 37 (prime, = 1 mod 4).
    assert has_hadamard(4864)
    h = hadamard_matrix(4864, torch.float32)
    rows = torch.randperm(4864, generator=torch.Generator().manual_seed(0))[:32]
    assert (h[rows] @ h.T - torch.eye(4864)[rows]).abs().max() < 1e-5
    assert torch.allclose(h.abs(), torch.full_like(h, 4864**-0.5))
    for n in (6, 19, 172):  # odd / 2 mod 4 / 4 * 43 (needs a Williamson matrix)
        assert not has_hadamard(n)
        with pytest.raises(InputError, match=rf"order {n}\b"):
            hadamard_matrix(n)


def test_random_hadamard_and_orthogonal():
    eye = torch.eye(96, dtype=torch.float64)
    a, b = random_hadamard(96, seed=1), random_hadamard(96, seed=2)
    assert torch.allclose(a @ a.T, eye, atol=1e-12) and not torch.equal(a, b)
    assert torch.equal(a, random_hadamard(96, seed=1))  # deterministic in (n, seed)
    q = random_orthogonal(50, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(50, dtype=torch.float64), atol=1e-12)
    r = random_rotation(172, seed=0)  # no Hadamard of order 172: falls back to a random orthogonal matrix
    assert torch.allclose(r @ r.T, torch.eye(172, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, 96, dtype=torch.float64)
    assert torch.allclose(OnlineHadamard(a)(x), x @ a)
    assert "matrix" not in OnlineHadamard(a).state_dict()  # non-persistent by default


# ------------------------------------------------------------------ transforms.py: support, folding

def test_check_supported_rejects_other_models_and_norms():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(InputError, match="llama, mistral, qwen2.*'gpt2'"):
        check_supported(gpt2)
    model = _tiny("llama_gqa")
    assert check_supported(model).n_rep == 2
    model.model.layers[1].post_attention_layernorm = nn.LayerNorm(D)
    with pytest.raises(InputError, match=r"layers\.1\.post_attention_layernorm is LayerNorm"):
        check_supported(model)


@pytest.mark.parametrize("kind", KINDS)
def test_fold_rmsnorm_is_exact(kind):
    model, ids = _tiny(kind), _ids()
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        ref = _logits(model, ids)
        fold_rmsnorm(model)
        out = _logits(model, ids)
    assert _rel(out, ref) < 1e-5
    assert all(bool((m.weight == 1).all()) for n, m in model.named_modules() if n.endswith("norm"))
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    if tied:  # the embedding itself is untouched; only lm_head got the final norm
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


# ------------------------------------------------------------------ transforms.py: exact transforms

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("online", [False, True])
def test_transformed_weights_are_exact_for_any_params_and_differentiable(kind, online):
    model, ids = _tiny(kind), _ids()
    with torch.no_grad():
        ref = _logits(model, ids)
    fold_rmsnorm(model)
    model.requires_grad_(False)  # as in training: only the transforms learn
    params = OSTParams(model)
    _randomise(params)
    had = None
    if online:
        had = random_hadamard(I, seed=7, dtype=torch.float32)
        install_online_hadamard(model, had)
    weights = transformed_weights(model, params, had)
    assert "model.layers.0.input_layernorm.weight" in weights and "lm_head.weight" in weights
    out = _logits(model, ids, weights)
    assert _rel(out, ref) < 1e-4
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.parameters())
    assert params.r_res.grad.abs().sum() > 0


@pytest.mark.parametrize("flags", [dict(rotate_ov=False, smooth_norm=False, smooth_qk=False, smooth_ov=False,
                                        smooth_up_down=False),
                                   dict(rotate_res=False, rotate_ov=False),
                                   dict(rotate_res=False, smooth_norm=False, smooth_up_down=False)])
def test_each_transform_family_can_be_switched_off(flags):
    model, ids = _tiny("llama_gqa"), _ids()
    with torch.no_grad():
        ref = _logits(model, ids)
    fold_rmsnorm(model)
    params = OSTParams(model, **flags)
    assert (params.r_res is None) == (flags.get("rotate_res") is False)
    assert (params.log_s_qk is None) == (flags.get("smooth_qk") is False)
    _randomise(params, seed=3)
    with torch.no_grad():
        assert _rel(_logits(model, ids, transformed_weights(model, params, None)), ref) < 1e-4


def test_qk_scale_is_shared_by_each_rotary_pair():
    model = _tiny("qwen2")
    fold_rmsnorm(model)
    params = OSTParams(model)
    _randomise(params, seed=5)
    s = params.qk_scale(1)  # [Hkv, d]
    d = s.shape[-1]
    assert s.shape == (2, 16) and torch.equal(s[:, : d // 2], s[:, d // 2:]) and (s > 0).all()


def test_fuse_transforms_is_exact_and_save_load_needs_the_online_hadamard(tmp_path):
    model, ids = _tiny("mistral_tied"), _ids()
    with torch.no_grad():
        ref = _logits(model, ids)
    fold_rmsnorm(model)
    params = OSTParams(model, init="klt")
    r = params.r_res.double()
    assert torch.allclose(r @ r.T, torch.eye(D, dtype=torch.float64), atol=1e-5)
    _randomise(params, seed=11)
    with torch.no_grad():
        params.r_res.copy_(r)  # keep the KLT rotation, random everything else
    had = random_hadamard(I, seed=4, dtype=torch.float32)
    fuse_transforms_(model, params, had)  # installs the online Hadamard itself
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardInputLinear)
    with torch.no_grad():
        assert _rel(_logits(model, ids), ref) < 1e-4
    with pytest.raises(InputError, match="RMSNorm weights are not 1"):  # params are consumed
        transformed_weights(model, params, had)
    # save/load: standard weight names, but the (non-persistent) online Hadamard is lost and must be re-installed
    assert not any("hadamard" in k for k in model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = MistralForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings is False and get_online_hadamard(loaded) is None
    with torch.no_grad():
        assert _rel(_logits(loaded, ids), ref) > 1e-3
        install_online_hadamard(loaded, random_hadamard(I, seed=4, dtype=torch.float32))
        assert _rel(_logits(loaded, ids), ref) < 1e-4


def test_transformed_weights_input_errors():
    model = _tiny("llama_gqa")
    params = OSTParams(model)
    with pytest.raises(InputError, match="fold_rmsnorm"):
        transformed_weights(model, params, None)
    fold_rmsnorm(model)
    had = hadamard_matrix(I, torch.float32)
    with pytest.raises(InputError, match="install_online_hadamard"):
        transformed_weights(model, params, had)
    install_online_hadamard(model, had)
    with pytest.raises(InputError, match="pass it as online_down"):
        transformed_weights(model, params, None)
    with pytest.raises(InputError, match="already installed"):
        install_online_hadamard(model, had)
    other = _tiny("qwen2")
    fold_rmsnorm(other)
    with pytest.raises(InputError, match="must be 'hadamard' or 'klt'"):
        OSTParams(other, init="pca")
    with pytest.raises(InputError, match=r"\[96, 96\]"):
        install_online_hadamard(other, hadamard_matrix(64))


def test_teacher_without_params_absorbs_only_the_online_hadamard():
    model, ids = _tiny("qwen2"), _ids()
    with torch.no_grad():
        ref = _logits(model, ids)
        had = random_hadamard(I, seed=9, dtype=torch.float32)
        install_online_hadamard(model, had)  # not folded, no params: only W_down changes
        weights = transformed_weights(model, None, had)
        assert set(weights) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
        assert _rel(_logits(model, ids, weights), ref) < 1e-5


# ------------------------------------------------------------------ optimiser

def test_cayley_sgd_keeps_orthogonality_and_decreases_a_random_objective():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 3] *= 5
    x = x / x.pow(2).mean().sqrt()
    r = nn.Parameter(torch.stack([random_orthogonal(32, s) for s in range(3)]).float())  # a batch [3, 32, 32]
    opt = CayleySGD([r], lr=0.05, momentum=0.5)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = (x @ r).pow(4).mean()  # kurtosis-like: penalises outliers
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert (r.mT @ r - torch.eye(32)).abs().max() < 1e-5
    assert losses[-1] < 0.8 * losses[0]


def test_cayley_sgd_solves_orthogonal_procrustes():
    torch.manual_seed(1)
    n = 16
    target = random_orthogonal(n, 5)
    if torch.linalg.det(target) < 0:  # stay in SO(n): Cayley steps cannot change the determinant
        target[:, 0] *= -1
    target = target.float()
    a = torch.randn(n, 4 * n) / (4 * n) ** 0.5
    b = target @ a
    r = nn.Parameter(torch.eye(n))
    opt = CayleySGD([r], lr=0.2, momentum=0.9)
    for _ in range(200):
        opt.zero_grad()
        (r @ a - b).pow(2).sum().backward()
        opt.step()
    assert (r - target).abs().max() < 1e-3


def test_cayley_adam_stays_orthogonal_and_solves_procrustes_at_any_gradient_scale():
    """Adam's step does not depend on the loss scale: a 1e-6-scaled objective converges like the plain one."""
    from llm_compress.quantize.transforms import CayleyAdam

    n = 16
    target = random_orthogonal(n, 5)
    if torch.linalg.det(target) < 0:
        target[:, 0] *= -1
    target = target.float()
    a = torch.randn(n, 4 * n, generator=torch.Generator().manual_seed(0)) / (4 * n) ** 0.5
    b = target @ a
    for scale in (1.0, 1e-6):
        r = nn.Parameter(torch.eye(n))
        opt = CayleyAdam([r], lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            (scale * (r @ a - b).pow(2).sum()).backward()
            opt.step()
            assert (r.detach().T @ r.detach() - torch.eye(n)).abs().max() < 1e-5
        assert (r - target).abs().max() < 2e-2, scale


def test_training_steps_keep_the_model_exact():
    model, ids = _tiny("llama_gqa"), _ids()
    with torch.no_grad():
        ref = _logits(model, ids)
    fold_rmsnorm(model)
    had = random_hadamard(I, seed=2, dtype=torch.float32)
    install_online_hadamard(model, had)
    params = OSTParams(model)
    opts = build_optimizers(params, rotate_lr=0.05, smooth_lr=0.05)
    assert [type(o).__name__ for o in opts] == ["CayleyAdam", "Adam"]
    for _ in range(3):  # a weight-outlier objective: gradients reach every family
        w = transformed_weights(model, params, had)
        loss = sum(v.pow(4).mean() for k, v in w.items() if k.endswith("proj.weight"))
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    assert params.log_s_up_down.abs().max() > 0
    with torch.no_grad():
        assert _rel(_logits(model, ids, transformed_weights(model, params, had)), ref) < 1e-4


# ------------------------------------------------------------------ qsur.py

def test_qsur_rotation_spreads_an_outlier_channel():
    torch.manual_seed(0)
    x = torch.randn(8192, 32)
    x[:, 5] *= 10
    assert qsur(x @ random_hadamard(32, 0, torch.float32)) > 2 * qsur(x)
    assert 0.95 < qsur(torch.randn(8192, 32)) <= 1.0  # isotropic zero-mean data is the best case


def test_qsur_mean_rotated_to_the_cube_diagonal_is_the_best_rotation():
    torch.manual_seed(1)
    d, m = 32, 8.0
    x = torch.randn(8192, d)
    x[:, 0] += m  # mean along one axis
    diag = qsur(x @ hadamard_matrix(d, torch.float32))  # first column of H is the cube diagonal / sqrt(d)
    assert diag > qsur(x) + 0.2
    assert all(diag > qsur(x @ random_orthogonal(d, s).float()) for s in range(3))
    from llm_compress.quantize.qsur import default_radius

    c = default_radius(d)
    assert abs(diag - c / (c + m / d**0.5)) < 0.03  # the analytic optimum with this mean


def test_qsur_scaling_equalises_eigenvalues_where_rotation_cannot():
    torch.manual_seed(2)
    sig = torch.linspace(0.2, 3.0, 32)
    x = torch.randn(8192, 32) * sig
    rotated, scaled = qsur(x @ random_hadamard(32, 0, torch.float32)), qsur(x / sig)
    assert qsur(x) < rotated < scaled and scaled > 0.95
    assert log_qsur(x) < 0
    with pytest.raises(InputError, match="more samples than dimensions"):
        qsur(torch.randn(16, 32))


def test_layer_qsur_before_and_after_transforms():
    model = _tiny("qwen2")
    fold_rmsnorm(model)
    had = random_hadamard(I, seed=1, dtype=torch.float32)
    install_online_hadamard(model, had)
    params = OSTParams(model)
    ids = _ids(batch=4, seq=128)  # 512 tokens >> 96 channels
    res = layer_qsur(model, ids, params)
    sites = [f"model.layers.{i}.{s}" for i in range(2) for s in ("attn_in", "mlp_in", "down_in")]
    assert set(res) == set(sites) | {k + "/ost" for k in sites}
    assert all(0 < v <= 1.05 for v in res.values())
    assert set(layer_qsur(model, ids)) == set(sites)


def test_hadamard_input_linear_exports_to_onnx_as_matmuls(tmp_path):
    import warnings

    import onnx
    import onnxruntime

    lin = HadamardInputLinear(nn.Linear(I, D), OnlineHadamard(random_hadamard(I, 0, torch.float32)))
    x = torch.randn(2, 5, I)
    path = tmp_path / "h.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lin, (x,), str(path), dynamo=False)  # the TorchScript exporter (no onnxscript here)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("MatMul") == 2
    sess = onnxruntime.InferenceSession(str(path))
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(y), lin(x).detach(), atol=1e-5)
