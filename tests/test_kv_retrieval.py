"""The KV retrieval task (llm_compress/kv/retrieval.py) and its measurement (kv.measure.retrieval_correct).

The scoring is tested on a hand-built model that copies from what the cache returns: it reads each held value's
token id and predicts the token that followed the latest earlier occurrence of the last 12 tokens. Given the whole
past it answers every probe; a sink cache that evicted the fact leaves it nothing to copy, so it fails exactly the
probes whose fact is outside the window, while the full cache's score is unchanged.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from llm_compress.errors import InputError
from llm_compress.kv import build_cache
from llm_compress.kv.measure import retrieval_correct
from llm_compress.kv.retrieval import (answer_text, fact_sentence, lm_eval_records, plant, probes, query_text,
                                       summarize, training_rows)

ENCODE = lambda text: [ord(c) for c in text]  # noqa: E731  (character-level token ids < 128)
FILLER = "".join(random.Random(1).choice("abcdefgh \n") for _ in range(20000))
STREAM = ENCODE(FILLER)


class CopyModel(torch.nn.Module):
    """Stores each token's id as its value (and its position as its key) in the cache, then predicts from the values
    the cache returns: ``copies=True`` the token after the latest earlier match of the last ``n`` held tokens,
    ``copies=False`` always token 0. Logits only for the last position (all that ``stepwise_logits`` reads)."""

    def __init__(self, copies: bool = True, n: int = 12):
        super().__init__()
        self.copies, self.n = copies, n
        self.config = LlamaConfig(vocab_size=128, hidden_size=8, num_attention_heads=1, num_key_value_heads=1,
                                  num_hidden_layers=1, intermediate_size=8)

    def forward(self, input_ids, past_key_values, use_cache=True):
        b, q = input_ids.shape
        seen = past_key_values.get_seq_length()
        k = torch.zeros(b, 1, q, 8)
        k[..., 0] = torch.arange(seen, seen + q, dtype=torch.float)
        v = torch.zeros(b, 1, q, 8)
        v[..., 0] = input_ids[:, None].float()
        _, values = past_key_values.update(k, v, 0)
        held = values[:, 0, :, 0].round().long().tolist()  # [b, held] token ids, oldest first
        logits = torch.full((b, 1, 128), -1e4)
        for row, toks in enumerate(held):
            logits[row, 0, self.predict(toks)] = 0.0
        return SimpleNamespace(logits=logits)

    def predict(self, toks: list[int]) -> int:
        if not self.copies:
            return 0
        tail = toks[-self.n:]
        for j in range(len(toks) - 1, self.n - 1, -1):  # latest first; toks[j] follows the candidate match
            if toks[j - self.n:j] == tail:
                return toks[j]
        return 0


def char_probes(**kw):
    return probes(STREAM, ENCODE, **{"contexts": [400, 600], "per_depth": 3, **kw})


def test_plant_places_inserts_at_their_depths_and_keeps_the_length():
    doc, starts = plant("." * 100, [(0.5, "BBB"), (0.1, "AA")], "?Q", 50)
    assert len(doc) == 50 and doc.endswith("?Q")
    assert starts == [24, 5] and doc[5:7] == "AA" and doc[24:27] == "BBB"  # depth x 48 units before the tail
    with pytest.raises(InputError, match="filler"):
        plant("." * 10, [(0.5, "A")], "Q", 50)


def test_probes_ask_for_a_planted_fact_at_the_end_at_increasing_depths():
    items = char_probes()
    assert len(items) == 2 * 5 * 3
    for p in items:
        assert len(p.prompt) + len(p.answer) == p.context
        assert p.prompt[-len(ENCODE(query_text(p.name))):] == ENCODE(query_text(p.name))
        fact = ENCODE(fact_sentence(p.name, p.value))
        assert p.prompt[p.position:p.position + len(fact)] == fact
        assert p.answer == ENCODE(answer_text(p.value)) and len(p.value) == 4
        body = len(p.prompt) - len(ENCODE(query_text(p.name)))
        assert abs(p.position - p.depth * body) <= 3 * len(fact)  # pushed by at most the distractors after it
    depth_means = [sum(p.position for p in items if p.context == 600 and p.depth == d) for d in (0.1, 0.5, 0.9)]
    assert depth_means == sorted(depth_means)
    again = char_probes()
    assert [(p.name, p.value, p.prompt) for p in again] == [(p.name, p.value, p.prompt) for p in items]
    other = char_probes(seed=1)
    assert [p.value for p in other] != [p.value for p in items]


def test_character_probes_for_lm_eval():
    items = probes(FILLER, str, contexts=[500], depths=[0.5], per_depth=2, distractors=1)
    recs = lm_eval_records(items)
    assert len(recs) == 2 and all(r["context"].endswith(query_text(p.name)) for r, p in zip(recs, items))
    assert all(fact_sentence(p.name, p.value) in r["context"] and r["answer"] == p.value for r, p in zip(recs, items))


def test_training_rows_hold_every_fact_and_ask_for_it_at_the_end():
    rows = training_rows(STREAM, ENCODE, rows=5, seq_len=1024, facts=4, seed=3)
    assert all(len(r) == 1024 for r in rows)
    text = "".join(map(chr, rows[0]))
    tail = text[text.index(" The code of", 1024 - 4 * 40):]  # the queries (with answers) close the row
    asked = [s.strip() for s in tail.split(".") if s.strip()]
    assert len(asked) == 4
    for a in asked:  # every asked fact was stated earlier, with the same code
        assert text.index(" " + a + ".") < 1024 - len(tail)
    assert training_rows(STREAM, ENCODE, rows=5, seq_len=1024, facts=4, seed=3) == rows
    with pytest.raises(InputError, match="embedded.retrieval.facts"):
        training_rows(STREAM, ENCODE, rows=1, seq_len=256, facts=8, seed=0)


def test_a_copying_model_answers_every_probe_and_a_model_that_never_copies_none():
    items = char_probes()
    full = lambda: DynamicCache()  # noqa: E731
    assert all(retrieval_correct(CopyModel(), items, full, batch_size=4))
    assert not any(retrieval_correct(CopyModel(copies=False), items, full))


def test_a_sink_cache_that_evicted_the_fact_scores_zero_and_the_full_cache_is_unchanged():
    model = CopyModel()
    items = probes(STREAM, ENCODE, contexts=[600], depths=[0.1, 0.3, 0.9], per_depth=4, distractors=0)
    full = retrieval_correct(model, items, lambda: DynamicCache())
    sink = retrieval_correct(model, items, lambda: build_cache({"method": "sink", "sinks": 4, "window": 124}, model))
    assert all(full)
    for p, ok in zip(items, sink):
        held_from = 600 - 124  # the window's first token when the answer's first token is predicted (~)
        assert ok == (p.position > held_from), (p.depth, p.position)
    s = summarize(items, sink, full)["600"]
    assert s["0.1"]["accuracy"] == s["0.3"]["accuracy"] == 0.0 and s["0.9"]["accuracy"] == 1.0
    assert s["all"]["vs_ref"] == pytest.approx(1 / 3, abs=1e-3)


def test_summary_intervals():
    items = char_probes(contexts=[400])
    all_right = summarize(items, [True] * len(items))["400"]
    assert all_right["all"] == {"accuracy": 1.0, "lo": 1.0, "hi": 1.0, "probes": 15}
    half = [i % 2 == 0 for i in range(len(items))]
    s = summarize(items, half, [True] * len(items))["400"]["all"]
    assert s["lo"] < s["accuracy"] < s["hi"] and s["hi"] - s["lo"] > 0.2  # 15 coin flips: a wide interval
    assert s["vs_ref"] == s["accuracy"] and s["vs_ref_lo"] < s["vs_ref"] < s["vs_ref_hi"]
    with pytest.raises(ValueError):
        summarize(items, half[:-1])


def test_the_bootstrap_config_keys_the_retrieval_mix():
    """The bootstrap stage's keyed config holds the mix (None when unused: the key covers every field the stage
    reads, tests/test_reads.py), so a teacher trained with it is never served for a recipe without it."""
    from llm_compress.config import parse_recipe
    from llm_compress.pipeline.bootstrap import STAGE

    env = SimpleNamespace(device="cpu")
    base = {"name": "r", "models": {"teacher": "embedded", "student": "derive"}, "data": {"source": "embedded"}}
    plain = STAGE.config(parse_recipe(base), {}, env)
    mixed = STAGE.config(parse_recipe({**base, "embedded": {"retrieval": {"share": 0.4}}}), {}, env)
    assert plain["embedded"]["retrieval"] is None
    assert mixed["embedded"]["retrieval"] == {"share": 0.4, "facts": 4}
    assert {k: v for k, v in mixed["embedded"].items() if k != "retrieval"} == \
        {k: v for k, v in plain["embedded"].items() if k != "retrieval"}
