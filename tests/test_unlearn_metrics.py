"""Forgetting metrics (llm_compress.unlearn.metrics): hand-computed values on hand-made logits and strings, and on a
tiny random Llama (CPU) against plain per-record greedy loops and torch cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llm_compress.unlearn.data import ForgetSet
from llm_compress.unlearn.metrics import (answer_prob, extraction_strength, forget_metrics, greedy_continuations,
                                          min_k_scores, mink_auc, rouge_l, utility_metrics)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PAD, BOS, EOS = 64, 0, 1, 2
KIVI16 = {"method": "kivi", "bits": [16, 16], "group_size": 8, "residual": 8}


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)  # head_dim 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


def forget_set(rows: list[list[int]], prompt_lens: list[int]) -> ForgetSet:
    """Right-padded rows; the span is every token from prompt_len to the row's end."""
    N, T = len(rows), max(map(len, rows))
    ids = torch.full((N, T), PAD, dtype=torch.long)
    attn = torch.zeros(N, T, dtype=torch.bool)
    span = torch.zeros(N, T, dtype=torch.bool)
    for n, (r, p) in enumerate(zip(rows, prompt_lens)):
        ids[n, :len(r)] = torch.tensor(r)
        attn[n, :len(r)] = True
        span[n, p:len(r)] = True
    return ForgetSet(ids, attn, span, torch.tensor(prompt_lens), PAD)


class WordTokenizer:
    """Token i decodes to the word 'w{i}'; pad/bos/eos are special."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in (PAD, BOS, EOS)))


def greedy_ref(model, prompt: list[int], n: int) -> list[int]:
    """Plain unbatched greedy decoding without a cache, EOS banned (as min_new_tokens does)."""
    x = torch.tensor([prompt])
    out = []
    for _ in range(n):
        logits = model(x).logits[0, -1]
        logits[EOS] = -float("inf")
        tok = int(logits.argmax())
        out.append(tok)
        x = torch.cat([x, torch.tensor([[tok]])], 1)
    return out


def one_hot_logits(preds: list[list[int]], V: int = VOCAB) -> torch.Tensor:
    """Logits [N, T, V] whose argmax at (n, t) is preds[n][t]."""
    return F.one_hot(torch.tensor(preds), V).float() * 5.0


# ---------------------------------------------------------------------------------------------------- pure metrics

def test_rouge_l_recall_by_hand():
    # reference 6 words; LCS with "the cat on mat" is "the cat on mat" = 4 words -> recall 4/6
    # "d c b a" vs "a b c d": any common subsequence has 1 word -> 1/4; stemming: "cats sitting" = "cat sit"
    # -> LCS 2 of 2; empty prediction -> 0
    got = rouge_l(["the cat on mat", "d c b a", "cat sit", ""],
                  ["the cat sat on the mat", "a b c d", "cats sitting", "anything here"])
    assert got == pytest.approx([4 / 6, 1 / 4, 1.0, 0.0])


def test_extraction_strength_by_hand():
    # row: [1, 5, 6, 7, 8, 9], span = positions 2..5 (labels 6 7 8 9, L = 4) predicted from logits at 1..4
    row, p = [1, 5, 6, 7, 8, 9], 2
    fs = forget_set([row] * 5 + [[1, 5, 6, 7]], [p] * 5 + [2])  # last: span 6 7 (L = 2), right-padded by 2
    preds = [[0, 0, 0, 8, 9, 0],  # only the last 2 match: k = 2 -> 1 - 2/4 = 0.5
             [0, 6, 7, 8, 9, 0],  # all match: k = 0 -> 1.0
             [0, 6, 7, 8, 0, 0],  # last wrong: k = 4 -> 0.0
             [0, 6, 0, 8, 9, 0],  # second wrong: k = 2 -> 0.5 (the matching first token does not count)
             [0, 0, 7, 8, 9, 0],  # first wrong: k = 1 -> 0.75
             [0, 6, 7, 3, 3, 3]]  # both match; predictions at padding are ignored -> 1.0
    es = extraction_strength(one_hot_logits(preds), fs)
    assert es.tolist() == pytest.approx([0.5, 1.0, 0.0, 0.5, 0.75, 1.0])


def test_answer_prob_by_hand():
    # row [1, 3, 0, 3]: prompt 2, span = tokens 0 and 3 at positions 2, 3, predicted from logits at 1 and 2.
    # p(0 | .) = 0.5, p(3 | .) = 0.4 -> exp(mean(log 0.5, log 0.4)) = sqrt(0.2)
    fs = forget_set([[1, 3, 0, 3]], [2])
    logits = torch.zeros(1, 4, 4)
    logits[0, 1] = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    logits[0, 2] = torch.tensor([0.1, 0.2, 0.3, 0.4]).log() + 7.0  # a shift does not change the softmax
    logits[0, 0] = torch.tensor([9.0, 0.0, 0.0, 0.0])  # outside the span: ignored
    assert answer_prob(logits, fs).item() == pytest.approx(math.sqrt(0.2), rel=1e-5)


def _target_logits(ids: torch.Tensor, probs: list[list[float]], V: int = 16) -> torch.Tensor:
    """Logits [N, T, V] giving p(ids[n, t + 1] | .) = probs[n][t] (the rest spread evenly)."""
    N, T = ids.shape
    out = torch.zeros(N, T, V)
    for n in range(N):
        for t, p in enumerate(probs[n]):
            row = torch.full((V,), (1 - p) / (V - 1))
            row[ids[n, t + 1]] = p
            out[n, t] = row.log()
    return out


def test_min_k_scores_by_hand():
    ids = torch.tensor([[1, 4, 5, 6, 7, 8], [1, 9, 10, 11, 0, 0]])
    probs = [[0.5, 0.1, 0.9, 0.2, 0.8], [0.5, 0.1, 0.9, 0.01, 0.01]]
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    got = min_k_scores(_target_logits(ids, probs), ids, mask, 0.4)
    # row 0: n = 5, ceil(0.4 * 5) = 2 lowest: 0.1, 0.2; row 1: n = 3 (padding excluded), ceil(1.2) = 2: 0.1, 0.5
    want = [-(math.log(0.1) + math.log(0.2)) / 2, -(math.log(0.1) + math.log(0.5)) / 2]
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # k = 0.2: ceil(1.0) = 1 and ceil(0.6) = 1 -> the single lowest
    assert min_k_scores(_target_logits(ids, probs), ids, mask, 0.2).tolist() == pytest.approx(
        [-math.log(0.1)] * 2, rel=1e-5)
    # k = 1.0: the mean NLL of all counted tokens
    assert min_k_scores(_target_logits(ids, probs), ids, mask, 1.0)[0].item() == pytest.approx(
        -sum(map(math.log, probs[0])) / 5, rel=1e-5)


def test_min_k_count_is_not_fooled_by_float_rounding():
    # 0.3 * 10 = 3.0000000000000004 in floats: still 3 tokens, not 4
    ids = torch.arange(1, 12)[None]
    probs = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]]
    mask = torch.ones(1, 11, dtype=torch.bool)
    got = min_k_scores(_target_logits(ids, probs), ids, mask, 0.3).item()
    assert got == pytest.approx(-(math.log(0.1) + math.log(0.2) + math.log(0.3)) / 3, rel=1e-5)


def test_mink_auc_by_hand():
    assert mink_auc([1.0, 2.0], [3.0, 4.0]) == 1.0  # non-members all score higher: members detectable
    assert mink_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    # pairs (member, non-member): (1,2) ok, (1,4) ok, (3,2) swapped, (3,4) ok -> 3/4
    assert mink_auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])) == 0.75
    assert mink_auc([1.0, 1.0], [1.0, 1.0]) == 0.5


# ---------------------------------------------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def records():
    """Five records with prompts of 2..7 tokens and spans of 3..6 tokens (ids avoid pad/bos/eos)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 5), (7, 3), (2, 6), (5, 4), (4, 6)]  # (prompt, span)
    rows = [[BOS] + torch.randint(3, VOCAB, (p + s - 1,), generator=g).tolist() for p, s in shapes]
    return forget_set(rows, [p for p, _ in shapes])


def test_greedy_continuations_match_unbatched_loop(model, records):
    want = [greedy_ref(model, records.ids[n, :int(records.prompt_len[n])].tolist(),
                       min(int(records.span[n].sum()), 5)) for n in range(len(records))]
    assert [len(w) for w in want] == [5, 3, 5, 4, 5]  # max_new_tokens 5 cuts the longer spans
    for bs in (2, 8):  # several left-padded batches, and one batch of all
        assert greedy_continuations(model, records, max_new_tokens=5, batch_size=bs) == want
    assert greedy_continuations(model, records, max_new_tokens=5, batch_size=3, kv_spec=KIVI16) == want


def test_greedy_continuations_never_stop_at_eos(model, records):
    # +100 on the EOS logit makes EOS every step's argmax: rows must still get their full length (EOS banned)
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + 100.0 * F.one_hot(
        torch.tensor(EOS), VOCAB).to(out.dtype))
    try:
        with torch.no_grad():
            assert int(model(records.ids[:1, :3]).logits[0, -1].argmax()) == EOS
        got = greedy_continuations(model, records, max_new_tokens=4, batch_size=2)
        want = [greedy_ref(model, records.ids[n, :int(records.prompt_len[n])].tolist(),
                           min(int(records.span[n].sum()), 4)) for n in range(len(records))]
    finally:
        hook.remove()
    assert got == want and [len(c) for c in got] == [4, 3, 4, 4, 4] and all(EOS not in c for c in got)


def test_forget_metrics_on_memorised_and_random_records(model, records):
    # the first two records' spans are the model's own greedy continuation: ES = 1 and ROUGE-L = 1 for them
    g = torch.Generator().manual_seed(5)
    rows, plens = [], []
    for p, s in [(4, 5), (6, 3)]:
        prompt = [BOS] + torch.randint(3, VOCAB, (p - 1,), generator=g).tolist()
        cont = greedy_ref(model, prompt, s)
        with torch.no_grad():  # plain argmax picks no EOS here, so banning it changes nothing
            assert model(torch.tensor([prompt + cont])).logits[0, p - 1:-1].argmax(-1).tolist() == cont
        rows.append(prompt + cont)
        plens.append(p)
    rows += [records.ids[n, :int(records.attn[n].sum())].tolist() for n in range(3)]
    fs = forget_set(rows, plens + records.prompt_len[:3].tolist())
    holdout = records.rows([3, 4])
    model.train()
    out = forget_metrics(model, fs, tokenizer=WordTokenizer(), holdout=holdout, max_new_tokens=8, batch_size=2)
    assert model.training  # mode restored
    model.eval()
    assert out["records"] == 5
    per = out["per_record"]
    assert per["extraction_strength"][:2] == [1.0, 1.0] and per["rouge_l"][:2] == [1.0, 1.0]
    for key in ("rouge_l", "extraction_strength", "answer_prob"):
        assert len(per[key]) == 5 and all(0.0 <= v <= 1.0 for v in per[key])
        assert out[key] == pytest.approx(sum(per[key]) / 5) and isinstance(out[key], float)
    assert isinstance(out["mink_auc"], float) and 0.0 <= out["mink_auc"] <= 1.0
    # answer_prob agrees with one unbatched forward of a record
    with torch.no_grad():
        logits = model(fs.ids[2:3], attention_mask=fs.attn[2:3].long()).logits
    assert per["answer_prob"][2] == pytest.approx(answer_prob(logits, fs.rows([2])).item(), rel=1e-4)
    # the KV path runs and, lossless, gives the same figures; no holdout -> no AUC
    kv = forget_metrics(model, fs, tokenizer=WordTokenizer(), max_new_tokens=8, kv_spec=KIVI16)
    assert kv["mink_auc"] is None and kv["rouge_l"] == out["rouge_l"]


def test_utility_metrics_against_cross_entropy(model):
    rows = torch.randint(3, VOCAB, (5, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(rows).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1))
    same = utility_metrics(model, model, rows, batch_size=2)
    assert same["ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert same["kl_to_original"] == pytest.approx(0.0, abs=1e-6)
    assert "kl_to_original" not in utility_metrics(model, None, rows)
    torch.manual_seed(1)
    other = LlamaForCausalLM(_config()).eval()
    assert utility_metrics(model, other, rows)["kl_to_original"] > 1e-3
