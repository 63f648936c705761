"""Forgetting evaluation of the unlearning stage: how much of the forget set a model still reproduces, and what the
unlearning cost on general text.

Definitions follow open-unlearning (locuslab/open-unlearning, ``src/evals/metrics``); a record's span is the tokens
to forget (:class:`llm_compress.unlearn.data.ForgetSet`), span token t predicted from the logits at t - 1:

- ``rouge_l``: ROUGE-L recall (TOFU's ``rougeL_recall``) of the greedy continuation of the record's prompt against
  the span's text (both cut to the same number of tokens: min(span length, ``max_new_tokens``));
- ``extraction_strength``: under teacher forcing, preds = argmax over the span; ES = 1 - k / L with k the smallest
  index such that preds[k:] == labels[k:] (k = L when even the last token is wrong);
- ``answer_prob``: exp(-mean NLL over the span), open-unlearning's length-normalised Probability;
- ``mink_auc``: Min-K% Prob membership attack (k = 0.4 as MUSE's PrivLeak), ROC AUC with forget = 0, holdout = 1:
  1.0 = forget records perfectly detectable as members, 0.5 = indistinguishable from unseen text.
Utility on held-out general rows: perplexity and KL(original || model), as :mod:`llm_compress.evaluate`.
"""

from __future__ import annotations

import math

import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score

from llm_compress.scoring import score
from llm_compress.unlearn.base import span_nll, token_logp
from llm_compress.unlearn.data import ForgetSet


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L recall per pair: LCS(prediction, reference) / len(reference) in (Porter-stemmed) words."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references, strict=True)]


def _want(fs: ForgetSet, max_new_tokens: int) -> list[int]:
    """Tokens to generate per record: min(span length, max_new_tokens)."""
    return [min(int(n), max_new_tokens) for n in fs.span.sum(1).tolist()]


@torch.no_grad()
def greedy_continuations(model, fs: ForgetSet, *, max_new_tokens: int, batch_size: int = 8,
                         kv_spec: dict | None = None) -> list[list[int]]:
    """Greedy continuation of each record's prompt ids[n, :prompt_len[n]], min(span, max_new_tokens) tokens long.

    Batches are left-padded; every row generates the batch's longest count (``min_new_tokens`` too, so EOS is
    never chosen: a continuation always has its full length) and is cut to its own. With ``kv_spec`` each
    ``generate`` gets a fresh compressed cache (:func:`llm_compress.kv.build_cache`). Returns token ids per record.
    """
    device = next(model.parameters()).device
    want = _want(fs, max_new_tokens)
    plen = fs.prompt_len.tolist()
    order = sorted(range(len(fs)), key=lambda n: (plen[n], want[n]))  # similar prompts together: less padding
    out: list[list[int]] = [[] for _ in range(len(fs))]
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        P, M = max(plen[n] for n in idx), max(want[n] for n in idx)
        prompt = torch.full((len(idx), P), fs.pad_id, dtype=torch.long)  # [B, P], left padding
        mask = torch.zeros(len(idx), P, dtype=torch.long)
        for r, n in enumerate(idx):
            prompt[r, P - plen[n]:] = fs.ids[n, :plen[n]]
            mask[r, P - plen[n]:] = 1
        prompt, mask = prompt.to(device), mask.to(device)
        extra = {}
        if kv_spec is not None:
            from llm_compress.kv import build_cache

            extra["past_key_values"] = build_cache(kv_spec, model, attention_mask=mask)
        gen = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=M, min_new_tokens=M,
                             pad_token_id=fs.pad_id, use_cache=True, **extra)  # [B, P + M]
        for r, n in enumerate(idx):
            out[n] = gen[r, P:P + want[n]].tolist()
    return out


def extraction_strength(logits: torch.Tensor, fs: ForgetSet) -> torch.Tensor:
    """ES per record, [N]: with preds = argmax logits and the span's L labels in order, k = smallest index such
    that preds[k:] == labels[k:] (k = L if the last one differs); ES = 1 - k / L."""
    preds = logits[:, :-1].argmax(-1)  # [N, T-1]: the prediction for token t + 1
    labels, span = fs.ids[:, 1:].to(logits.device), fs.span[:, 1:].to(logits.device)
    wrong = (preds != labels) & span  # [N, T-1]
    rank = span.long().cumsum(-1)  # 1-based index of each span token within its span
    k = (rank * wrong).amax(-1)  # [N]: the last wrong span token's index (1-based), 0 if none
    L = span.sum(-1).clamp(min=1)
    return 1.0 - k.float() / L.float()


def answer_prob(logits: torch.Tensor, fs: ForgetSet) -> torch.Tensor:
    """Length-normalised answer probability per record, [N]: exp(-(1/L) sum_{t in span} -log p(y_t | y_<t))."""
    return torch.exp(-span_nll(logits, fs.to(logits.device)))


def min_k_scores(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """Min-K% Prob score per row, [N]: -mean of the ceil(k n) lowest log p(ids[t] | ids[<t]) over the n positions t
    with mask[t] (mask[:, 0] is ignored: nothing predicts the first token). Higher = less likely a member."""
    m = mask.to(logits.device).bool().clone()
    m[:, 0] = False
    tok = token_logp(logits, ids.to(logits.device))  # [N, T]
    tok = tok.masked_fill(~m, float("inf")).sort(-1).values  # ascending: the lowest first, unused last
    n = m.sum(-1)
    kk = torch.tensor([max(1, math.ceil(k * c - 1e-9)) for c in n.tolist()], device=tok.device)  # 1e-9: 0.3*10
    keep = torch.arange(tok.shape[1], device=tok.device)[None, :] < kk[:, None]  # [N, T-1]
    score = -(tok.masked_fill(~keep, 0.0)).sum(-1) / kk
    return score.masked_fill(n == 0, 0.0)  # a row with no counted token: 0, as open-unlearning


def mink_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of Min-K scores with labels member = 0, non-member = 1 (open-unlearning's convention): the chance
    that a random non-member scores above a random member. 1.0 = members perfectly detectable, 0.5 = not at all."""
    member = torch.as_tensor(member_scores, dtype=torch.float64).flatten().tolist()
    non = torch.as_tensor(nonmember_scores, dtype=torch.float64).flatten().tolist()
    return float(roc_auc_score([0] * len(member) + [1] * len(non), member + non))


def _record_mask(fs: ForgetSet) -> torch.Tensor:
    """Min-K positions of a record: all its real tokens after the first, [N, T]."""
    m = fs.attn.clone()
    m[:, 0] = False
    return m


@torch.no_grad()
def _teacher_forced(model, fs: ForgetSet, batch_size: int, min_k: float, device) -> dict[str, torch.Tensor]:
    """ES, answer probability and Min-K score per record from one forward per batch."""
    acc = {"extraction_strength": [], "answer_prob": [], "min_k": []}
    for i in range(0, len(fs), batch_size):
        b = fs.rows(slice(i, i + batch_size))
        T = int(b.attn.sum(1).max())  # the batch's longest record: drop padding columns
        b = ForgetSet(b.ids[:, :T], b.attn[:, :T], b.span[:, :T], b.prompt_len, b.pad_id)
        b = b.to(device)
        logits = model(b.ids, attention_mask=b.attn.long()).logits.float()  # [B, T, V]
        acc["extraction_strength"].append(extraction_strength(logits, b).cpu())
        acc["answer_prob"].append(answer_prob(logits, b).cpu())
        acc["min_k"].append(min_k_scores(logits, b.ids, _record_mask(b), min_k).cpu())
    return {k: torch.cat(v) for k, v in acc.items()}


def forget_metrics(model, fs: ForgetSet, *, tokenizer, holdout: ForgetSet | None = None, min_k: float = 0.4,
                   max_new_tokens: int = 48, batch_size: int = 8, kv_spec: dict | None = None) -> dict:
    """Forgetting figures of ``model`` on the forget set ``fs`` (see the module docstring): means over records and
    the per-record values; ``mink_auc`` (forget vs ``holdout`` records) is None without a holdout. The model runs
    in eval mode under no_grad; its train/eval mode is restored after."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tf = _teacher_forced(model, fs, batch_size, min_k, device)
            auc = None
            if holdout is not None:
                auc = mink_auc(tf["min_k"], _teacher_forced(model, holdout, batch_size, min_k, device)["min_k"])
            conts = greedy_continuations(model, fs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         kv_spec=kv_spec)
    finally:
        model.train(was_training)
    preds = [tokenizer.decode(c, skip_special_tokens=True) for c in conts]
    refs = [tokenizer.decode(fs.ids[n][fs.span[n]][:len(c)].tolist(), skip_special_tokens=True)
            for n, c in enumerate(conts)]  # the span's first len(c) tokens: what the continuation should be
    per = {"rouge_l": rouge_l(preds, refs), "extraction_strength": tf["extraction_strength"].tolist(),
           "answer_prob": tf["answer_prob"].tolist()}
    out = {"records": len(fs)}
    out.update({k: float(sum(v) / len(v)) for k, v in per.items()})
    out["mink_auc"] = auc
    out["per_record"] = {k: [float(x) for x in v] for k, v in per.items()}
    return out


def utility_metrics(model, original, rows: torch.Tensor, *, batch_size: int = 8) -> dict:
    """On held-out general token rows [R, T]: ``ppl`` = exp(mean next-token NLL) and, with an ``original`` model,
    ``kl_to_original`` = mean over positions of KL(original || model) (:func:`llm_compress.scoring.score`, the original
    as the reference). Both models run in eval mode; their train/eval modes are restored after."""
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in (model, original) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        s = score({"model": model}, original if original is not None else model, rows, batch_size, device,
                  progress=False)["model"]
    finally:
        for m, mode in modes:
            m.train(mode)
    return {"ppl": s["ppl"], **({"kl_to_original": s["kl_to_teacher"]} if original is not None else {})}
