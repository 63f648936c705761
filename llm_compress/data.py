"""Data: read documents (JSONL, text, `datasets`), tokenize and pack them into fixed-length rows.

The data stage writes ``train.safetensors`` and ``eval.safetensors``, each holding one tensor
``ids`` of shape [rows, seq_len] (int32), made by concatenating documents separated by the EOS token
(each starting with the BOS token when the tokenizer's own encoding adds one, as Llama 3's and Mistral's do)
and cutting the stream into rows. Later stages read these files, so tokenization happens once per
(data, tokenizer, seq_len) and its digest is part of every downstream cache key.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm_compress.errors import InputError
from llm_compress.result import StageResult
from llm_compress.schema import DataConfig


def iter_file_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file: a JSONL row's ``text_field``, or a non-empty .txt line.

    Errors name the file and line: non-UTF-8 bytes, a line that is not JSON, a missing field.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1})") from None
            if not line.strip():
                continue
            if not is_jsonl:
                yield line.rstrip("\r\n")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise InputError(f"{path}, line {lineno}: no '{text_field}' field (set data.text_field)")
            text = row[text_field]
            if not isinstance(text, str):
                raise InputError(f"{path}, line {lineno}: field '{text_field}' is not a string")
            if text:
                yield text


def load_texts(paths: list[str | Path], text_field: str = "text", max_docs: int | None = None) -> list[str]:
    texts: list[str] = []
    for p in paths:
        for t in iter_file_texts(p, text_field):
            texts.append(t)
            if max_docs is not None and len(texts) >= max_docs:
                return texts
    if not texts:
        raise InputError(f"empty corpus: no text in {', '.join(str(p) for p in paths)}")
    return texts


def load_hf_texts(name: str, config: str | None, split: str, text_field: str, max_docs: int | None = None,
                  revision: str | None = None) -> list[str]:
    """Documents from a `datasets` dataset (a hub id at ``revision``, or a local folder / data files)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:  # datasets raises many types; all mean "cannot read this input"
        raise InputError(f"data.hf: cannot load dataset '{name}' split '{split}': {type(e).__name__}: {e}") from None
    if text_field not in ds.column_names:
        raise InputError(f"data.hf: dataset '{name}' has no '{text_field}' column (has {ds.column_names})")
    texts = [t for t in ds[text_field][: max_docs or len(ds)] if isinstance(t, str) and t]
    if not texts:
        raise InputError(f"empty corpus: dataset '{name}' split '{split}' has no text")
    return texts


def bos_prefix(tokenizer) -> list[int]:
    """[bos id] if the tokenizer's default encoding (``tokenizer(text)``, add_special_tokens on) starts a text
    with its BOS token (Llama 3, Mistral: ``add_bos_token`` or the post-processor), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    default, plain = (tokenizer("a", add_special_tokens=special)["input_ids"] for special in (True, False))
    return [bos] if default[:1] == [bos] and plain[:1] != [bos] else []


def pack(texts: list[str], tokenizer, seq_len: int, what: str) -> torch.Tensor:
    """Tokenize, join documents with EOS and cut into rows: [rows, seq_len] int32.

    Each document starts with the tokenizer's BOS when its default encoding adds one (``bos_prefix``).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no EOS token; it is needed to separate documents")
    bos = bos_prefix(tokenizer)
    parts: list[np.ndarray] = []  # int32 per batch of documents: a large corpus never sits in Python ints
    batch = 256
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]
        parts.append(np.fromiter(itertools.chain.from_iterable(bos + ids + [eos] for ids in enc), dtype=np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    rows = len(stream) // seq_len
    if rows == 0:
        raise InputError(f"{what}: only {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.from_numpy(stream[: rows * seq_len].reshape(rows, seq_len).copy())


def save_tokens(ids: torch.Tensor, path: Path) -> None:
    save_file({"ids": ids.contiguous()}, str(path))


def load_tokens(path: str | Path) -> torch.Tensor:
    """[rows, seq_len] int64 token ids from a file written by the data stage."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"token file not found: {path}")
    try:
        return load_file(str(path))["ids"].long()
    except Exception as e:
        raise InputError(f"{path}: not a token file written by the data stage ({e})") from None


def resolve_files(cfg: DataConfig, corpus_dir: Path | None) -> tuple[list[Path], list[Path]]:
    """Train and eval files for file-based sources (embedded corpus or user files)."""
    if cfg.source == "embedded":
        assert corpus_dir is not None
        manifest = json.loads((corpus_dir / "corpus.json").read_text())
        available = sorted(manifest["domains"])
        domains = cfg.domains or available
        unknown = sorted(set(domains) - set(available))
        if unknown:
            raise InputError(f"data.domains: unknown domain(s) {unknown}; the embedded corpus has {available}")
        return ([corpus_dir / d / "train.jsonl" for d in domains], [corpus_dir / d / "eval.jsonl" for d in domains])
    return [Path(p) for p in cfg.train], [Path(p) for p in cfg.eval]


def run(cfg: DataConfig, tokenizer, out_dir: Path, corpus_dir: Path | None = None, *, selected: Path | None = None,
        selected_text_field: str = "text") -> StageResult:
    """The data stage: read, tokenize and pack train and eval documents.

    With ``selected`` (the select stage's ``selected.jsonl``) the training documents are the selection;
    the held-out documents still come from ``cfg``'s source.
    """
    if cfg.source == "hf":
        assert cfg.hf is not None
        h = cfg.hf
        train = None if selected else load_hf_texts(h.name, h.config, h.train_split, cfg.text_field,
                                                    cfg.max_train_docs, h.revision)
        evals = load_hf_texts(h.name, h.config, h.eval_split, cfg.text_field, revision=h.revision)
    else:
        train_files, eval_files = resolve_files(cfg, corpus_dir)
        train = None if selected else load_texts(train_files, cfg.text_field, cfg.max_train_docs)
        evals = load_texts(eval_files, cfg.text_field)
    if selected is not None:
        train = load_texts([selected], selected_text_field, cfg.max_train_docs)
    train_ids = pack(train, tokenizer, cfg.seq_len, "training data")
    eval_ids = pack(evals, tokenizer, cfg.seq_len, "eval data")
    save_tokens(train_ids, out_dir / "train.safetensors")
    save_tokens(eval_ids, out_dir / "eval.safetensors")
    metrics = {"train_source": "select" if selected else cfg.source, "train_docs": len(train),
               "eval_docs": len(evals), "train_tokens": int(train_ids.numel()),
               "eval_tokens": int(eval_ids.numel()), "seq_len": cfg.seq_len,
               "train_chars": sum(map(len, train)), "eval_chars": sum(map(len, evals))}
    return StageResult(outputs={"train": "train.safetensors", "eval": "eval.safetensors"}, metrics=metrics)
