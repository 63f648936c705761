"""Pure-function tests: divergences, RTN, the training loop's guards, data reading, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from llm_compress.distill.chunked import get_divergence
from llm_compress.distill.divergences import DIVERGENCES, forward_kl, reverse_kl
from llm_compress.errors import InputError, TrainingError


# ------------------------------------------------------------------ divergences

def _ref_kl(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), -1)
    return (p * (p.log() - torch.log_softmax(q_logits.double(), -1))).sum(-1)


def test_kl_zero_when_equal_and_positive_otherwise():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 50), torch.randn(3, 5, 50)
    for fn in DIVERGENCES.values():
        assert fn(a, a).abs().item() < 1e-6
        assert fn(a, b).item() > 0


def test_forward_and_reverse_kl_match_the_formula():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 30), torch.randn(2, 4, 30)
    assert torch.allclose(forward_kl(s, t).double(), _ref_kl(t, s).mean(), atol=1e-6)
    assert torch.allclose(reverse_kl(s, t).double(), _ref_kl(s, t).mean(), atol=1e-6)


def test_mask_and_temperature():
    torch.manual_seed(2)
    s, t = torch.randn(1, 6, 20), torch.randn(1, 6, 20)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    assert torch.allclose(forward_kl(s, t, mask).double(), _ref_kl(t[:, :3], s[:, :3]).mean(), atol=1e-6)
    assert torch.allclose(forward_kl(s, t, temperature=2.0).double(), _ref_kl(t / 2, s / 2).mean(), atol=1e-6)
    assert torch.allclose(forward_kl(s, t, temperature=2.0, scale_by_t2=True), 4 * forward_kl(s, t, temperature=2.0))


def test_divergence_bad_inputs():
    with pytest.raises(TrainingError, match="differ in shape"):
        forward_kl(torch.randn(2, 10), torch.randn(2, 11))
    with pytest.raises(TrainingError, match="temperature must be > 0"):
        forward_kl(torch.randn(2, 10), torch.randn(2, 10), temperature=-1.0)
    with pytest.raises(TrainingError, match="unknown divergence 'kl'"):
        get_divergence("kl")


def test_gradient_matches_float64_autograd():
    torch.manual_seed(3)
    s = torch.randn(2, 3, 17, requires_grad=True)
    t = torch.randn(2, 3, 17)
    for name, ref in (("forward_kl", lambda x: _ref_kl(t, x).mean()),
                      ("reverse_kl", lambda x: _ref_kl(x, t).mean())):
        g, = torch.autograd.grad(DIVERGENCES[name](s, t), s)
        s64 = s.detach().double().requires_grad_()
        g64, = torch.autograd.grad(ref(s64), s64)
        assert torch.allclose(g.double(), g64, atol=1e-6), name


def test_reverse_kl_seeks_a_mode_forward_kl_covers_both():
    """Fit a single Gaussian-like softmax (one learnable mean) to a bimodal teacher over 1-D bins."""
    x = torch.linspace(-6, 6, 121)
    teacher = torch.logsumexp(torch.stack([-(x + 3) ** 2 / 0.5, -(x - 3) ** 2 / 0.5]), 0)  # modes at -3 and 3

    def fit(div):
        mu = torch.tensor(1.0, requires_grad=True)
        log_sigma = torch.tensor(0.0, requires_grad=True)
        opt = torch.optim.Adam([mu, log_sigma], lr=0.05)
        for _ in range(600):
            student = -(x - mu) ** 2 / (2 * log_sigma.exp() ** 2)
            loss = div(student[None], teacher[None])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return mu.item(), log_sigma.exp().item()

    mu_r, sd_r = fit(reverse_kl)
    mu_f, sd_f = fit(forward_kl)
    assert abs(mu_r - 3) < 0.3 and sd_r < 1.0  # locks onto the nearer mode
    assert abs(mu_f) < 0.5 and sd_f > 2.0  # spreads over both modes


# ------------------------------------------------------------------ RTN

from llm_compress.quantize.rtn import quantize_model, quantize_tensor  # noqa: E402


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_bounded_by_half_a_step(bits, group, sym):
    torch.manual_seed(4)
    w = torch.randn(16, 64)
    q = quantize_tensor(w, bits, group, sym)
    g = w.shape[1] if group is None else group
    x = w.reshape(16, -1, g)
    if sym:
        step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        step = (x.amax(-1, keepdim=True).clamp_min(0) - x.amin(-1, keepdim=True).clamp_max(0)) / (2**bits - 1)
    err = (q.reshape_as(x) - x).abs()
    assert (err <= step / 2 + 1e-6).all()
    levels = torch.unique(q.reshape_as(x)[0, 0]).numel()
    assert levels <= 2**bits


def test_rtn_more_bits_and_groups_lower_error():
    torch.manual_seed(5)
    w = torch.randn(64, 128)
    w[:, 3] *= 20  # an outlier column: groups isolate it, per-channel scales suffer
    err = lambda **k: (quantize_tensor(w, **k) - w).norm().item()  # noqa: E731
    assert err(bits=8) < err(bits=4) < err(bits=2)
    assert err(bits=4, group_size=32) < err(bits=4)


def test_rtn_model_skips_lm_head_and_rejects_bad_groups():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    head = m.lm_head.weight.clone()
    stats = quantize_model(m, 4, 16, True, ["lm_head"])
    assert torch.equal(m.lm_head.weight, head) and "lm_head" not in stats["layers"]
    assert 0 < stats["mean_rel_error"] < 0.2
    with pytest.raises(InputError, match="group_size 64 does not divide"):
        quantize_tensor(torch.randn(4, 96), 4, 64)


# ------------------------------------------------------------------ trainer guards

def _tiny_lm(vocab=64, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie))


def test_nan_loss_stops_training_with_the_step():
    from llm_compress.distill.config import DistillConfig
    from llm_compress.distill.trainer import train

    m = _tiny_lm()
    with torch.no_grad():
        m.model.embed_tokens.weight[5] = float("nan")
    ids = torch.full((8, 16), 5)
    with pytest.raises(TrainingError, match=r"loss is nan at step 1"):
        train(m, ids, ids, DistillConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0), progress=False)


def test_training_reduces_loss_and_is_repeatable():
    from llm_compress.distill.config import DistillConfig
    from llm_compress.distill.trainer import train

    ids = torch.arange(64).repeat(10, 1)[:, :32] % 64  # a learnable pattern
    cfg = DistillConfig(steps=30, batch_size=4, lr=1e-2, eval_every=30, warmup_steps=0)
    h1 = train(_tiny_lm(), ids, ids, cfg, progress=False)
    h2 = train(_tiny_lm(), ids, ids, cfg, progress=False)
    assert h1[-1]["eval_ce"] < h1[0]["ce"] * 0.7
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]


def test_lr_schedules():
    from llm_compress.distill.config import DistillConfig
    from llm_compress.distill.trainer import lr_at

    s = DistillConfig(steps=100, batch_size=1, lr=1.0, warmup_steps=10, schedule="cosine")
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0) and lr_at(99, s) < 0.01
    s = s.model_copy(update={"schedule": "linear"})
    assert lr_at(55, s) == pytest.approx(0.5)


# ------------------------------------------------------------------ data

from llm_compress.data import iter_file_texts, load_texts  # noqa: E402


def test_data_reads_jsonl_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    (tmp_path / "b.txt").write_text("one\n\ntwo\n")
    assert load_texts([tmp_path / "a.jsonl", tmp_path / "b.txt"]) == ["hello", "world", "one", "two"]


@pytest.mark.parametrize("content, match", [
    (b'{"text": "ok"}\n\xff\xfe bad\n', r"bad.jsonl, line 2: not UTF-8"),
    (b'{"text": "ok"}\n{not json}\n', r"bad.jsonl, line 2: not valid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', r"bad.jsonl, line 2: no 'text' field"),
])
def test_data_bad_lines_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError, match=match):
        list(iter_file_texts(p))


def test_empty_corpus_and_missing_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match="empty corpus"):
        load_texts([tmp_path / "empty.txt"])
    with pytest.raises(InputError, match="data file not found"):
        load_texts([tmp_path / "missing.jsonl"])


def _word_tokenizer(bos: bool):
    """A local word-level tokenizer; ``bos``: a <s> token its default encoding prepends (as Llama 3's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "a", "b", "c", "d"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   **({"bos_token": "<s>"} if bos else {}))


@pytest.mark.parametrize("bos", [True, False])
def test_packed_documents_start_with_bos_when_the_tokenizer_adds_it(bos):
    from llm_compress.data import bos_prefix, pack

    tok = _word_tokenizer(bos)
    assert tok("a b")["input_ids"] == ([0, 3, 4] if bos else [3, 4])
    stream = pack(["a b", "c", "d d a"], tok, 1, "docs").flatten().tolist()
    docs = [3, 4, 1, 5, 1, 6, 6, 3, 1]  # each document, then EOS
    assert bos_prefix(tok) == ([0] if bos else [])
    assert stream == ([0, 3, 4, 1, 0, 5, 1, 0, 6, 6, 3, 1] if bos else docs)


# ------------------------------------------------------------------ atomic writes

from llm_compress.io import atomic_dir, digest_path  # noqa: E402


def test_atomic_dir_keeps_the_old_output_on_failure(tmp_path):
    final = tmp_path / "stage"
    with atomic_dir(final) as d:
        (d / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temp leftovers
    with atomic_dir(final) as d:
        (d / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v2"


def test_digest_path_tracks_content_not_manifest(tmp_path):
    (tmp_path / "a").write_text("x")
    d1 = digest_path(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    assert digest_path(tmp_path) == d1
    (tmp_path / "a").write_text("y")
    assert digest_path(tmp_path) != d1


def test_datasets_source_reads_a_local_dataset_folder(tmp_path):
    from llm_compress.data import load_hf_texts

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    (tmp_path / "validation.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    assert load_hf_texts(str(tmp_path), None, "train", "text") == [f"doc {i}" for i in range(5)]
    assert load_hf_texts(str(tmp_path), None, "validation", "text", max_docs=1) == ["held out"]
    with pytest.raises(InputError, match="no 'body' column"):
        load_hf_texts(str(tmp_path), None, "train", "body")
    with pytest.raises(InputError, match="cannot load dataset"):
        load_hf_texts(str(tmp_path / "nope"), None, "train", "text")


def test_killed_training_resumes_from_its_checkpoint_with_the_same_result(tmp_path, monkeypatch):
    """Killed during step 10, resumed from the step-8 checkpoint: ends exactly where an uninterrupted run ends."""
    from llm_compress.distill.config import DistillConfig
    from llm_compress.distill import trainer

    ids = torch.randint(0, 64, (12, 32), generator=torch.Generator().manual_seed(0))  # distinct rows: order matters
    cfg = DistillConfig(steps=12, batch_size=4, lr=1e-2, eval_every=6, warmup_steps=0, grad_accum=2,
                        checkpoint_every=4, divergence="reverse_kl", ce_weight=0.2)
    teacher = _tiny_lm()
    full_model = _tiny_lm()
    full = trainer.train(full_model, ids, ids, cfg, teacher=teacher, progress=False)

    calls = {"n": 0}
    real = trainer._losses

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 9 * cfg.grad_accum:  # killed during step 10
            raise KeyboardInterrupt
        return real(*a, **k)

    ckpt = dict(checkpoint_dir=tmp_path / "ckpt", progress=False)
    monkeypatch.setattr(trainer, "_losses", dying)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_tiny_lm(), ids, ids, cfg, teacher=teacher, **ckpt)
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 8
    monkeypatch.setattr(trainer, "_losses", real)
    resumed_model = _tiny_lm()
    with torch.no_grad():  # a different start: the checkpoint must overwrite it
        for p in resumed_model.parameters():
            p.add_(1.0)
    resumed = trainer.train(resumed_model, ids, ids, cfg, teacher=teacher, **ckpt)
    assert resumed[8]["resumed_from"] == 8 and len(resumed) == len(full) == 12
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_round_trips_tied_embeddings_and_refuses_another_model(tmp_path):
    """Tied lm_head/embeddings (Qwen2.5-0.5B, Llama 3.2) share memory: the checkpoint must store and restore them."""
    from llm_compress.distill import trainer

    model = _tiny_lm(tie=True)
    opt = torch.optim.AdamW(model.parameters())
    trainer._save_checkpoint(model, opt.state_dict(), 5, [{"step": 5}], tmp_path / "ck")
    other = _tiny_lm(tie=True)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    history: list = []
    assert trainer._resume(other, torch.optim.AdamW(other.parameters()), tmp_path / "ck", history) == 5
    assert history == [{"step": 5}]
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()  # still tied
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    bigger = _tiny_lm(vocab=96)
    with pytest.raises(TrainingError, match="does not match the model"):
        trainer._resume(bigger, torch.optim.AdamW(bigger.parameters()), tmp_path / "ck", [])
