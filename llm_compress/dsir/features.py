"""Hashed n-gram features, vectorised over a batch of documents.

Tokenizer
    Text is lowercased (``str.lower``) and cut into maximal runs of word characters (``\\w``) or of punctuation
    (neither ``\\w`` nor ``\\s``); whitespace separates tokens. This is ``findall(r"\\w+|[^\\w\\s]+", text.lower())``,
    i.e. nltk's ``WordPunctTokenizer`` as the reference package uses it. nltk >= 3.10 runs that pattern on the
    ``regex`` engine (whose ``\\w`` also covers combining marks), so the character classes come from ``regex`` (a
    transformers dependency; ``re`` if it is missing): a table of every code point's class is filled by running the
    engine itself, one block of 256 code points the first time a text holds one of them (a process that sees
    ASCII and a few scripts classifies a few blocks, not all 1.1M code points), and tokenizing is then one table
    lookup per code point. Tokens are therefore the same on every machine with the same ``regex`` version (newer
    Unicode versions only add classes for newly assigned code points); :data:`ENGINE` names it and is part of
    every cache key.

Hashes (``hash_mode``)
    ``"fast"``: each token's code points ``c_0..c_{L-1}`` give ``poly = sum_i c_i * P**i mod 2**64`` and
    ``h1 = fmix64(poly ^ (L * K_LEN))`` (``fmix64`` is MurmurHash3's 64-bit finaliser). An n-gram of tokens
    ``t_1..t_n`` is ``g_1 = h1(t_1)``, ``g_j = fmix64(g_{j-1} * K_NG + h1(t_j))``. Its bucket is ``g_n mod
    num_buckets``. Only integer arithmetic on code points: identical across processes, machines and
    Python builds (given the same tokens), unlike Python's salted ``hash``. :func:`fast_key` is a scalar
    pure-Python reference of the same function.

    ``"dsir-compat"``: the reference package's bucket, ``int(sha256(ngram.encode()).hexdigest(), 16) mod
    num_buckets`` with the n-gram's tokens joined by one space. sha256 runs once per distinct n-gram per
    process (a sorted cache keyed by the fast 64-bit key; a 64-bit collision, probability ~n**2 / 2**65 for
    n distinct n-grams, would give one n-gram another's bucket).

Both kinds of n-gram (unigrams and longer ones) share one bucket space, as in the reference.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

HashMode = Literal["fast", "dsir-compat"]

try:  # nltk >= 3.10 compiles WordPunctTokenizer's pattern with ``regex``; its \w also covers combining marks
    import regex as _engine
except ImportError:  # pragma: no cover - regex comes with transformers; ``re`` is what older nltk used
    _engine = re
ENGINE = f"{_engine.__name__} {getattr(_engine, '__version__', '')}".strip()

_MASK = (1 << 64) - 1
P = 0x9E3779B97F4A7C15  # odd, so every power is a unit mod 2**64 and no code point cancels out
K_LEN = 0xC2B2AE3D27D4EB4F  # mixes the token length in: tokens differing by trailing NULs differ
K_NG = 0x165667B19E3779F9  # odd multiplier chaining n-gram parts (order-sensitive)
_F1 = 0xFF51AFD7ED558CCD
_F2 = 0xC4CEB9FE1A85EC53

SPACE, WORD, PUNCT = 0, 1, 2

_UNKNOWN = 255  # a code point whose block has not been classified yet
_BLOCK = 256  # code points classified together
_CLASS = np.full(0x110000, _UNKNOWN, dtype=np.uint8)  # [0x110000] code point -> SPACE / WORD / PUNCT, filled lazily
_POW = np.ones(1, dtype=np.uint64)  # [n] P**i mod 2**64, grown on demand to the longest batch seen
_INV = np.ones(1, dtype=np.uint64)  # [n] P**-i mod 2**64


def _classify_blocks(blocks: list[int]) -> None:
    """Fill ``_CLASS`` for these blocks of ``_BLOCK`` code points from the engine's own ``\\w`` and ``\\s``."""
    for b in blocks:
        lo = b * _BLOCK
        cls = np.full(_BLOCK, PUNCT, dtype=np.uint8)
        if not 0xD800 <= lo < 0xE000:  # surrogates cannot occur in text decoded from UTF-8: they stay PUNCT
            chunk = "".join(map(chr, range(lo, lo + _BLOCK)))
            # SPACE first, WORD second: in ``\\w+|[^\\w\\s]+`` a character in both classes starts a word.
            for pattern, c in ((r"\s", SPACE), (r"\w", WORD)):
                cls[[m.start() for m in _engine.finditer(pattern, chunk)]] = c
        _CLASS[lo:lo + _BLOCK] = cls


def classes_of(cp: np.ndarray) -> np.ndarray:
    """[N] uint8 class of every code point in ``cp`` [N], classifying the blocks not seen before in this process."""
    cls = _CLASS[cp]
    if (cls == _UNKNOWN).any():  # one pass over N bytes; rare after the first batches of a script
        # bincount, not np.unique: this runs in every process's first batches and np.unique imports numpy.ma (12 ms).
        _classify_blocks(np.flatnonzero(np.bincount(cp[cls == _UNKNOWN] // _BLOCK)).tolist())
        cls = _CLASS[cp]
    return cls


def char_classes() -> np.ndarray:
    """[0x110000] uint8 class of every code point (classifies all blocks not seen yet: about 0.2 s)."""
    _classify_blocks(np.flatnonzero(_CLASS[::_BLOCK] == _UNKNOWN).tolist())
    return _CLASS


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """([>= n], [>= n]) uint64 tables of P**i and P**-i mod 2**64 (numpy's uint64 products wrap mod 2**64)."""
    global _POW, _INV
    if len(_POW) < n:
        size = max(n, 2 * len(_POW), 1 << 16)
        _POW = _cumpow(P, size)
        _INV = _cumpow(pow(P, -1, 1 << 64), size)
    return _POW, _INV


def _cumpow(base: int, size: int) -> np.ndarray:
    pw = np.full(size, base, dtype=np.uint64)
    pw[0] = 1
    return np.cumprod(pw, dtype=np.uint64)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3 fmix64 on a uint64 array (in place on a fresh array)."""
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(_F1)
    x ^= x >> np.uint64(33)
    x *= np.uint64(_F2)
    x ^= x >> np.uint64(33)
    return x


def _fmix64_int(x: int) -> int:
    x ^= x >> 33
    x = (x * _F1) & _MASK
    x ^= x >> 33
    x = (x * _F2) & _MASK
    return x ^ (x >> 33)


def fast_key(ngram: list[str] | tuple[str, ...] | str) -> int:
    """64-bit fast-mode key of one n-gram of already lowercased tokens (scalar reference of the batch code)."""
    tokens = [ngram] if isinstance(ngram, str) else list(ngram)
    g = 0
    for j, tok in enumerate(tokens):
        poly = 0
        for i, ch in enumerate(tok):
            poly = (poly + ord(ch) * pow(P, i, 1 << 64)) & _MASK
        h1 = _fmix64_int(poly ^ ((len(tok) * K_LEN) & _MASK))
        g = h1 if j == 0 else _fmix64_int((g * K_NG + h1) & _MASK)
    return g


def sha256_bucket(ngram: str, num_buckets: int) -> int:
    """The reference package's bucket of an n-gram string (tokens joined by one space)."""
    return int.from_bytes(hashlib.sha256(ngram.encode("utf-8")).digest(), "big") % num_buckets


def tokenize(text: str) -> list[str]:
    """Lowercased word/punctuation tokens of one text, as the batch featurizer sees them."""
    low = text.lower()
    f = Featurizer(1)
    starts, ends, _ = f._tokens([low])
    return [low[s:e] for s, e in zip(starts.tolist(), ends.tolist())]


@dataclass
class Batch:
    """Hashed n-gram occurrences of a batch of documents.

    ``doc``: [M] int64 document index (0..n_docs-1) of each n-gram occurrence; ``bucket``: [M] int64 bucket id;
    ``n_words``: [n_docs] int64 unigram (token) count of each document.
    """

    doc: np.ndarray
    bucket: np.ndarray
    n_words: np.ndarray


class Featurizer:
    """Batched, vectorised hashed n-gram featurizer (see the module docstring for the exact features)."""

    def __init__(self, num_buckets: int, ngrams: int = 2, hash_mode: HashMode = "fast") -> None:
        if hash_mode not in ("fast", "dsir-compat"):
            raise ValueError(f"unknown hash mode {hash_mode!r}")
        self.num_buckets = int(num_buckets)
        self.ngrams = int(ngrams)
        self.hash_mode = hash_mode
        self._ascii_classes = classes_of(np.arange(256))  # [256]: the ASCII fast path's table
        # dsir-compat cache: sorted fast keys [C] uint64 -> sha256 buckets [C] int64.
        self._cache_keys = np.empty(0, dtype=np.uint64)
        self._cache_buckets = np.empty(0, dtype=np.int64)

    # -- tokenization -------------------------------------------------------------------------

    def _tokens(self, lowered: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token spans of lowered texts joined by '\\n': (starts [T], ends [T] in code points, classes [N])."""
        joined = "\n".join(lowered)
        # One array element per code point, so offsets index ``joined`` directly. ASCII needs 1 byte each.
        if joined.isascii():
            cp = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
            cls = self._ascii_classes[cp]  # [N] uint8; a 128-entry table stays in L1
        else:
            cp = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
            cls = classes_of(cp)
        n = len(cls)
        # A token starts where a non-space class begins and ends where that class stops.
        change = np.empty(n + 1, dtype=bool)  # change[i]: class differs between i-1 and i (edges count)
        change[0] = True
        change[n] = True
        np.not_equal(cls[1:], cls[:-1], out=change[1:n])
        tok = cls != SPACE
        starts = np.flatnonzero(change[:n] & tok)
        ends = np.flatnonzero(change[1:] & tok) + 1
        return starts, ends, cp

    def _unigram_keys(self, cp: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """[T] uint64 h1 of every token: its polynomial over code points, then fmix64 with the length.

        Computed with prefix sums over the whole batch: ``pre[i] = sum_{j<i} c_j P**j`` (mod 2**64), so a token's
        ``sum_i c_{s+i} P**i = (pre[e] - pre[s]) * P**-s``; P is odd, hence invertible mod 2**64.
        """
        n = len(cp)
        pw, inv = _powers(n)
        vals = cp.astype(np.uint64)  # [N]
        vals *= pw[:n]
        pre = np.empty(n + 1, dtype=np.uint64)  # [N+1] prefix sums, wrapping mod 2**64
        pre[0] = 0
        np.cumsum(vals, out=pre[1:])
        poly = pre[ends] - pre[starts]  # [T]
        poly *= inv[starts]
        return _fmix64(poly ^ ((ends - starts).astype(np.uint64) * np.uint64(K_LEN)))

    # -- featurization ------------------------------------------------------------------------

    def featurize(self, texts: list[str]) -> Batch:
        """All hashed n-gram occurrences of ``texts`` (vectorised over the whole batch)."""
        lowered = [t.lower() for t in texts]
        n_docs = len(lowered)
        lens = np.fromiter(map(len, lowered), dtype=np.int64, count=n_docs)
        doc_start = np.zeros(n_docs, dtype=np.int64)  # [D] offset of each document in the joined text
        np.cumsum(lens[:-1] + 1, out=doc_start[1:])
        starts, ends, cp = self._tokens(lowered)
        if len(starts) == 0:
            empty = np.empty(0, dtype=np.int64)
            return Batch(empty, empty, np.zeros(n_docs, dtype=np.int64))
        tdoc = np.searchsorted(doc_start, starts, side="right") - 1  # [T] document of each token
        h1 = self._unigram_keys(cp, starts, ends)
        keys = [h1]
        docs = [tdoc]
        # n-grams of order j: consecutive tokens of one document; g chains the parts left to right.
        g = h1
        for j in range(2, self.ngrams + 1):
            g = _fmix64(g[:-1] * np.uint64(K_NG) + h1[j - 1:])  # [T-j+1] key of the n-gram starting at t
            same = tdoc[:len(g)] == tdoc[j - 1:]
            keys.append(g[same])
            docs.append(tdoc[:len(g)][same])
        all_keys = np.concatenate(keys)
        if self.hash_mode == "fast":
            bucket = (all_keys % np.uint64(self.num_buckets)).astype(np.int64)
        else:
            bucket = self._compat_buckets(keys, lowered, starts, ends, tdoc)
        n_words = np.bincount(tdoc, minlength=n_docs)
        return Batch(np.concatenate(docs), bucket, n_words)

    def _compat_buckets(self, keys: list[np.ndarray], lowered: list[str], starts: np.ndarray, ends: np.ndarray,
                        tdoc: np.ndarray) -> np.ndarray:
        """sha256 buckets of every occurrence in ``keys`` (one array per order), hashing new n-grams only."""
        joined = "\n".join(lowered)
        out = []
        for order, k in enumerate(keys, start=1):
            # Start token of each occurrence, to rebuild the n-gram string of keys not yet cached.
            tok_idx = np.arange(len(k), dtype=np.int64)
            if order > 1:
                tok_idx = np.flatnonzero(tdoc[:len(tdoc) - order + 1] == tdoc[order - 1:])
            uniq, first, inverse = np.unique(k, return_index=True, return_inverse=True)
            pos = np.searchsorted(self._cache_keys, uniq)
            pos_c = np.minimum(pos, max(len(self._cache_keys) - 1, 0))
            known = (pos < len(self._cache_keys)) & (self._cache_keys[pos_c] == uniq) if len(self._cache_keys) \
                else np.zeros(len(uniq), dtype=bool)
            buckets = np.empty(len(uniq), dtype=np.int64)
            buckets[known] = self._cache_buckets[pos_c[known]]
            new = np.flatnonzero(~known)
            if len(new):
                st = starts.tolist()
                en = ends.tolist()
                nb = self.num_buckets
                fresh = np.empty(len(new), dtype=np.int64)
                for i, u in enumerate(new.tolist()):
                    t = int(tok_idx[first[u]])
                    text = " ".join(joined[st[t + j]:en[t + j]] for j in range(order))
                    fresh[i] = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big") % nb
                buckets[new] = fresh
                self._remember(uniq[new], fresh)
            out.append(buckets[inverse.reshape(-1)])
        return np.concatenate(out)

    def _remember(self, keys: np.ndarray, buckets: np.ndarray, limit: int = 1 << 22) -> None:
        """Merge new (key, bucket) pairs into the sorted cache; start afresh past ``limit`` entries (bounded memory)."""
        if len(self._cache_keys) + len(keys) > limit:
            self._cache_keys = np.empty(0, dtype=np.uint64)
            self._cache_buckets = np.empty(0, dtype=np.int64)
        k = np.concatenate([self._cache_keys, keys])
        b = np.concatenate([self._cache_buckets, buckets])
        order = np.argsort(k, kind="stable")
        self._cache_keys = k[order]
        self._cache_buckets = b[order]

    # -- conveniences -------------------------------------------------------------------------

    def counts(self, texts: list[str]) -> np.ndarray:
        """[num_buckets] int64 n-gram counts summed over ``texts``."""
        return np.bincount(self.featurize(texts).bucket, minlength=self.num_buckets)

    def doc_counts(self, texts: list[str]) -> np.ndarray:
        """[n_docs, num_buckets] int64 dense per-document counts (small inputs and tests only)."""
        b = self.featurize(texts)
        flat = np.bincount(b.doc * self.num_buckets + b.bucket, minlength=len(texts) * self.num_buckets)
        return flat.reshape(len(texts), self.num_buckets)

    def log_weights(self, batch: Batch, log_diff: np.ndarray, n_docs: int) -> np.ndarray:
        """[n_docs, T] float64 log importance weights ``counts(x) . log_diff[t]`` for ``log_diff`` [T, num_buckets]."""
        out = np.empty((n_docs, log_diff.shape[0]), dtype=np.float64)
        for t in range(log_diff.shape[0]):
            out[:, t] = np.bincount(batch.doc, weights=log_diff[t][batch.bucket], minlength=n_docs)
        return out
