"""Data loading for the kv_retrieval tasks of lm-evaluation-harness (``--include_path bench/lm_eval``).

The probes are ``kv_retrieval.jsonl`` beside this file (written by ``python -m llm_compress.kv.retrieval``): held-out
Python documentation and source text with four "The code of <name> is <4 digits>." facts planted in it, one of them
asked for at the end. Each task takes the probes of one length (characters) and one depth of the asked fact, so the
harness reports accuracy by depth; the group ``kv_retrieval`` averages them. Read from this file's folder, so the
command works from any working directory.
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "kv_retrieval.jsonl"


def load(chars: int, depth: float, **_metadata) -> datasets.DatasetDict:
    """The probes of ``chars`` characters whose asked fact is at ``depth``, as the task's test split."""
    with open(DATA, encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r["chars"] == chars and abs(r["depth"] - depth) < 1e-9]
    if not rows:
        raise ValueError(f"{DATA}: no probe of {chars} characters at depth {depth}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
