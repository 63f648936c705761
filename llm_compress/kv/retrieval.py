"""A retrieval task for KV caches: key-value facts planted at some depth of a long document, asked for at its end.

A perplexity ratio can stay near 1 for a cache that forgets everything but the recent past, because most next tokens
of ordinary text are predictable from nearby ones. This task cannot be solved without the distant past: the answer
is a random code stated once, somewhere in the document, and asked for at its end::

    ... filler ... The code of Velmor Thadrin is 4821. ... filler ... The code of Velmor Thadrin is| 4821

Documents are sequences of *units*: token ids (lists of ints, for the bench model, whose tokenizer encodes the
fact and query sentences) or characters (strings, for a text data file any model's tokenizer reads, e.g. the
lm-evaluation-harness task under ``bench/lm_eval/``). The filler is text of the embedded corpus: its training split
for the training documents, its held-out split for the probes. Everything is drawn from ``random.Random`` seeded by
strings, so the same seed gives the same documents in any process. No torch here: the bootstrap stage mixes
:func:`training_rows` into the teacher's training tokens, and :mod:`llm_compress.kv.measure`'s
``retrieval_accuracy`` scores :func:`probes` through a cache.

Every fact sentence and query starts with a space, so a byte-level BPE (pre-tokenised at spaces) encodes the name
and the value the same way in the fact, in the query and in the answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from llm_compress.errors import InputError
from llm_compress.facts import invented_name

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the asked fact starts, as a share of the prompt before the query
CONTEXTS = (1024, 2048)  # probe lengths (prompt + answer), in tokens
VALUE_DIGITS = 4

Encode = Callable[[str], list]  # text -> units (token ids); ``str`` itself for character units


def fact_sentence(name: str, value: str) -> str:
    return f" The code of {name} is {value}."


def query_text(name: str) -> str:
    return f" The code of {name} is"


def answer_text(value: str) -> str:
    return f" {value}"


def draw_facts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` facts (name, value) with distinct names: a two-word invented name and a ``VALUE_DIGITS``-digit code
    (no leading zero). Names are :func:`llm_compress.facts.invented_name`'s, values digits: both are spelled
    with bytes a BPE trained on English and code has seen, and no name occurs in the corpus."""
    facts: dict[str, str] = {}
    while len(facts) < n:
        facts.setdefault(invented_name(rng), str(rng.randint(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS - 1)))
    return list(facts.items())


def plant(filler: Sequence, inserts: list[tuple[float, Sequence]], tail: Sequence,
          length: int) -> tuple[Sequence, list[int]]:
    """A document of exactly ``length`` units: ``filler``'s first units with each insert's units placed so that it
    starts at ``depth`` x (length - len(tail)), then ``tail``. Returns the document and where each insert starts
    (units from the document's start, in the order given). Inserts that would overlap are pushed right; the filler
    must be long enough (``length`` units at least)."""
    body = length - len(tail)
    planted = sum(len(u) for _, u in inserts)
    if body < planted:
        raise InputError(f"retrieval: a document of {length} units cannot hold {planted} units of facts and "
                         f"{len(tail)} of query")
    if len(filler) < body - planted:
        raise InputError(f"retrieval: the filler has {len(filler)} units, fewer than the {body - planted} needed")
    order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    pieces, starts, used, pos = [], [0] * len(inserts), 0, 0  # used: filler units taken; pos: document position
    for i in order:
        depth, units = inserts[i]
        want = min(max(round(depth * body), pos), body - sum(len(inserts[j][1]) for j in order[order.index(i):]))
        pieces.append(filler[used:used + want - pos])
        used += want - pos
        starts[i] = want
        pieces.append(units)
        pos = want + len(units)
    pieces.append(filler[used:used + body - pos])
    pieces.append(tail)
    doc = "".join(pieces) if isinstance(filler, str) else [u for p in pieces for u in p]
    assert len(doc) == length, (len(doc), length)
    return doc, starts


def _window(stream: Sequence, rng: random.Random, n: int) -> Sequence:
    """``n`` consecutive units of ``stream`` from a random start."""
    if len(stream) < n:
        raise InputError(f"retrieval: the filler stream has {len(stream)} units, fewer than the {n} a document needs")
    start = rng.randrange(len(stream) - n + 1)
    return stream[start:start + n]


def training_rows(stream: Sequence[int], encode: Encode, *, rows: int, seq_len: int, facts: int,
                  seed: int) -> list[list[int]]:
    """``rows`` training rows of exactly ``seq_len`` token ids: ``facts`` facts at uniformly random depths of a window
    of the training-token ``stream``, then every fact asked for in a shuffled order, each query followed by its
    answer and a full stop, so a row trains ``facts`` retrievals at once (the loss is on every token, the answers'
    among them). Rows differ in filler window, facts and depths."""
    rng = random.Random(f"retrieval-train-{seed}")
    out = []
    for _ in range(rows):
        kv = draw_facts(rng, facts)
        qa = list(kv)
        rng.shuffle(qa)
        tail = [t for name, value in qa for t in encode(query_text(name) + answer_text(value) + ".")]
        inserts = [(rng.random(), encode(fact_sentence(name, value))) for name, value in kv]
        if sum(len(u) for _, u in inserts) + len(tail) > seq_len // 2:
            raise InputError(f"embedded.retrieval.facts: {facts} facts and their queries take more than half of "
                             f"a {seq_len}-token row")
        doc, _ = plant(_window(stream, rng, seq_len), inserts, tail, seq_len)
        out.append(doc)
    return out


@dataclass(frozen=True)
class Probe:
    """One held-out question: ``prompt`` (units) ends with the query, ``answer`` (units) is the value to produce.
    ``context`` = len(prompt) + len(answer); the asked fact starts at unit ``position`` (``depth`` of the prompt
    before the query), the ``distractors`` other facts at random depths."""

    context: int
    depth: float
    position: int
    name: str
    value: str
    prompt: Sequence
    answer: Sequence
    distractors: int


def probes(stream: Sequence, encode: Encode, *, contexts: Sequence[int] = CONTEXTS,
           depths: Sequence[float] = DEPTHS, per_depth: int = 20, distractors: int = 3, seed: int = 0) -> list[Probe]:
    """``per_depth`` probes for every (context, depth): the asked fact at that depth of the prompt, ``distractors``
    other facts (other names and codes) at random depths, the filler a random window of the held-out ``stream``."""
    for d in depths:
        if not 0 <= d <= 1:
            raise InputError(f"retrieval: depth {d} is not in [0, 1]")
    rng = random.Random(f"retrieval-probes-{seed}")
    out = []
    for context in contexts:
        for depth in depths:
            for _ in range(per_depth):
                (name, value), *others = draw_facts(rng, 1 + distractors)
                answer, query = encode(answer_text(value)), encode(query_text(name))
                length = context - len(answer)
                inserts = [(depth, encode(fact_sentence(name, value)))]
                inserts += [(rng.random(), encode(fact_sentence(n, v))) for n, v in others]
                if sum(len(u) for _, u in inserts) + len(query) > length // 2:
                    raise InputError(f"retrieval: a {context}-unit probe is too short for {1 + distractors} facts")
                prompt, starts = plant(_window(stream, rng, length), inserts, query, length)
                out.append(Probe(context, depth, starts[0], name, value, prompt, answer, distractors))
    return out


def lm_eval_records(items: list[Probe]) -> list[dict]:
    """Character probes as the lines of the lm-evaluation-harness data file: ``context`` (the prompt's text),
    ``answer`` (the code, without its leading space: the task strips the generation), depth and length."""
    return [{"context": p.prompt, "answer": p.value, "depth": p.depth, "chars": len(p.prompt) + len(p.answer),
             "position": p.position} for p in items if isinstance(p.prompt, str)]


def probe_json(p: Probe) -> str:
    return json.dumps(asdict(p), ensure_ascii=False)


def _interval(correct: Sequence[bool], ref: Sequence[bool] | None, rng: random.Random,
              samples: int) -> tuple[float, float, float, list[float]]:
    """Accuracy of ``correct`` (or, with ``ref``, its ratio to ``ref``'s accuracy on the same probes), and the 2.5th
    and 97.5th percentiles over ``samples`` resamplings of the probes with replacement (paired: one resampling for
    both); the resampled figures too."""
    n = len(correct)

    def figure(ix: Sequence[int]) -> float:
        acc = sum(correct[i] for i in ix) / len(ix)
        if ref is None:
            return acc
        base = sum(ref[i] for i in ix) / len(ix)
        return acc / base if base else float("nan")

    point = figure(range(n))
    boot = sorted(figure([rng.randrange(n) for _ in range(n)]) for _ in range(samples))
    boot = [b for b in boot if b == b]  # a resampling with no reference hit has no ratio
    if not boot:
        return point, float("nan"), float("nan"), boot
    lo, hi = boot[int(0.025 * (len(boot) - 1))], boot[int(round(0.975 * (len(boot) - 1)))]
    return point, lo, hi, boot


def summarize(items: Sequence[Probe], correct: Sequence[bool], ref: Sequence[bool] | None = None, *,
              samples: int = 1000, seed: int = 0) -> dict:
    """Retrieval accuracy per context and depth, and per context over all depths, each with a 95 % bootstrap
    interval over the probes (percentile method, ``samples`` resamplings); with ``ref`` (the full cache's
    ``correct`` on the same probes) also the ratio of the accuracies, its interval from paired resamplings.
    ``{"<context>": {"all": {...}, "<depth>": {...}}}`` with ``accuracy``, ``lo``, ``hi``, ``probes`` (and
    ``vs_ref``, ``vs_ref_lo``, ``vs_ref_hi``)."""
    if len(items) != len(correct) or (ref is not None and len(ref) != len(correct)):
        raise ValueError("retrieval summary: probes, results and reference differ in length")
    rng = random.Random(f"retrieval-bootstrap-{seed}")
    out: dict = {}
    for context in sorted({p.context for p in items}):
        cells = {"all": [i for i, p in enumerate(items) if p.context == context]}
        for depth in sorted({p.depth for p in items if p.context == context}):
            cells[f"{depth:g}"] = [i for i, p in enumerate(items) if p.context == context and p.depth == depth]
        out[str(context)] = {}
        for cell, ix in cells.items():
            c = [correct[i] for i in ix]
            acc, lo, hi, _ = _interval(c, None, rng, samples)
            row = {"accuracy": round(acc, 4), "lo": round(lo, 4), "hi": round(hi, 4), "probes": len(ix)}
            if ref is not None:  # no ratio (None) where the reference answers none of the cell's probes
                r, rlo, rhi, _ = _interval(c, [ref[i] for i in ix], rng, samples)
                row.update({k: None if v != v else round(v, 4)
                            for k, v in (("vs_ref", r), ("vs_ref_lo", rlo), ("vs_ref_hi", rhi))})
            out[str(context)][cell] = row
    return out


def corpus_text(split: str = "eval", *, max_mb: float = 6.0, eval_fraction: float = 0.05, seed: int = 0) -> str:
    """The embedded corpus' ``split`` documents (every domain, in order) joined by blank lines: the filler of
    character probes. Built in a temporary folder by :func:`llm_compress.embedded.build_corpus` with the embedded
    defaults, so it is the text the bench model's held-out rows are made of."""
    import tempfile
    from pathlib import Path

    from llm_compress.data import iter_file_texts
    from llm_compress.embedded import build_corpus

    with tempfile.TemporaryDirectory() as tmp:
        splits = build_corpus(Path(tmp), max_mb=max_mb, eval_fraction=eval_fraction, seed=seed)
        return "\n\n".join(t for domain in sorted(splits) for t in iter_file_texts(splits[domain][split], "text"))


def write_lm_eval_data(path, *, chars: Sequence[int], per_depth: int, distractors: int, seed: int) -> int:
    """Write character probes (held-out corpus text) as the lm-evaluation-harness task's JSONL; returns the count."""
    from pathlib import Path

    items = probes(corpus_text(), str, contexts=chars, per_depth=per_depth, distractors=distractors, seed=seed)
    with open(Path(path), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in lm_eval_records(items))
    return len(items)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m llm_compress.kv.retrieval",
                                 description="Write the retrieval probes of bench/lm_eval/ (character units).")
    ap.add_argument("--out", default="bench/lm_eval/kv_retrieval.jsonl")
    ap.add_argument("--chars", type=int, nargs="+", default=[4000, 8000],
                    help="probe lengths in characters (prompt + answer): about 1,000 and 2,000 tokens of a "
                         "tokenizer that reads 4 characters a token")
    ap.add_argument("--per-depth", type=int, default=10)
    ap.add_argument("--distractors", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    n = write_lm_eval_data(a.out, chars=a.chars, per_depth=a.per_depth, distractors=a.distractors, seed=a.seed)
    print(f"wrote {n} probes to {a.out}")


if __name__ == "__main__":
    main()
