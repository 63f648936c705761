"""Inputs: split JSONL / .txt / Parquet files and `datasets` datasets into shards, and stream their records.

A *record* is one non-blank line of a JSONL or .txt file (``.gz`` too), one row of a Parquet file or of a
dataset. Records are numbered in input order (input by input, shard by shard), and every pass over a shard
yields the same records in the same order, so per-shard arrays line up across passes.

Each record comes back as ``(status, text, json_line)``: ``status`` is ``OK`` or a skip reason (``text`` is then
``None``). Reading never raises for bad content; only an unreadable input (missing file, corrupt Parquet or gzip)
raises :class:`~llm_compress.errors.InputError`. Memory is bounded by ``max_doc_bytes`` per record plus one 1 MiB read
block: a longer line is dropped piece by piece while being read, never held whole.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llm_compress.errors import InputError

OK = 0
TOO_SHORT = 1  # decided later from the token count; never produced by the readers
NON_UTF8 = 2
MISSING_FIELD = 3
INVALID_JSON = 4
OVERSIZED = 5
REASONS = {TOO_SHORT: "too_short", NON_UTF8: "non_utf8", MISSING_FIELD: "missing_text_field",
           INVALID_JSON: "invalid_json", OVERSIZED: "oversized"}

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
PARQUET_SUFFIXES = (".parquet", ".pq")
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Shard:
    """A contiguous piece of one input: byte range of a file (``lines``), row groups (``parquet``) or rows (``hf``).

    ``ident`` names the content (path, size, mtime, range and a digest of the range's first and last 64 KiB, or a
    dataset fingerprint); it is part of every cache key, so an edited input never reuses a stale cache entry.
    """

    kind: str  # "lines" | "parquet" | "hf"
    path: str
    start: int
    end: int
    fmt: str  # "jsonl" | "txt" for lines; "parquet"; "hf"
    ident: str
    gz: bool = False
    size: int = 0  # bytes of input this shard covers (approximate for Parquet and datasets)


# -- planning ---------------------------------------------------------------------------------


def expand_inputs(items: list[Any], what: str) -> list[Any]:
    """Paths (files, folders of files, ``save_to_disk`` folders) and ``datasets.Dataset`` objects, in order."""
    out: list[Any] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            if type(item).__name__ == "Dataset" and hasattr(item, "_fingerprint"):
                out.append(item)
                continue
            raise InputError(f"{what}: expected a path or a datasets.Dataset, got {type(item).__name__}")
        p = Path(item)
        if p.is_dir() and not _is_saved_dataset(p):
            files = sorted(f for f in p.rglob("*") if f.is_file() and _fmt(f) is not None)
            if not files:
                raise InputError(f"{what}: folder {p} holds no .jsonl/.txt/.parquet files")
            out.extend(files)
        elif p.is_dir() or p.is_file():
            if p.is_file() and _fmt(p) is None:
                raise InputError(f"{what}: {p} is not .jsonl/.json/.ndjson/.txt/.parquet (optionally .gz)")
            out.append(p)
        else:
            raise InputError(f"{what}: not found: {p}")
    return out


def plan_shards(item: Any, shard_bytes: int) -> list[Shard]:
    """Cut one input into shards of about ``shard_bytes`` (a gzip file is one shard)."""
    if not isinstance(item, (str, os.PathLike)):
        return _dataset_shards(item, "object", shard_bytes, "")
    p = Path(item)
    if p.is_dir():
        return _dataset_shards(_load_saved_dataset(p), str(p.resolve()), shard_bytes, str(p.resolve()))
    fmt = _fmt(p)
    st = p.stat()
    base = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if fmt == "parquet":
        return _parquet_shards(p, base, shard_bytes)
    if p.suffix.lower() == ".gz":
        return [Shard("lines", str(p), 0, st.st_size, fmt, f"{base}|{_edge_digest(p, 0, st.st_size)}", True,
                      st.st_size)]
    bounds = list(range(0, st.st_size, max(1, shard_bytes))) + [st.st_size]
    if st.st_size == 0:
        bounds = [0, 0]
    return [Shard("lines", str(p), a, b, fmt, f"{base}|{a}-{b}|{_edge_digest(p, a, b)}", False, b - a)
            for a, b in zip(bounds[:-1], bounds[1:])]


def _fmt(p: Path) -> str | None:
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSON_SUFFIXES:
        return "jsonl"
    if last in TEXT_SUFFIXES:
        return "txt"
    if last in PARQUET_SUFFIXES and p.suffix.lower() != ".gz":
        return "parquet"
    return None


def _edge_digest(p: Path, a: int, b: int) -> str:
    """sha256 of the first and last 64 KiB of bytes [a, b): cheap evidence the content is unchanged."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        f.seek(a)
        h.update(f.read(min(65536, b - a)))
        f.seek(max(a, b - 65536))
        h.update(f.read(min(65536, b - a)))
    return h.hexdigest()[:16]


def _parquet_shards(p: Path, base: str, shard_bytes: int) -> list[Shard]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(p).metadata
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{p}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    shards, start, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= shard_bytes or g == meta.num_row_groups - 1:
            shards.append(Shard("parquet", str(p), start, g + 1, "parquet", f"{base}|rg{start}-{g + 1}", False, acc))
            start, acc = g + 1, 0
    return shards or [Shard("parquet", str(p), 0, 0, "parquet", f"{base}|empty", False, 0)]


def _is_saved_dataset(p: Path) -> bool:
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _load_saved_dataset(p: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises many types; all mean "cannot read this input"
        raise InputError(f"{p}: cannot load the saved dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise InputError(f"{p}: a DatasetDict with splits {sorted(ds)}; pass one split's folder, "
                             f"e.g. {p / sorted(ds)[0]}")
        ds = next(iter(ds.values()))
    return ds


def _dataset_shards(ds, ident: str, shard_bytes: int, path: str) -> list[Shard]:
    """Row ranges of about ``shard_bytes``; ``path`` is the saved folder ('' for an in-memory object)."""
    n = len(ds)
    nbytes = max(1, int(getattr(ds.data, "nbytes", 0) or 0))
    rows = max(1, int(n * shard_bytes / nbytes)) if n else 1
    key = f"hf|{ident}|{ds._fingerprint}|{n}"
    bounds = list(range(0, n, rows)) + [n] if n else [0, 0]
    return [Shard("hf", path, a, b, "hf", f"{key}|{a}-{b}", False, int(nbytes * (b - a) / max(n, 1)))
            for a, b in zip(bounds[:-1], bounds[1:])]


# -- reading ----------------------------------------------------------------------------------


Record = tuple[int, "str | None", str]  # (status, text, json_line)


def iter_record_blocks(shard: Shard, text_field: str, max_doc_bytes: int, dataset=None,
                       rows: bool = False) -> Iterator[list[Record]]:
    """Lists of ``(status, text, json_line)``, one per record of ``shard``, in order (lists keep per-record
    generator overhead out of the hot loop).

    ``json_line`` is filled only with ``rows=True`` and status OK: the original JSON line kept as is, a .txt line
    as ``{text_field: line}``, a Parquet / dataset row as its JSON (values JSON cannot hold written as strings).
    ``dataset``: the ``datasets.Dataset`` of an ``hf`` shard made from an object (a saved folder is loaded here).
    """
    if shard.kind == "lines":
        is_json = shard.fmt == "jsonl"
        for lines in _line_blocks(shard, max_doc_bytes):
            yield [_parse_line(line, is_json, text_field, rows) for line in lines]
    elif shard.kind == "parquet":
        yield from _parquet_blocks(shard, text_field, max_doc_bytes, rows)
    else:
        yield from _dataset_blocks(shard, text_field, max_doc_bytes, dataset, rows)


def iter_records(shard: Shard, text_field: str, max_doc_bytes: int, dataset=None,
                 rows: bool = False) -> Iterator[Record]:
    """The records of :func:`iter_record_blocks`, one at a time."""
    for block in iter_record_blocks(shard, text_field, max_doc_bytes, dataset, rows):
        yield from block


def iter_picked(shard: Shard, text_field: str, max_doc_bytes: int, picked: list[int],
                dataset=None) -> Iterator[tuple[int, int, str | None, str]]:
    """``(index, status, text, json_line)`` of the records at the ascending local indices ``picked`` only; other
    records are counted but not parsed."""
    if not picked:
        return
    want = iter(picked)
    nxt = next(want)
    if shard.kind == "lines":
        is_json = shard.fmt == "jsonl"
        i = 0
        for lines in _line_blocks(shard, max_doc_bytes):
            while nxt < i + len(lines):
                yield (nxt, *_parse_line(lines[nxt - i], is_json, text_field, True))
                nxt = next(want, None)
                if nxt is None:
                    return
            i += len(lines)
        return
    i = 0
    blocks = _parquet_blocks(shard, text_field, max_doc_bytes, True, picked) if shard.kind == "parquet" else \
        _dataset_blocks(shard, text_field, max_doc_bytes, dataset, True, picked)
    for block in blocks:
        while nxt < i + len(block):
            yield (nxt, *block[nxt - i])
            nxt = next(want, None)
            if nxt is None:
                return
        i += len(block)


def _open(shard: Shard):
    try:
        return gzip.open(shard.path, "rb") if shard.gz else open(shard.path, "rb")
    except OSError as e:
        raise InputError(f"cannot open {shard.path}: {e}") from None


def _line_blocks(shard: Shard, max_doc_bytes: int) -> Iterator[list[bytes | None]]:
    """Non-blank lines (bytes, no newline; ``None`` for an oversized one) that *start* inside [start, end), in lists.

    A line straddling ``start`` belongs to the previous shard. Reads fixed-size blocks; a line longer than
    ``max_doc_bytes`` is dropped piece by piece as it arrives, so memory stays bounded whatever the input.
    """
    limit = None if shard.gz else shard.end  # a line is ours if it starts before this position
    try:
        with _open(shard) as f:
            line_start = shard.start
            if line_start > 0:
                f.seek(line_start - 1)
                if f.read(1) != b"\n":
                    skipped = _skip_line(f, shard.end - line_start)
                    if skipped is None:
                        return  # no line starts inside this shard (it lies within one long line)
                    line_start += skipped
            pieces: list[bytes] = []  # the current line so far, unless it is oversized
            length = 0  # bytes of the current line so far (dropped ones included)
            first = shard.start == 0
            while limit is None or line_start < limit:
                block = f.read(_READ_CHUNK)
                if not block:
                    break
                parts = block.split(b"\n")
                out: list[bytes | None] = []
                for j, part in enumerate(parts):
                    length += len(part)
                    if length <= max_doc_bytes:
                        pieces.append(part)
                    else:
                        pieces = []
                    if j == len(parts) - 1:
                        break  # unfinished: continues in the next block
                    if limit is not None and line_start >= limit:
                        break
                    line = _finish(pieces, length, max_doc_bytes, first)
                    first = False
                    if line is None or line:
                        out.append(line)
                    line_start += length + 1
                    pieces, length = [], 0
                if out:
                    yield out
            if length and (limit is None or line_start < limit):  # last line without a newline
                line = _finish(pieces, length, max_doc_bytes, first)
                if line is None or line:
                    yield [line]
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"{shard.path}: read error ({type(e).__name__}: {e})") from None


def _finish(pieces: list[bytes], length: int, max_doc_bytes: int, first: bool) -> bytes | None:
    """A complete line: its bytes, ``None`` if oversized, ``b""`` if blank (not a record)."""
    if length > max_doc_bytes:
        return None
    line = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if first and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]  # a UTF-8 byte-order mark at the start of the file
    return b"" if line.isspace() else line


_scan = json.JSONDecoder().scan_once


def _parse_line(line: bytes | None, is_json: bool, text_field: str, rows: bool) -> Record:
    if line is None:
        return OVERSIZED, None, ""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError:
        return NON_UTF8, None, ""
    if s.endswith("\r"):
        s = s[:-1]
    if not is_json:
        return OK, s, (json.dumps({text_field: s}, ensure_ascii=False) if rows else "")
    try:
        row, end = _scan(s, 0)  # the C scanner without json.loads' wrappers; trailing text checked below
        if end != len(s) and not s[end:].isspace():
            raise ValueError
    except (StopIteration, ValueError):
        try:
            row = json.loads(s)  # leading whitespace, or a real error (JSONDecodeError is a ValueError)
        except ValueError:
            return INVALID_JSON, None, ""
    text = row.get(text_field) if isinstance(row, dict) else None
    if not isinstance(text, str):
        return MISSING_FIELD, None, ""
    return OK, text, (s if rows else "")


def _skip_line(f, budget: int) -> int | None:
    """Drop bytes up to and including the next newline, reading at most ``budget`` bytes in bounded chunks.

    Returns the bytes dropped, or ``None`` when no newline came within the budget.
    """
    n = 0
    while n < budget:
        chunk = f.readline(min(_READ_CHUNK, budget - n))
        n += len(chunk)
        if not chunk:
            return n
        if chunk.endswith(b"\n"):
            return n
    return None


def _cell(value: Any, max_doc_bytes: int) -> tuple[int, str | None]:
    if isinstance(value, bytes):
        if len(value) > max_doc_bytes:
            return OVERSIZED, None
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return NON_UTF8, None
    if not isinstance(value, str):
        return MISSING_FIELD, None
    # A str of n code points is n..4n UTF-8 bytes: encode only when the character count cannot decide.
    if len(value) > max_doc_bytes or (4 * len(value) > max_doc_bytes and len(value.encode("utf-8")) > max_doc_bytes):
        return OVERSIZED, None
    return OK, value


def _json_row(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


def _parquet_blocks(shard: Shard, text_field: str, max_doc_bytes: int, rows: bool,
                    picked: list[int] | None = None) -> Iterator[list[Record]]:
    """Records of row groups [start, end) in batches; with ``picked`` only those rows get their JSON line."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(shard.path)
        groups = list(range(shard.start, shard.end))
        if text_field not in pf.schema_arrow.names:
            for g in groups:
                yield [(MISSING_FIELD, None, "")] * pf.metadata.row_group(g).num_rows
            return
        want = set(picked) if picked is not None else None
        offset = 0
        columns = None if rows else [text_field]
        for batch in pf.iter_batches(batch_size=4096, row_groups=groups, columns=columns):
            texts = batch.column(text_field).to_pylist()
            out = [(*_cell(v, max_doc_bytes), "") for v in texts]
            if rows:
                for i in (range(len(out)) if want is None else [i for i in range(len(out)) if offset + i in want]):
                    if out[i][0] == OK:
                        out[i] = (OK, out[i][1], _json_row(batch.slice(i, 1).to_pylist()[0]))
            offset += len(out)
            yield out
    except InputError:
        raise
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{shard.path}: cannot read Parquet ({type(e).__name__}: {e})") from None


_LOADED: dict[str, Any] = {}  # saved-dataset folder -> Dataset, per process (memory-mapped, cheap to keep)


def _dataset_blocks(shard: Shard, text_field: str, max_doc_bytes: int, dataset, rows: bool,
                    picked: list[int] | None = None) -> Iterator[list[Record]]:
    """Records of rows [start, end) in blocks of 1024; with ``picked`` only those rows get their JSON line."""
    ds = dataset
    if ds is None:
        ds = _LOADED.get(shard.path)
        if ds is None:
            ds = _LOADED[shard.path] = _load_saved_dataset(Path(shard.path))
    has_field = text_field in ds.column_names
    want = set(picked) if picked is not None else None
    step = 1024
    for a in range(shard.start, shard.end, step):
        b = min(a + step, shard.end)
        part = ds.select(range(a, b))  # contiguous: a zero-copy slice of the memory-mapped table
        if not has_field:
            yield [(MISSING_FIELD, None, "")] * (b - a)
            continue
        out = [(*_cell(v, max_doc_bytes), "") for v in part[text_field]]
        if rows:
            for i in (range(len(out)) if want is None else [i for i in range(len(out)) if a - shard.start + i in want]):
                if out[i][0] == OK:
                    out[i] = (OK, out[i][1], _json_row(part[i]))
        yield out
