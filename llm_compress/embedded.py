"""The demo's embedded default world: a corpus made from text that ships with Python, and its tokenizer.

Nothing is downloaded: the corpus comes from the running interpreter's standard library, so the
demo works offline and the same interpreter always builds the same bytes.

Domains (one folder each, ``train.jsonl`` and ``eval.jsonl`` of ``{"text", "source"}`` lines):

- ``prose``: the reference documentation in ``pydoc_data.topics``, in paragraph groups.
- ``code``: standard-library source, cut at top-level ``def``/``class`` boundaries.
- ``docstrings``: module, class and function docstrings found with ``ast`` (nothing is imported).

With ``site_packages`` the installed third-party packages are read too (hundreds of MB once the project's
dependencies are installed): their ``.py`` files feed ``code`` and ``docstrings``, and their long descriptions
(``*.dist-info/METADATA`` bodies) and ``.md`` / ``.rst`` files feed ``prose``. That corpus depends on what is
installed, so ``corpus.json`` records every distribution's name and version.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from llm_compress.data import iter_file_texts
from llm_compress.errors import InputError
from llm_compress.io import write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DOMAINS = ("prose", "code", "docstrings")

MB = 1_000_000  # max_mb counts decimal megabytes of JSONL on disk
EOT = "<|endoftext|>"

_MAX_DOC_CHARS = 3000
_MIN_PROSE_CHARS = 500
_MIN_DOCSTRING_CHARS = 80

# Directories of the stdlib tree that are not the library's own code: tests and their fixtures
# (idle_test, lib2to3/tests/data), third-party packages, the prose domain's source (pydoc_data,
# whose topics.py would put the prose eval split inside code train), and generated codec tables
# (encodings/*: mostly hex literals, which would teach the model nothing about code).
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "pydoc_data", "encodings"})


@dataclass(frozen=True)
class _Doc:
    text: str
    source: str  # human-readable provenance, written to the JSONL line
    key: str  # split key: documents that share one always land in the same split


# --------------------------------------------------------------------------------------------
# helpers


def _unit_float(*parts: object) -> float:
    """A stable number in [0, 1) from ``parts`` (sha256; Python's ``hash`` is salted per process)."""
    h = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _pack(pieces: Iterable[str], max_chars: int = _MAX_DOC_CHARS) -> list[str]:
    """Join consecutive ``pieces`` greedily into chunks of at most ``max_chars``.

    A piece longer than ``max_chars`` is cut at line ends, and a single longer line by characters,
    so no chunk exceeds the limit.
    """
    out: list[str] = []
    cur = ""
    for piece in pieces:
        parts = [piece]
        if len(piece) > max_chars:
            parts = []
            for line in piece.splitlines(keepends=True):
                parts.extend(line[i:i + max_chars] for i in range(0, len(line), max_chars))
        for part in parts:
            if cur and len(cur) + len(part) > max_chars:
                out.append(cur)
                cur = ""
            cur += part
    if cur:
        out.append(cur)
    return out


def _clean(text: str) -> str:
    """Drop leading blank lines and trailing whitespace; keep the first line's indentation."""
    return re.sub(r"\A(?:[ \t]*\n)+", "", text).rstrip()


# --------------------------------------------------------------------------------------------
# domains


def _prose_docs() -> list[_Doc]:
    """pydoc topics in paragraph groups; topics shorter than the minimum stay one document."""
    from pydoc_data.topics import topics

    docs = []
    for topic in sorted(topics, key=lambda t: _unit_float("order", t)):
        paragraphs = [p + "\n\n" for p in re.split(r"\n\s*\n", topics[topic]) if p.strip()]
        chunks = [_clean(c) for c in _pack(paragraphs)]
        # Fold a short tail into its predecessor while that stays under the maximum, so few
        # documents fall below the minimum length.
        if len(chunks) > 1 and len(chunks[-1]) < _MIN_PROSE_CHARS and \
                len(chunks[-2]) + len(chunks[-1]) + 2 <= _MAX_DOC_CHARS:
            chunks[-2:] = [chunks[-2] + "\n\n" + chunks[-1]]
        for i, chunk in enumerate(c for c in chunks if c):
            source = f"pydoc:{topic}#{i}"
            docs.append(_Doc(chunk, source, source))
    return docs


def _site_roots() -> list[Path]:
    """The interpreter's site-packages folders (purelib, and platlib where it differs)."""
    paths = sysconfig.get_paths()
    return [Path(p) for p in dict.fromkeys((paths["purelib"], paths["platlib"])) if Path(p).is_dir()]


def _source_files(site_packages: bool = False) -> list[tuple[str, Path]]:
    """(label, path) of the stdlib's own modules (``stdlib:<rel>``), and with ``site_packages`` those of the
    installed packages (``site:<rel>``), in a stable shuffled order.

    Shuffled by a seed-independent hash of the label so a small cap samples many packages rather
    than the alphabetically first ones, while the seed changes only the split, not the content.
    Files over 1 MB (generated tables, vendored bundles) are left out.
    """
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    if site_packages:
        roots += [("site", r) for r in _site_roots()]
    files = []
    for label, root in roots:
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).parts
            if _SKIP_DIRS.intersection(parts[:-1]) or parts[0].startswith("config-") or \
                    parts[0].endswith((".dist-info", ".egg-info")) or path.stat().st_size > MB:
                continue
            files.append((f"{label}:{path.relative_to(root).as_posix()}", path))
    files.sort(key=lambda lp: (_unit_float("order", lp[0].removeprefix("stdlib:")), lp[0]))
    return files


def installed_distributions() -> list[str]:
    """``name==version`` of every installed distribution, sorted: what a site-packages corpus was read from."""
    from importlib.metadata import distributions

    return sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"]})


def _package_prose() -> list[_Doc]:
    """Long descriptions (METADATA bodies) and .md / .rst files of the installed packages, in paragraph groups."""
    texts: list[tuple[str, str]] = []
    for root in _site_roots():
        for path in sorted(root.glob("*.dist-info/METADATA")):
            body = path.read_bytes().decode("utf-8", "replace").partition("\n\n")[2]  # after the headers
            texts.append((f"site:{path.relative_to(root).as_posix()}", body))
        for path in sorted(p for ext in ("*.md", "*.rst") for p in root.rglob(ext)):
            if path.stat().st_size <= MB:
                try:
                    texts.append((f"site:{path.relative_to(root).as_posix()}", path.read_bytes().decode("utf-8")))
                except UnicodeDecodeError:
                    continue
    docs = []
    for label, text in sorted(texts, key=lambda t: (_unit_float("order", t[0]), t[0])):
        paragraphs = [p + "\n\n" for p in re.split(r"\n\s*\n", text) if p.strip()]
        for i, chunk in enumerate(c for c in map(_clean, _pack(paragraphs)) if len(c) >= _MIN_PROSE_CHARS):
            docs.append(_Doc(chunk, f"{label}#{i}", f"{label}#{i}"))
    return docs


def _module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _code_chunks(source: str, tree: ast.Module | None) -> list[tuple[int, int, str]]:
    """(first line, last line, text) chunks of a file, 1-based inclusive, cut at top-level defs.

    Each top-level function or class starts a segment (from its first decorator, and taking the
    comment lines right above it along), then consecutive segments are packed up to the size limit.
    Without a syntax tree the file is packed by lines.
    """
    lines = source.splitlines(keepends=True)
    starts = {0}
    for node in tree.body if tree is not None else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            while first > 0 and lines[first - 1].lstrip().startswith("#"):
                first -= 1
            starts.add(first)
    bounds = sorted(starts) + [len(lines)]
    segments = ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:]) if a < b]
    out, line = [], 1
    for chunk in _pack(segments):
        n = chunk.count("\n") + (0 if chunk.endswith("\n") else 1)
        out.append((line, line + n - 1, chunk))
        line += n if chunk.endswith("\n") else n - 1  # a hard-cut line continues in the next chunk
    return out


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[int, str, str]]:
    """(line, qualified name, cleaned docstring) for the module and every class/function in it."""
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, qualname = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield node.body[0].lineno, qualname, doc  # the docstring's own line
        children = [(c, f"{qualname}.{c.name}") for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        stack.extend(reversed(children))  # depth-first in source order


def _code_docs(code_cap: int, doc_cap: int, site_packages: bool = False) -> tuple[list[_Doc], list[_Doc]]:
    """Code and docstring documents from the stdlib (and installed packages), read until both domains are full.

    A docstring's split key is the key of the code chunk that contains it, so a docstring in the
    eval split never appears verbatim inside a code document of the train split.
    """
    code: list[_Doc] = []
    doc: list[_Doc] = []
    seen: set[tuple[str, bytes]] = set()  # (domain, text digest): identical texts are kept once
    code_bytes = doc_bytes = 0
    code_full = doc_full = False
    for label, path in _source_files(site_packages):
        if code_full and doc_full:
            break
        rel = label.split(":", 1)[1]
        try:
            source = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # the corpus is UTF-8 text: a file that is not is left out, not guessed at
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. SyntaxWarning for old escape sequences
                tree = ast.parse(source, filename=rel)
        except (SyntaxError, ValueError):
            tree = None
        chunks = _code_chunks(source, tree)
        keys = [f"{label}#{i}" for i in range(len(chunks))]
        if not code_full:
            for (a, b, text), key in zip(chunks, keys):
                text = _clean(text)
                if not text:
                    continue
                d = _Doc(text, f"{label}:L{a}-L{b}", key)
                if not _first_time(seen, "code", text):
                    continue
                code_bytes += _line_bytes(d)
                if code_bytes > code_cap:
                    code_full = True
                    break
                code.append(d)
        if not doc_full and tree is not None:
            for line, qualname, text in _docstrings(tree, _module_name(rel)):
                if len(text) < _MIN_DOCSTRING_CHARS:
                    continue
                i = next((i for i, (a, b, _) in enumerate(chunks) if a <= line <= b), len(chunks) - 1)
                d = _Doc(f"{qualname}\n{text}", f"{label}:L{line}:{qualname}", keys[i])
                if not _first_time(seen, "docstrings", text):
                    continue
                doc_bytes += _line_bytes(d)
                if doc_bytes > doc_cap:
                    doc_full = True
                    break
                doc.append(d)
    return code, doc


# --------------------------------------------------------------------------------------------
# corpus


def _line(d: _Doc) -> str:
    # ensure_ascii=False keeps non-ASCII text as UTF-8, as a tokenizer will see it; json still
    # escapes control characters, so every document stays on one line.
    return json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n"


def _line_bytes(d: _Doc) -> int:
    return len(_line(d).encode("utf-8"))


def _first_time(seen: set[tuple[str, bytes]], domain: str, text: str) -> bool:
    """Record ``text``; False if ``domain`` had it already (so it cannot land in both train and eval)."""
    key = (domain, hashlib.sha256(text.encode()).digest())
    if key in seen:
        return False
    seen.add(key)
    return True


def _cap(docs: list[_Doc], cap: int) -> list[_Doc]:
    """The longest prefix of ``docs`` whose JSONL lines fit in ``cap`` bytes."""
    out, total = [], 0
    for d in docs:
        total += _line_bytes(d)
        if total > cap:
            break
        out.append(d)
    return out


def build_corpus(out_dir: Path, *, max_mb: float, eval_fraction: float, seed: int,
                 site_packages: bool = False) -> dict[str, dict[str, str]]:
    """Write the embedded corpus into the empty directory ``out_dir``; return ``{domain: {split: path}}``.

    Each domain holds at most ``max_mb / 3`` MB (10^6 bytes) of JSONL, taken in a fixed order, so
    the content depends only on the interpreter (with ``site_packages``, also on what is installed) and
    the cap. A document goes to eval when a sha256 of (seed, split key) falls below ``eval_fraction``;
    if a domain would get no eval document, its lowest-scoring key goes to eval.
    ``out_dir/corpus.json`` records document and byte counts.
    """
    if not 0 < eval_fraction < 1:
        raise InputError(f"embedded corpus: eval_fraction must be in (0, 1), got {eval_fraction}")
    if not max_mb > 0:
        raise InputError(f"embedded corpus: max_mb must be positive, got {max_mb}")
    out_dir = Path(out_dir)
    cap = int(max_mb * MB / len(DOMAINS))

    code_docs, doc_docs = _code_docs(code_cap=cap, doc_cap=cap, site_packages=site_packages)
    seen: set[tuple[str, bytes]] = set()
    prose = _prose_docs()
    if site_packages:  # interleaved in a stable hashed order, so a cap takes some of each source
        prose = sorted(prose + _package_prose(), key=lambda d: (_unit_float("order", d.key), d.key))
    prose_docs = [d for d in prose if _first_time(seen, "prose", d.text)]
    docs = {"prose": _cap(prose_docs, cap), "code": code_docs, "docstrings": doc_docs}

    score = {d.key: _unit_float(seed, d.key) for ds in docs.values() for d in ds}
    eval_keys = {k for k, s in score.items() if s < eval_fraction}
    for domain, ds in docs.items():
        if len({d.key for d in ds}) < 2:
            raise InputError(f"embedded corpus: max_mb={max_mb} is too small: domain '{domain}' got "
                             f"{len(ds)} document(s), and train and eval each need one")
        if not any(d.key in eval_keys for d in ds):
            eval_keys.add(min((d.key for d in ds), key=lambda k: (score[k], k)))

    paths: dict[str, dict[str, str]] = {}
    stats: dict[str, dict[str, dict[str, int]]] = {}
    for domain, ds in docs.items():
        splits = {"train": [d for d in ds if d.key not in eval_keys], "eval": [d for d in ds if d.key in eval_keys]}
        if not splits["train"]:  # a key shared with another domain's forced eval pick took them all
            raise InputError(f"embedded corpus: max_mb={max_mb} is too small: domain '{domain}' has no "
                             "training documents left")
        (out_dir / domain).mkdir()
        paths[domain], stats[domain] = {}, {}
        for split, items in splits.items():
            path = out_dir / domain / f"{split}.jsonl"
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(_line(d) for d in items)
            paths[domain][split] = str(path)
            stats[domain][split] = {"docs": len(items), "bytes": path.stat().st_size,
                                    "text_bytes": sum(len(d.text.encode()) for d in items)}

    write_json_atomic(out_dir / "corpus.json", {
        "python": sys.version.split()[0],
        "max_mb": max_mb, "cap_bytes_per_domain": cap, "eval_fraction": eval_fraction, "seed": seed,
        "site_packages": site_packages, "distributions": installed_distributions() if site_packages else None,
        "domains": stats,
    })
    return paths


# --------------------------------------------------------------------------------------------
# tokenizer


MODEL_INPUT_NAMES = ("input_ids", "attention_mask")  # what the tokenizer returns: what a causal LM's forward takes


def train_tokenizer(files: list[Path], *, vocab_size: int, out_dir: Path,
                    text_field: str = "text") -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer on the JSONL ``files`` and save it to ``out_dir``.

    ``<|endoftext|>`` is the only special token (bos, eos, pad and unk); encoding adds no special
    tokens. Any text round-trips exactly: bytes, not characters, are the alphabet, and nothing
    normalizes the text or cleans up spaces on decode. Loads back with ``AutoTokenizer``; it returns
    ``input_ids`` and ``attention_mask`` only (:data:`MODEL_INPUT_NAMES`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = [Path(f) for f in files]
    if not files:
        raise InputError("tokenizer corpus: no files given")
    if vocab_size < 256 + 1:
        raise InputError(f"tokenizer vocab_size {vocab_size} is too small: the 256 bytes and {EOT} need 257")

    tok = Tokenizer(models.BPE())  # no unk: every byte is in the alphabet, so nothing is unknown
    # add_prefix_space=False: a leading space would change the text and break exact round trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        # All 256 byte symbols, even those the corpus lacks, so any input can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = (t for f in files for t in iter_file_texts(f, text_field))  # streamed, errors name file and line
    try:
        first = next(texts)
    except StopIteration:
        # Checked before training: the trainer would happily return a vocabulary of bytes only.
        raise InputError(f"tokenizer corpus has no text in '{text_field}': " + ", ".join(map(str, files))) from None
    tok.train_from_iterator(itertools.chain([first], texts), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT,
        # transformers would otherwise delete spaces before punctuation on decode.
        clean_up_tokenization_spaces=False,
        # Saved in tokenizer_config.json: without it the fast tokenizer also returns token_type_ids, which a causal
        # LM's generate() refuses, so model.generate(**tok(prompt, return_tensors="pt")) would fail.
        model_input_names=list(MODEL_INPUT_NAMES))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped
