"""llm_compress.io: the memoised file digest (reused while a file is unchanged, recomputed when it changes)."""

from __future__ import annotations

import os
import time

import pytest

from llm_compress import io
from llm_compress.io import digest_path, memo_sha256

HOUR_NS = 3600 * 10**9


def _write(path, data: bytes, age_ns: int = HOUR_NS):
    """Write ``data`` with an mtime ``age_ns`` in the past (a fresh file's digest is not memoised: racy mtime)."""
    path.write_bytes(data)
    t = time.time_ns() - age_ns
    os.utime(path, ns=(t, t))
    return path


@pytest.fixture
def counted(monkeypatch):
    """The files actually read by sha256_file."""
    calls: list[str] = []
    real = io.sha256_file

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(io, "sha256_file", counting)
    return calls


def test_memoised_digest_equals_plain_and_is_reused_while_unchanged(tmp_path, counted):
    data = tmp_path / "pool"
    data.mkdir()
    for name, body in (("a.jsonl", b'{"text": "a"}\n' * 1000), ("b.jsonl", b"x" * 3_000_000)):
        _write(data / name, body)
    (data / "sub").mkdir()
    _write(data / "sub" / "c.txt", b"c")
    memo = tmp_path / "memo"
    plain = digest_path(data)
    assert digest_path(data, memo_dir=memo) == plain
    assert digest_path(data / "b.jsonl", memo_dir=memo) == digest_path(data / "b.jsonl")
    assert len(list(memo.glob("*.json"))) == 3  # one entry per file
    counted.clear()
    assert digest_path(data, memo_dir=memo) == plain
    assert memo_sha256(data / "sub" / ".." / "a.jsonl", memo) == io.sha256_file(data / "a.jsonl")  # resolved path
    assert counted == ["a.jsonl"]  # only the explicit plain call above read a file


def test_memoised_digest_recomputed_when_the_file_changes(tmp_path, counted):
    f = _write(tmp_path / "pool.jsonl", b"one\n")
    memo = tmp_path / "memo"
    first = memo_sha256(f, memo)
    # New content, same size, new mtime.
    _write(f, b"two\n", age_ns=HOUR_NS // 2)
    counted.clear()
    assert memo_sha256(f, memo) == io.sha256_file(f) != first
    assert counted == ["pool.jsonl", "pool.jsonl"]
    # Same content, only the mtime moved: read again (same digest), then reused.
    _write(f, b"two\n", age_ns=HOUR_NS // 4)
    counted.clear()
    assert memo_sha256(f, memo) == memo_sha256(f, memo) == io.sha256_file(f)
    assert counted == ["pool.jsonl", "pool.jsonl"]  # the first memo call and the plain one
    # Replaced by another file (new inode) with the same size and mtime: read again.
    st = f.stat()
    other = _write(tmp_path / "other", b"six\n")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, f)
    counted.clear()
    assert memo_sha256(f, memo) == io.sha256_file(f)
    assert len(counted) == 2


def test_memo_entry_corrupt_or_racy_is_not_trusted(tmp_path, counted):
    f = _write(tmp_path / "pool.jsonl", b"data\n")
    memo = tmp_path / "memo"
    expected = memo_sha256(f, memo)
    (entry,) = memo.glob("*.json")
    for junk in ("{not json", "[]", '{"key": 1}', '{"key": null, "sha256": 5}'):
        entry.write_text(junk)
        counted.clear()
        assert memo_sha256(f, memo) == expected and counted == ["pool.jsonl"]  # recomputed, entry rewritten
    counted.clear()
    assert memo_sha256(f, memo) == expected and counted == []
    assert not [p for p in memo.iterdir() if p.suffix != ".json"]  # no temporary file left
    # A file written just now may still change within the timestamp granularity: its digest is not stored.
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_bytes(b"new\n")
    memo_sha256(fresh, memo)
    counted.clear()
    memo_sha256(fresh, memo)
    assert counted == ["fresh.jsonl"]


def test_a_replaced_stage_folder_is_never_missing(tmp_path):
    """Publishing over a finished folder swaps the two in one step (renameat2 RENAME_EXCHANGE): a reader polling the
    folder while it is replaced again and again always finds a complete one."""
    import threading

    from llm_compress.io import atomic_dir

    final = tmp_path / "unlearn"
    with atomic_dir(final) as tmp:
        (tmp / "manifest.json").write_text("0")
    missing, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            if not (final / "manifest.json").is_file():
                missing.append(1)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(1, 300):
            with atomic_dir(final) as tmp:
                (tmp / "manifest.json").write_text(str(i))
    finally:
        stop.set()
        reader.join()
    assert (final / "manifest.json").read_text() == "299"
    assert not missing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unlearn"]  # the old contents are gone


def test_replace_falls_back_to_two_renames_where_the_os_cannot_swap(tmp_path, monkeypatch):
    from llm_compress.io import atomic_dir

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    final = tmp_path / "d"
    for i in range(3):
        with atomic_dir(final) as tmp:
            (tmp / "f").write_text(str(i))
    assert (final / "f").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
