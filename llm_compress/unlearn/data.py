"""The forget set: records read from JSONL, tokenized into padded rows with a mask of the part to forget.

A record is one of (field names set in the recipe: ``unlearn.text_field``, ``question_field``, ``answer_field``):

- a question/answer pair ``{"question": ..., "answer": ...}``: the text is question + " " + answer, and the answer's
  tokens are forgotten;
- a document holding its answer ``{"text": ..., "answer": ...}``: the answer must occur in the text (its last
  occurrence is the span), and its tokens are forgotten;
- a document ``{"text": ...}``: its first ``prefix_tokens`` tokens are the prompt, the rest is forgotten.

The tokens before the span are the prompt a memorisation probe continues from (:mod:`llm_compress.unlearn.metrics`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm_compress.errors import InputError

if TYPE_CHECKING:  # validation reads records without torch (compress validate, the Prefect form)
    import torch


@dataclass
class Record:
    text: str
    start: int  # character span of the part to forget, [start, end) of text; start 0 = prefix_tokens decide
    end: int
    has_span: bool


@dataclass
class ForgetSet:
    """Tokenized records, right-padded. Position t of ``span`` is True when token ids[:, t] is part of the forgotten
    answer (it is predicted from the logits at t - 1, so span[:, 0] is always False)."""

    ids: torch.Tensor  # [N, T] int64, pad_id after each record's last token
    attn: torch.Tensor  # [N, T] bool: real tokens
    span: torch.Tensor  # [N, T] bool: tokens to forget
    prompt_len: torch.Tensor  # [N] int64: tokens before the first span token (a probe's prompt)
    pad_id: int

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index) -> "ForgetSet":
        """The records at ``index`` (a slice, list or tensor of positions), as a ForgetSet."""
        import torch

        idx = torch.as_tensor(range(len(self))[index] if isinstance(index, slice) else index, dtype=torch.long)
        return ForgetSet(self.ids[idx], self.attn[idx], self.span[idx], self.prompt_len[idx], self.pad_id)

    def to(self, device) -> "ForgetSet":
        return ForgetSet(self.ids.to(device), self.attn.to(device), self.span.to(device), self.prompt_len.to(device),
                         self.pad_id)


def read_records(path: str | Path, *, text_field: str = "text", question_field: str = "question",
                 answer_field: str = "answer", what: str = "unlearn.forget") -> list[Record]:
    """Records of a JSONL file; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: file not found: {path}")
    out: list[Record] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{what}: {path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: a record must be a JSON object")
            answer = row.get(answer_field)
            if answer is not None and (not isinstance(answer, str) or not answer.strip()):
                raise InputError(f"{where}: field '{answer_field}' must be a non-empty string")
            if question_field in row and text_field not in row:
                q = row[question_field]
                if not isinstance(q, str) or answer is None:
                    raise InputError(f"{where}: a question record needs string fields '{question_field}' and "
                                     f"'{answer_field}'")
                sep = "" if not q or q[-1].isspace() else " "
                text = q + sep + answer
                out.append(Record(text, len(text) - len(answer), len(text), True))
                continue
            text = row.get(text_field)
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{where}: no '{text_field}' field (or '{question_field}' + '{answer_field}'); "
                                 f"set unlearn.text_field / question_field / answer_field")
            if answer is None:
                out.append(Record(text, 0, len(text), False))
                continue
            start = text.rfind(answer)
            if start < 0:
                raise InputError(f"{where}: the answer span is outside its text: '{answer[:40]}' does not occur in "
                                 f"field '{text_field}'")
            out.append(Record(text, start, start + len(answer), True))
    if not out:
        raise InputError(f"{what}: {path} holds no records (an empty forget set)")
    return out


def tokenize(records: list[Record], tokenizer, *, prefix_tokens: int, max_len: int,
             what: str = "unlearn.forget") -> ForgetSet:
    """Token rows of ``records``: the tokenizer's own special tokens (a BOS where it adds one), right padding.

    Raises InputError when a record is longer than ``max_len`` (the model's context), or when its span or its
    prompt would be empty.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, spans, prompts = [], [], []
    for n, r in enumerate(records):
        enc = tokenizer(r.text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) > max_len:
            raise InputError(f"{what}: record {n + 1} is {len(ids)} tokens, longer than the model's context "
                             f"({max_len}); shorten or split it")
        if r.has_span:  # a token is forgotten when its characters overlap the span
            mask = [e > r.start and s < r.end and e > s for s, e in offsets]
        else:
            mask = [i >= prefix_tokens for i in range(len(ids))]
        first = mask.index(True) if any(mask) else None
        if first is None:
            raise InputError(f"{what}: record {n + 1} has nothing to forget ({len(ids)} tokens, "
                             f"unlearn.prefix_tokens {prefix_tokens})")
        if first == 0:
            raise InputError(f"{what}: record {n + 1}'s answer starts at its first token, so no prompt precedes it")
        rows.append(ids)
        spans.append(mask)
        prompts.append(first)
    T = max(map(len, rows))
    N = len(rows)
    ids = torch.full((N, T), pad, dtype=torch.long)
    attn = torch.zeros(N, T, dtype=torch.bool)
    span = torch.zeros(N, T, dtype=torch.bool)
    for n, (r, m) in enumerate(zip(rows, spans)):
        ids[n, : len(r)] = torch.tensor(r)
        attn[n, : len(r)] = True
        span[n, : len(m)] = torch.tensor(m)
    return ForgetSet(ids, attn, span, torch.tensor(prompts), pad)
