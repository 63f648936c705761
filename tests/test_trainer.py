"""The distillation trainer's teacher signals: on-policy (GKD) batches, cached top-k teacher, compile, students."""

from __future__ import annotations

import pytest
import torch

from llm_compress.distill import trainer
from llm_compress.distill.config import DistillConfig
from llm_compress.distill.step import StepLoss, fused_head
from llm_compress.distill.trainer import precompute_topk, sample_continuations
from llm_compress.errors import InputError, TrainingError

V = 64


def _lm(seed=0, layers=1, hidden=32, tie=False, bias=False):
    """A tiny random Llama; ``tie``: lm_head shares the embeddings; ``bias``: an lm_head with a (random) bias."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie))
    if bias:
        head = torch.nn.Linear(hidden, V, bias=True)
        with torch.no_grad():
            head.weight.copy_(m.lm_head.weight)
            head.bias.normal_(0.0, 0.5)
        m.lm_head = head
    return m


def _teacher(seed=2):
    """A random model with peaked next-token distributions (a random init is nearly uniform)."""
    m = _lm(seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
    return m


IDS = torch.randint(0, V, (12, 24), generator=torch.Generator().manual_seed(0))


def _cfg(**kw) -> DistillConfig:
    """Short runs: 6 steps of 4 rows, no warmup, no checkpoints, forward KL unless overridden."""
    base = dict(steps=6, batch_size=4, lr=1e-2, eval_every=3, warmup_steps=0, checkpoint_every=0,
                divergence="forward_kl")
    return DistillConfig(**{**base, **kw})


def train(model, cfg: DistillConfig, **kw):
    return trainer.train(model, IDS, IDS, cfg, progress=False, **kw)


# ------------------------------------------------------------------ on-policy (GKD)

def test_sampling_keeps_the_prompt_and_is_reproducible():
    m = _lm()
    prompt = IDS[:3, :5]
    a = sample_continuations(m, prompt, 12, 1.0, torch.Generator().manual_seed(1))
    b = sample_continuations(m, prompt, 12, 1.0, torch.Generator().manual_seed(1))
    c = sample_continuations(m, prompt, 12, 1.0, torch.Generator().manual_seed(2))
    assert a.shape == (3, 12) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a near-zero temperature is greedy decoding: each sampled token is the argmax given the prefix
    g = sample_continuations(m, prompt, 9, 1e-4, torch.Generator().manual_seed(3))
    with torch.no_grad():
        argmax = m(input_ids=g).logits.argmax(-1)  # [3, 9]
    assert torch.equal(g[:, 5:], argmax[:, 4:-1])


def test_on_policy_share_picks_that_share_of_micro_batches_reproducibly():
    picks = [trainer.is_on_policy(0.3, 0, i) for i in range(2000)]
    assert 0.27 < sum(picks) / len(picks) < 0.33
    assert picks == [trainer.is_on_policy(0.3, 0, i) for i in range(2000)]
    assert picks != [trainer.is_on_policy(0.3, 1, i) for i in range(2000)]  # the seed matters
    assert not any(trainer.is_on_policy(0.0, 0, i) for i in range(100))
    assert all(trainer.is_on_policy(1.0, 0, i) for i in range(100))


def test_on_policy_batches_score_only_the_sampled_tokens(monkeypatch):
    seen = []
    real = trainer._losses

    def spy(step, ids, *, topk=None, mask=None):
        seen.append((ids.clone(), None if mask is None else mask.clone()))
        return real(step, ids, topk=topk, mask=mask)

    monkeypatch.setattr(trainer, "_losses", spy)
    cfg = _cfg(steps=2, on_policy={"share": 1.0, "prompt_tokens": 7}, grad_accum=2)
    hist = train(_lm(1), cfg, teacher=_lm(2))
    assert [r["on_policy"] for r in hist] == [2, 2] and all(r["ce"] is None for r in hist)
    for ids, mask in seen:
        assert mask is not None and mask.shape == ids.shape
        assert not mask[:, :6].any() and mask[:, 6:-1].all() and not mask[:, -1].any()
        assert torch.equal(ids[:, :7], IDS[:, :7][: len(ids)]) or any(  # prompts come from data rows
            torch.equal(ids[j, :7], IDS[i, :7]) for j in range(len(ids)) for i in range(len(IDS)))
        assert not any(torch.equal(ids[j], IDS[i]) for j in range(len(ids)) for i in range(len(IDS)))


def test_on_policy_training_moves_the_student_towards_the_teacher_and_resumes_identically(tmp_path, monkeypatch):
    cfg = _cfg(steps=8, on_policy={"share": 0.5, "prompt_tokens": 4}, grad_accum=2, eval_every=8, checkpoint_every=4)
    teacher = _teacher()
    full_model = _lm(1)
    full = train(full_model, cfg, teacher=teacher)
    assert 0 < sum(r["on_policy"] for r in full) < 16  # both kinds of batches occurred
    assert full[-1]["eval_kd"] < trainer.evaluate_loss(_lm(1), IDS, 4, torch.device("cpu"), teacher)["eval_kd"]
    # killed during step 7, resumed from the step-4 checkpoint: same sampled batches, same result
    calls, real = {"n": 0}, trainer._losses

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 6 * cfg.grad_accum:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "_losses", dying)
    with pytest.raises(KeyboardInterrupt):
        train(_lm(1), cfg, teacher=teacher, checkpoint_dir=tmp_path / "ck")
    monkeypatch.setattr(trainer, "_losses", real)
    resumed_model = _lm(5)
    resumed = train(resumed_model, cfg, teacher=teacher, checkpoint_dir=tmp_path / "ck")
    assert resumed[4]["resumed_from"] == 4
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_on_policy_needs_the_teacher_and_room_to_sample():
    with pytest.raises(TrainingError, match="needs the teacher"):
        train(_lm(), _cfg(on_policy={"share": 0.5}))
    with pytest.raises(TrainingError, match="nothing to sample"):
        train(_lm(), _cfg(on_policy={"share": 0.5, "prompt_tokens": 23}), teacher=_lm(2))


# ------------------------------------------------------------------ cached top-k teacher

def test_cached_full_vocabulary_top_k_trains_exactly_like_the_online_teacher():
    teacher = _lm(2)
    cfg = _cfg(divergence="reverse_kl")
    online = train(_lm(1), cfg, teacher=teacher)
    cache = precompute_topk(teacher, IDS, V, 1.0, 5, torch.device("cpu"))
    assert cache.topk_ids.shape == (12, 24, V) and cache.topk_ids.dtype == torch.int32
    cached = train(_lm(1), cfg, train_topk=cache, eval_topk=cache)
    for a, b in zip(online, cached):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert online[-1]["eval_kd"] == pytest.approx(cached[-1]["eval_kd"], rel=1e-4)


def test_cached_small_top_k_still_distils():
    teacher = _teacher()
    cache = precompute_topk(teacher, IDS, 8, 1.0, 4, torch.device("cpu"))
    student = _lm(1)
    before = trainer.evaluate_loss(student, IDS, 4, torch.device("cpu"), teacher)["eval_kd"]
    train(student, _cfg(steps=15, eval_every=15), train_topk=cache, eval_topk=cache)
    after = trainer.evaluate_loss(student, IDS, 4, torch.device("cpu"), teacher)["eval_kd"]
    assert after < 0.7 * before  # measured with the full teacher, not the top-k proxy


def test_teacher_top_k_cache_is_reused_and_a_corrupt_file_is_recomputed(tmp_path):
    from llm_compress.distill.apply import cached_teacher_topk

    teacher = _lm(2)
    args = (8, 1.0, tmp_path, "train", 4, torch.device("cpu"), False)
    a, reused = cached_teacher_topk(teacher, IDS, *args)
    assert not reused and (tmp_path / "train.safetensors").is_file()
    b, reused = cached_teacher_topk(None, IDS, *args)  # no teacher needed when cached
    assert reused and all(torch.equal(x, y) for x, y in zip(a, b))
    (tmp_path / "train.safetensors").write_bytes(b"garbage")
    c, reused = cached_teacher_topk(teacher, IDS, *args)
    assert not reused and all(torch.equal(x, y) for x, y in zip(a, c))
    assert not list(tmp_path.glob("*.tmp*"))


def test_stale_cache_shape_is_refused():
    cache = precompute_topk(_lm(2), IDS[:6], 8, 1.0, 4, torch.device("cpu"))
    with pytest.raises(TrainingError, match="stale cache"):
        train(_lm(1), _cfg(), train_topk=cache)


# ------------------------------------------------------------------ loss paths: plain, chunked, fused

def _step_grads(path, cfg, student_kw, teacher_kw=None, ids=IDS[:3], chunk_tokens=5, **call):
    """(path taken, total, kd, ce, {parameter: gradient}) of one StepLoss call + backward on fresh tiny models."""
    student = _lm(1, **student_kw)
    teacher = None if teacher_kw is None else _lm(2, **teacher_kw)
    step = StepLoss(cfg, student, teacher, device=torch.device("cpu"), path=path, chunk_tokens=chunk_tokens)
    total, kd, ce = step(ids, **call)
    total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return step, total.detach(), kd, ce, grads


STEP_CASES = [  # (divergence, ce_weight, temperature, student kw, teacher kw, mask)
    ("forward_kl", 0.0, 1.0, {}, {}, False),
    ("js", 0.3, 2.0, {"tie": True}, {"bias": True}, False),
    ("reverse_kl", 0.5, 1.0, {"bias": True}, {"tie": True}, True),
    ("akl", 0.1, 1.0, {"tie": True, "bias": True}, {}, False),
    ("skew_kl", 1.0, 1.5, {}, {}, False),  # KD only reported
    ("forward_kl", 0.0, 1.0, {"bias": True}, None, False),  # no teacher: CE alone
]


@pytest.mark.parametrize("name,ce_weight,temperature,student_kw,teacher_kw,masked", STEP_CASES,
                         ids=[f"{c[0]}-ce{c[1]}-T{c[2]}-{'-'.join(c[3]) or 'untied'}-t{c[4]}-mask{c[5]}"
                              for c in STEP_CASES])
def test_chunked_and_fused_steps_give_the_plain_steps_loss_and_gradients(name, ce_weight, temperature, student_kw,
                                                                          teacher_kw, masked):
    cfg = _cfg(divergence=name, ce_weight=ce_weight, temperature=temperature)
    mask = None
    if masked:  # an on-policy batch: the divergence covers some positions, the CE none
        mask = torch.zeros(3, 24, dtype=torch.bool)
        mask[:, 6:-1] = True
    ref = _step_grads("plain", cfg, student_kw, teacher_kw, mask=mask)
    for path in ("chunked", "fused"):
        step, total, kd, ce, grads = _step_grads(path, cfg, student_kw, teacher_kw, mask=mask)
        assert step.path == path
        if path == "fused" and teacher_kw is not None:
            assert step.t_head is not None  # the teacher's lm_head is fused too
        torch.testing.assert_close(total, ref[1], rtol=1e-5, atol=1e-6)
        for a, b in ((kd, ref[2]), (ce, ref[3])):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref[4].keys()
        for key, g in grads.items():
            torch.testing.assert_close(g, ref[4][key], rtol=1e-4, atol=1e-6, msg=f"{path}: {key}")
    if masked:
        assert ref[3] is None  # no CE on the student's own samples


def test_fused_step_with_a_cached_top_k_teacher_matches_the_plain_step():
    teacher = _teacher()
    cache = precompute_topk(teacher, IDS[:3], 8, 1.0, 3, torch.device("cpu"))
    cfg = _cfg(divergence="tvd", ce_weight=0.2)
    ref = _step_grads("plain", cfg, {}, topk=cache)
    step, total, kd, ce, grads = _step_grads("fused", cfg, {}, topk=cache, chunk_tokens=7)
    torch.testing.assert_close(total, ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, ref[2].detach(), rtol=1e-5, atol=1e-6)
    for key, g in grads.items():
        torch.testing.assert_close(g, ref[4][key], rtol=1e-4, atol=1e-6, msg=key)


def test_fused_step_never_runs_the_lm_head_on_all_tokens():
    student = _lm(1)
    step = StepLoss(_cfg(), student, _lm(2), device=torch.device("cpu"), path="fused", chunk_tokens=4)

    def whole(*a, **k):
        raise AssertionError("the lm_head module ran on all tokens")

    student.lm_head.forward = whole  # the fused loss multiplies chunks by the weight itself
    total, _, _ = step(IDS[:2])
    total.backward()
    assert student.lm_head.weight.grad is not None and student.model.embed_tokens.weight.grad is not None
    with pytest.raises(AssertionError, match="all tokens"):
        StepLoss(_cfg(), student, _lm(2), device=torch.device("cpu"), path="chunked")(IDS[:2])


def test_fused_path_is_refused_with_a_reason_and_falls_back_to_chunked_logits():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):  # post-processes its logits: the decoder's hidden states alone do not give them
        def forward(self, input_ids=None, logits_to_keep=0, **kw):
            out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw)
            out.logits = out.logits * 2.0
            return out

    capped = _lm(1)
    capped.config.final_logit_softcapping = 30.0  # as Gemma 2 has
    scaled = Scaled(_lm(1).config)
    assert "soft-capped" in fused_head(capped) and "checked on a probe" in fused_head(scaled)
    for model in (capped, scaled):
        with pytest.warns(UserWarning, match="chunked over the model's logits"):
            step = StepLoss(_cfg(chunk="always"), model, _lm(2), device=torch.device("cpu"))
        assert step.path == "chunked" and step.note
        with pytest.raises(TrainingError, match="fused loss cannot be used"):
            StepLoss(_cfg(), model, _lm(2), device=torch.device("cpu"), path="fused")
    decoder, weight, bias = fused_head(_lm(1, bias=True))
    assert weight.shape == (V, 32) and bias.shape == (V,)


def test_loss_path_follows_the_chunk_setting_and_the_vocabulary():
    from transformers import LlamaConfig, LlamaForCausalLM

    cpu = torch.device("cpu")
    assert StepLoss(_cfg(), _lm(1), device=cpu).path == "plain"  # V = 64 < 32,768 with chunk auto
    assert StepLoss(_cfg(chunk="always"), _lm(1), device=cpu).path == "fused"
    big = LlamaForCausalLM(LlamaConfig(vocab_size=32_768, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=1, num_key_value_heads=1))
    assert StepLoss(_cfg(), big, device=cpu).path == "fused"
    assert StepLoss(_cfg(chunk="never"), big, device=cpu).path == "plain"
    assert StepLoss(_cfg(divergence="sinkhorn"), big, device=cpu).path == "plain"  # batch-wise: all tokens at once


def test_training_and_evaluation_with_the_fused_loss_match_the_plain_loss():
    teacher = _teacher()
    runs = {}
    for chunk in ("never", "always"):
        runs[chunk] = train(_lm(1, tie=True), _cfg(steps=3, ce_weight=0.1, chunk=chunk), teacher=teacher)
    for a, b in zip(runs["never"], runs["always"]):
        for key in ("loss", "ce", "kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    for key in ("eval_ce", "eval_kd"):
        assert runs["never"][-1][key] == pytest.approx(runs["always"][-1][key], rel=1e-4), key


# ------------------------------------------------------------------ torch.compile

@pytest.mark.slow  # torch.compile: ~20 s on 2 cores
def test_compiled_forward_trains_like_eager():
    cfg = _cfg(steps=3, eval_every=3)
    eager = train(_lm(1), cfg, teacher=_lm(2))
    compiled = train(_lm(1), cfg, teacher=_lm(2), compile=True)
    for a, b in zip(eager, compiled):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


# ------------------------------------------------------------------ students

def test_student_from_a_smaller_config():
    from llm_compress.distill.config import DeriveStudent
    from llm_compress.distill.apply import derive_student

    teacher = _lm(2, layers=4, hidden=64)
    small, keep = derive_student(teacher, DeriveStudent(layers=[0, 3], init="random",
                                                        config={"hidden_size": 32, "intermediate_size": 48}))
    assert keep == [0, 3] and small.config.hidden_size == 32 and small.config.num_hidden_layers == 2
    assert small.config.head_dim == 16 and small.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    with torch.no_grad():
        assert small(input_ids=IDS[:2]).logits.shape == (2, 24, V)
    with pytest.raises(ValueError, match="init: random"):
        DeriveStudent(config={"hidden_size": 32})
    with pytest.raises(ValueError, match="unknown key"):
        DeriveStudent(init="random", config={"vocab_size": 10})
    with pytest.raises(InputError, match="divisible"):
        derive_student(teacher, DeriveStudent(init="random", config={"num_attention_heads": 3}))


def test_recipe_refuses_impossible_teacher_signals():
    from llm_compress.config import parse_recipe
    from llm_compress.errors import RecipeError

    with pytest.raises(RecipeError, match="sinkhorn"):
        parse_recipe({"name": "x", "distill": {"divergence": "sinkhorn", "teacher": {"source": "cached_topk"}}})
    with pytest.raises(RecipeError, match="prompt_tokens"):
        parse_recipe({"name": "x", "data": {"seq_len": 32}, "distill": {"on_policy": {"share": 0.5,
                                                                                       "prompt_tokens": 31}}})


# ------------------------------------------------------------------ mixed precision (models.dtype bfloat16 / float16)

def _relative_update(dtype, tmp_path, **kw) -> float:
    """||w_after - w_before|| / ||w_before|| over all parameters after 10 steps at lr 2e-5 of a student and teacher
    in ``dtype``; the trained student is saved as the distill stage saves it and must keep ``dtype``."""
    from safetensors import safe_open

    from llm_compress.modeling import save_pretrained_atomic_into

    m = _lm(1).to(dtype)
    before = [p.detach().float().clone() for p in m.parameters()]
    train(m, _cfg(lr=2e-5, steps=10, eval_every=5, **kw), teacher=_teacher().to(dtype))
    save_pretrained_atomic_into(m, None, tmp_path / str(dtype))
    with safe_open(str(tmp_path / str(dtype) / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    moved = sum(((p.detach().float() - b) ** 2).sum() for p, b in zip(m.parameters(), before)) ** 0.5
    return float(moved / sum((b**2).sum() for b in before) ** 0.5)


@pytest.mark.parametrize("dtype,chunk", [(torch.bfloat16, "never"), (torch.bfloat16, "always"),
                                         (torch.float16, "never")])
def test_low_precision_student_moves_like_float32_and_keeps_its_dtype(dtype, chunk, tmp_path):
    # bf16 weights updated in place by AdamW at lr 2e-5 lose most updates to rounding (about half the float32
    # run's movement here); float32 master weights under autocast move as far as the float32 run (0.8x-1.1x)
    ref = _relative_update(torch.float32, tmp_path, chunk=chunk)
    low = _relative_update(dtype, tmp_path, chunk=chunk)
    assert ref > 0 and 1 / 1.5 < low / ref < 1.5, (low, ref)


def test_training_reports_its_progress_to_the_installed_reporter():
    """llm_compress.progress: the flow installs a reporter around a stage (a Prefect progress artifact); the loop tells
    it each step's share of the run; nothing is reported without one."""
    from llm_compress.progress import report, reporting

    cfg = DistillConfig(steps=3, batch_size=2, eval_every=3, warmup_steps=0)
    seen = []
    with reporting(lambda fraction, note: seen.append((round(fraction, 3), note.split(",")[0]))):
        train(_lm(1), cfg, teacher=_lm(2), desc="distill")
    assert seen == [(0.333, "distill: step 1/3"), (0.667, "distill: step 2/3"), (1.0, "distill: step 3/3")]
    report(0.5, "no reporter installed: nothing happens")
