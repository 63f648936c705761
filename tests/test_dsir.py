"""DSIR data selection (llm_compress.dsir): features, weights, resampling, sharding/resume, bad input, compat, Dask."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm_compress.dsir import (DSIRConfig, Featurizer, TargetSpec, core, fast_key, gumbel_top_k, run_selection,
                               sha256_bucket, sources, tokenize)
from llm_compress.errors import InputError

ROOT = Path(__file__).resolve().parent.parent

# Two synthetic domains with disjoint vocabularies apart from a few shared words.
PROSE = ("the a of and to in river mountain walked slowly morning light over across village quiet old "
         "story told she he they were was under green field wind").split()
CODE = ("def return self import class for in if else none true false lambda yield print range len "
        "dict list append value key args").split()
SHARED = "the in and a".split()


def _doc(rng: random.Random, vocab: list[str], n: int = 30) -> str:
    return " ".join(rng.choice(vocab + SHARED) for _ in range(n))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """pool.jsonl: 600 prose + 600 code docs interleaved, with 'domain' and 'i'; prose/code targets of 80 docs."""
    d = tmp_path_factory.mktemp("dsir-corpus")
    rng = random.Random(0)
    pool = [{"text": _doc(rng, PROSE if i % 2 == 0 else CODE), "domain": "prose" if i % 2 == 0 else "code", "i": i}
            for i in range(1200)]
    return {"dir": d, "pool": _write_jsonl(d / "pool.jsonl", pool),
            "prose": _write_jsonl(d / "prose.jsonl", [{"text": _doc(rng, PROSE)} for _ in range(80)]),
            "code": _write_jsonl(d / "code.jsonl", [{"text": _doc(rng, CODE)} for _ in range(80)])}


def _cfg(**kw) -> DSIRConfig:
    base = {"k": 200, "min_length": 5, "processes": 1, "shard_bytes": 20_000}
    return DSIRConfig(**{**base, **kw})


def _selected_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "selected.jsonl", encoding="utf-8")]


# -- features -----------------------------------------------------------------------------------


def test_fast_hash_fixed_values():
    # Frozen: changing the hash silently would invalidate every cache and every recorded selection.
    assert [fast_key(x) % 10_000 for x in ("hello", "world", ("hello", "world"), "naïve", "日本語")] == \
        [1476, 2074, 949, 7888, 8441]
    assert fast_key(("data", "selection", "rocks")) == 5567132780414689280
    batch = Featurizer(10_000).featurize(["Hello, World!", "data selection"])
    assert batch.bucket.tolist() == [1476, 6658, 2074, 6211, 2579, 6249, 6181, 603, 3213, 83]
    assert batch.doc.tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 1]
    assert batch.n_words.tolist() == [4, 2]
    assert sha256_bucket("hello", 10_000) == 7620  # the reference package's hash_buckets("hello")


def test_fast_hash_same_in_a_subprocess_with_another_hash_seed():
    code = ("from llm_compress.dsir import Featurizer; import json; "
            "b = Featurizer(10000).featurize(['Hello, World!', 'naïve café — 日本語 x_y']); "
            "print(json.dumps(b.bucket.tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    here = Featurizer(10_000).featurize(["Hello, World!", "naïve café — 日本語 x_y"]).bucket.tolist()
    assert json.loads(out.stdout) == here


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = list("abcXYZ019 _-.,!?'\"\t\n") + ["é", "ß", "İ", "ǅ", "—", "“", "”", "\u00a0", "\u0307", "日", "本",
                                                "Σ", "ﬁ", "\u2028", "\x1c", "🙂", "٣"]
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_tokenizer_is_wordpunct_and_batch_hash_matches_scalar_reference():
    regex = pytest.importorskip("regex")  # nltk >= 3.10 runs WordPunctTokenizer's pattern on the regex engine
    rng = random.Random(1)
    texts = [_random_text(rng, rng.randint(0, 120)) for _ in range(300)]
    pattern = regex.compile(r"\w+|[^\w\s]+")
    for t in texts:
        assert tokenize(t) == pattern.findall(t.lower()), repr(t)
    fz = Featurizer(1 << 20, ngrams=3)
    batch = fz.featurize(texts)
    expected = []
    for d, t in enumerate(texts):
        toks = tokenize(t)
        for n in (1, 2, 3):
            expected += [(d, fast_key(tuple(toks[i:i + n])) % (1 << 20)) for i in range(len(toks) - n + 1)]
    assert sorted(zip(batch.doc.tolist(), batch.bucket.tolist())) == sorted(expected)
    compat = Featurizer(997, ngrams=2, hash_mode="dsir-compat").featurize(texts)
    expected = []
    for d, t in enumerate(texts):
        toks = tokenize(t)
        expected += [(d, sha256_bucket(w, 997)) for w in toks]
        expected += [(d, sha256_bucket(" ".join(toks[i:i + 2]), 997)) for i in range(len(toks) - 1)]
    assert sorted(zip(compat.doc.tolist(), compat.bucket.tolist())) == sorted(expected)



def test_config_module_is_light():
    # A recipe's schema (llm_compress.config) imports llm_compress.dsir.config: it must not pull numpy or the
    # selection code.
    code = ("import sys, llm_compress.dsir.config, llm_compress.dsir; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'numpy' or m.startswith('llm_compress.dsir.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['llm_compress.dsir.config']"]
    import llm_compress.dsir

    assert llm_compress.dsir.DSIRConfig is core.DSIRConfig and llm_compress.dsir.run_selection is core.run_selection
    with pytest.raises(AttributeError):
        llm_compress.dsir.no_such_name  # noqa: B018


def test_char_classes_filled_block_by_block_match_the_engine_on_every_code_point():
    regex = pytest.importorskip("regex")
    from llm_compress.dsir import features

    # A fresh process classifies only the blocks its texts touch.
    code = ("from llm_compress.dsir import features as f; import numpy as np; "
            "f.Featurizer(10).featurize(['héllo 日本']); "
            "print(int((f._CLASS[::f._BLOCK] != f._UNKNOWN).sum()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert int(out.stdout) == 3  # U+0000-U+00FF (ASCII, é), and the blocks of 日 (U+65E5) and 本 (U+672C)
    # Every code point (surrogates aside) against the engine's own classes over one string.
    every = "".join(chr(c) if not 0xD800 <= c < 0xE000 else "x" for c in range(0x110000))
    expected = np.full(0x110000, features.PUNCT, dtype=np.uint8)
    for pattern, cls in ((r"\s", features.SPACE), (r"\w", features.WORD)):
        expected[[m.start() for m in regex.finditer(pattern, every)]] = cls
    expected[0xD800:0xE000] = features.PUNCT
    np.testing.assert_array_equal(features.char_classes(), expected)

# -- weights and resampling -----------------------------------------------------------------


def test_weight_formula_on_a_hand_made_example(tmp_path):
    # Unigrams only, buckets wide enough that a, b, c do not collide.
    assert len({fast_key(w) % 100_003 for w in "abc"}) == 3
    raw = _write_jsonl(tmp_path / "raw.jsonl", [{"text": "a b"}, {"text": "a a"}, {"text": "c c c"}])
    tgt = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a a b"}])
    cfg = _cfg(k=1, min_length=0, ngrams=1, num_buckets=100_003, deterministic=True)
    res = run_selection(cfg, [raw], [tgt], tmp_path / "out", progress=False)
    w = np.load(tmp_path / "out" / "weights.npy")
    e = 1e-8
    # p_raw: a 3/7, b 1/7, c 3/7; p_target: a 2/3, b 1/3, c 0.
    la, lb, lc = (np.log(2 / 3 + e) - np.log(3 / 7 + e), np.log(1 / 3 + e) - np.log(1 / 7 + e),
                  np.log(0 + e) - np.log(3 / 7 + e))
    np.testing.assert_allclose(w, [la + lb, 2 * la, 3 * lc], rtol=1e-12)
    assert _selected_rows(tmp_path / "out") == [{"text": "a b"}]  # the largest weight
    # Laplace smoothing: (counts + 1) / (3 + 1 * buckets) for the target.
    cfg = _cfg(k=1, min_length=0, ngrams=1, num_buckets=100_003, laplace=1.0)
    run_selection(cfg, [raw], [tgt], tmp_path / "out2", progress=False)
    pt = lambda c: (c + 1) / (3 + 100_003)  # noqa: E731
    la, lb, lc = (np.log(pt(2) + e) - np.log(3 / 7 + e), np.log(pt(1) + e) - np.log(1 / 7 + e),
                  np.log(pt(0) + e) - np.log(3 / 7 + e))
    np.testing.assert_allclose(np.load(tmp_path / "out2" / "weights.npy"), [la + lb, 2 * la, 3 * lc], rtol=1e-12)
    assert res.metrics["kl_reduction"] > 0


def test_gumbel_top_k_seeded_without_replacement_and_proportional():
    w = np.log(np.arange(1, 201, dtype=np.float64))
    a = gumbel_top_k(w, 20, np.random.default_rng(1))
    assert np.array_equal(a, gumbel_top_k(w, 20, np.random.default_rng(1)))
    assert not np.array_equal(a, gumbel_top_k(w, 20, np.random.default_rng(2)))
    assert len(np.unique(a)) == 20
    assert np.array_equal(gumbel_top_k(w, 5, None), [195, 196, 197, 198, 199])
    assert np.array_equal(gumbel_top_k(np.array([0.0, -np.inf, 0.0, 0.0]), 2, None), [0, 2])  # ties: lower index
    # k=1 draws index i with probability exp(w_i) / sum exp(w): here 1/4 and 3/4.
    rng = np.random.default_rng(0)
    hits = sum(gumbel_top_k(np.log([1.0, 3.0]), 1, rng)[0] for _ in range(4000))
    assert abs(hits / 4000 - 0.75) < 0.03


def test_weights_histogram_panels_and_ticks(tmp_path):
    from PIL import Image

    from llm_compress.dsir.plot import H, W, nice_ticks, weights_histogram

    assert nice_ticks(-4200, 300) == [-4000, -3000, -2000, -1000, 0]
    assert nice_ticks(0, 0.0094) == pytest.approx([0, 0.002, 0.004, 0.006, 0.008])
    assert nice_ticks(3.0, 3.0) == [3.0]
    w = np.random.default_rng(0).normal(size=500)
    # Two targets; the second has one distinct value and nothing selected (k split 100/0).
    weights_histogram(tmp_path / "h.png", [("target 'a'", [("all", w), ("selected", w[w > 1])]),
                                           ("target 'Σ'", [("all", np.full(5, 3.0)), ("selected", np.zeros(0))])])
    with Image.open(tmp_path / "h.png") as im:
        assert im.format == "PNG" and im.size == (W, 2 * H)
        assert len(im.getcolors(1 << 16)) > 10  # bars, axes and text were drawn
    assert [f.name for f in tmp_path.iterdir()] == ["h.png"]  # no temporary file left

def test_selection_is_seeded(corpus, tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run_selection(_cfg(seed=seed), [corpus["pool"]], [corpus["prose"]], tmp_path / name, progress=False)
        runs[name] = np.load(tmp_path / name / "selected_ids.npy")
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])


def test_two_domain_precision_kl_reduction_and_outputs(corpus, tmp_path):
    out = tmp_path / "out"
    res = run_selection(_cfg(), [corpus["pool"]], [corpus["prose"]], out, progress=False)
    rows = _selected_rows(out)
    assert len(rows) == 200 == res.metrics["selected"]
    precision = sum(r["domain"] == "prose" for r in rows) / len(rows)
    assert precision >= 0.9
    assert res.metrics["kl_reduction"] > 0
    t = res.metrics["targets"][0]
    assert t["kl_target_selected"] < t["kl_target_raw"]
    # Rows are the original JSON (extra fields kept), in pool order, matching selected_ids.
    ids = np.load(out / "selected_ids.npy")
    assert [r["i"] for r in rows] == ids.tolist()
    assert (out / "weights_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(out / "weights.npy").shape == (1200,)
    assert json.loads((out / "selection.json").read_text())["selected"] == 200
    # Selecting for the other domain picks the other half: the weights carry the signal, not the order.
    res = run_selection(_cfg(), [corpus["pool"]], [corpus["code"]], tmp_path / "code", progress=False)
    assert sum(r["domain"] == "code" for r in _selected_rows(tmp_path / "code")) >= 0.9 * 200


def test_multiple_targets_split_k_by_proportion(corpus, tmp_path):
    cfg = _cfg(k=200, target_proportions=[3, 1])
    res = run_selection(cfg, [corpus["pool"]], [corpus["prose"], corpus["code"]], tmp_path / "o", progress=False)
    assert [t["k"] for t in res.metrics["targets"]] == [150, 50]
    rows = _selected_rows(tmp_path / "o")
    assert len({r["i"] for r in rows}) == 200
    assert 140 <= sum(r["domain"] == "prose" for r in rows) <= 160
    assert np.load(tmp_path / "o" / "weights.npy").shape == (1200, 2)
    # The same through TargetSpec objects; pooled targets give one target.
    specs = [TargetSpec(paths=[str(corpus["prose"])], proportion=0.5, name="p"),
             TargetSpec(paths=[str(corpus["code"])], proportion=0.5, name="c")]
    res = run_selection(_cfg(), [corpus["pool"]], specs, tmp_path / "s", progress=False)
    assert [(t["name"], t["k"]) for t in res.metrics["targets"]] == [("p", 100), ("c", 100)]
    res = run_selection(_cfg(pool_targets=True), [corpus["pool"]], [corpus["prose"], corpus["code"]],
                        tmp_path / "pooled", progress=False)
    assert len(res.metrics["targets"]) == 1
    with pytest.raises(InputError, match="3 values for 2 target"):
        run_selection(_cfg(target_proportions=[1, 1, 1]), [corpus["pool"]], [corpus["prose"], corpus["code"]],
                      tmp_path / "bad", progress=False)


# -- sharding, formats, processes, resume -------------------------------------------------------


def test_shard_boundaries_cover_every_line_once(tmp_path):
    rng = random.Random(3)
    lines = []
    for i in range(300):
        kind = rng.random()
        lines.append("" if kind < 0.1 else "   " if kind < 0.15 else
                     json.dumps({"text": "w" * rng.randint(0, 90), "i": i}))
    path = tmp_path / "p.jsonl"
    path.write_bytes(("\r\n".join(lines[:150]) + "\n" + "\n".join(lines[150:])).encode())  # CRLF and LF, no final \n
    want = [json.loads(x)["i"] for x in lines if x.strip()]
    for shard_bytes in (1, 7, 64, 1000, 10**9):
        got = [json.loads(row)["i"] for s in sources.plan_shards(path, shard_bytes)
               for _, _, row in sources.iter_records(s, "text", 1 << 20, rows=True)]
        assert got == want, shard_bytes


def test_formats_txt_gz_parquet_dataset_agree(corpus, tmp_path):
    rows = [json.loads(line) for line in open(corpus["pool"], encoding="utf-8")][:300]
    texts = [r["text"] for r in rows]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=50)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    _write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = _cfg(k=30, shard_bytes=3000)
    ref = None
    for name in ("p.jsonl", "p.txt", "p.jsonl.gz", "p.parquet", "ds"):
        out = tmp_path / f"out-{name}"
        run_selection(cfg, [tmp_path / name], [corpus["prose"]], out, progress=False)
        w = np.load(out / "weights.npy")
        sel = _selected_rows(out)
        if ref is None:
            ref = (w, sel)
            continue
        np.testing.assert_allclose(w, ref[0], rtol=0, atol=1e-9, err_msg=name)
        if name == "p.txt":
            assert sel == [{"text": r["text"]} for r in ref[1]]
        else:
            assert sel == ref[1], name  # original rows, all fields
    # An in-memory datasets.Dataset object works too.
    run_selection(cfg, [datasets.Dataset.from_list(rows)], [corpus["prose"]], tmp_path / "obj", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "obj" / "weights.npy"), ref[0], atol=1e-9)


def test_worker_processes_match_inline(corpus, tmp_path):
    # In-process, the fit keeps the raw features for the weights pass; workers (and keep_features_bytes=0) read twice.
    inline = run_selection(_cfg(), [corpus["pool"]], [corpus["prose"]], tmp_path / "inline", progress=False)
    assert inline.metrics["executor"] == "inline" and inline.metrics["features_kept_shards"] == inline.metrics["shards"]
    res = run_selection(_cfg(processes=2), [corpus["pool"]], [corpus["prose"]], tmp_path / "pool", progress=False)
    assert res.metrics["executor"] == "pool" and res.metrics["shards"] > 2 and res.metrics["features_kept_shards"] == 0
    twice = run_selection(_cfg(keep_features_bytes=0), [corpus["pool"]], [corpus["prose"]], tmp_path / "twice",
                          progress=False)
    assert twice.metrics["features_kept_shards"] == 0
    for other in ("pool", "twice"):
        for name in ("weights.npy", "selected_ids.npy"):
            assert np.array_equal(np.load(tmp_path / "inline" / name), np.load(tmp_path / other / name))


def test_automatic_processes_stay_in_process_for_a_small_input(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(core, "usable_cores", lambda: 2)
    res = run_selection(_cfg(processes=None), [corpus["pool"]], [corpus["prose"]], tmp_path / "small", progress=False)
    assert (res.metrics["executor"], res.metrics["processes"]) == ("inline", 1)
    monkeypatch.setattr(core, "POOL_MIN_BYTES", 20_000)  # about one test shard beside the largest: workers pay
    res = run_selection(_cfg(processes=None), [corpus["pool"]], [corpus["prose"]], tmp_path / "large", progress=False)
    assert (res.metrics["executor"], res.metrics["processes"]) == ("pool", 2)
    assert np.array_equal(np.load(tmp_path / "small" / "weights.npy"), np.load(tmp_path / "large" / "weights.npy"))


def test_interrupted_run_resumes_from_cached_shards(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real = core.run_shard
    calls: list[tuple[str, int]] = []

    def failing(task):
        if task.op == "weights" and task.index == 2:
            raise RuntimeError("simulated crash in shard 2")
        calls.append((task.op, task.index))
        return real(task)

    monkeypatch.setattr(core, "run_shard", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_selection(_cfg(), [corpus["pool"]], [corpus["prose"]], tmp_path / "out", cache_dir=cache, progress=False)
    done_before = {i for op, i in calls if op == "weights"}
    assert done_before == {0, 1}
    calls.clear()

    def counting(task):
        calls.append((task.op, task.index))
        return real(task)

    monkeypatch.setattr(core, "run_shard", counting)
    res = run_selection(_cfg(), [corpus["pool"]], [corpus["prose"]], tmp_path / "out", cache_dir=cache,
                        progress=False)
    n_shards = res.metrics["shards"]
    assert n_shards >= 4
    assert not [c for c in calls if c[0] == "counts"]  # all counts came from the cache
    assert {i for op, i in calls if op == "weights"} == set(range(2, n_shards))  # 0 and 1 were not recomputed
    assert res.metrics["cache"] == {"counts_hits": n_shards + 1, "counts_computed": 0, "weights_hits": 2,
                                    "weights_computed": n_shards - 2}
    fresh = run_selection(_cfg(), [corpus["pool"]], [corpus["prose"]], tmp_path / "fresh", progress=False)
    assert np.array_equal(np.load(tmp_path / "out" / "weights.npy"), np.load(tmp_path / "fresh" / "weights.npy"))
    assert res.metrics["kl_reduction"] == fresh.metrics["kl_reduction"]
    # Editing the pool changes the shards' identity: nothing stale is reused.
    pool2 = tmp_path / "pool2.jsonl"
    pool2.write_bytes(corpus["pool"].read_bytes())
    res = run_selection(_cfg(), [pool2], [corpus["prose"]], tmp_path / "o2", cache_dir=cache, progress=False)
    assert res.metrics["cache"]["weights_hits"] == 0


def test_raw_sample_fit(corpus, tmp_path):
    full = run_selection(_cfg(), [corpus["pool"]], [corpus["prose"]], tmp_path / "a", progress=False)
    part = run_selection(_cfg(raw_sample_docs=300), [corpus["pool"]], [corpus["prose"]], tmp_path / "b",
                         progress=False)
    assert 0.2 < part.metrics["raw_ngrams_fitted"] / full.metrics["raw_ngrams_fitted"] < 0.35
    assert part.metrics["raw_records"] == 1200


# -- bad input ----------------------------------------------------------------------------------


def test_bad_records_are_counted_skips(corpus, tmp_path):
    pool = tmp_path / "pool.jsonl"
    good = corpus["pool"].read_bytes()
    with open(pool, "wb") as f:
        f.write(good)
        f.write(b'{"content": "no text field here"}\n')
        f.write(b'{"text": 17}\n')
        f.write(b'{"text": "caf\xe9 latin-1 bytes"}\n')
        f.write(b'{"text": "truncated\n')
        f.write(b'{"text": "too short"}\n')
        f.write(b'{"text": "' + b"x " * (50 << 20) + b'"}\n')  # one 100 MiB line
        f.write(b"\n")
        f.write(b'{"text": "' + " ".join(["river"] * 40).encode() + b'", "i": "last"}\n')
    res = run_selection(_cfg(max_doc_bytes=1 << 20, shard_bytes=8 << 20), [pool], [corpus["prose"]], tmp_path / "o",
                        progress=False)
    m = res.metrics
    assert m["skipped"] == {"too_short": 1, "non_utf8": 1, "missing_text_field": 2, "invalid_json": 1,
                            "oversized": 1}
    assert m["raw_records"] == 1200 + 7
    w = np.load(tmp_path / "o" / "weights.npy")
    assert np.isnan(w[1200:1204]).all() and np.isfinite(w[1204]) and np.isnan(w[1205]) and np.isfinite(w[1206])


def test_oversized_line_memory_is_bounded(tmp_path):
    import tracemalloc

    path = tmp_path / "big.txt"
    with open(path, "wb") as f:
        f.write(b"first line of text\n")
        f.write(b"y" * (100 << 20) + b"\n")  # one 100 MB document
        f.write(b"last line of text\n")
    shard = sources.plan_shards(path, 1 << 30)[0]
    tracemalloc.start()
    got = [(st, t) for st, t, _ in sources.iter_records(shard, "text", 4 << 20)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [(sources.OK, "first line of text"), (sources.OVERSIZED, None), (sources.OK, "last line of text")]
    assert peak < 24 << 20


@pytest.mark.parametrize("case", ["empty_target", "target_without_text", "empty_pool", "pool_all_short", "k_too_big",
                                  "missing_file", "target_unknown_suffix"])
def test_bad_inputs_raise_input_error(corpus, tmp_path, case):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    notext = _write_jsonl(tmp_path / "notext.jsonl", [{"body": "x y z"}] * 3)
    raw, tgt, k, match = [corpus["pool"]], [corpus["prose"]], 10, ""
    if case == "empty_target":
        tgt, match = [empty], "empty target 'empty'"
    elif case == "target_without_text":
        tgt, match = [notext], "missing_text_field=3"
    elif case == "empty_pool":
        raw, match = [empty], "empty raw pool"
    elif case == "pool_all_short":
        raw, match = [_write_jsonl(tmp_path / "short.jsonl", [{"text": "tiny doc"}] * 5)], "too_short=5"
    elif case == "k_too_big":
        k, match = 5000, "k=5000 is larger than the pool: only 1200 eligible"
    elif case == "missing_file":
        raw, match = [tmp_path / "nope.jsonl"], "not found"
    else:
        (tmp_path / "t.csv").write_text("a,b\n")
        tgt, match = [tmp_path / "t.csv"], "is not .jsonl"
    with pytest.raises(InputError, match=match):
        run_selection(_cfg(k=k), raw, tgt, tmp_path / "out", progress=False)


# -- reference package and Dask -----------------------------------------------------------------


_REFERENCE = """
import sys, tempfile, numpy as np
from data_selection import HashedNgramDSIR
d = HashedNgramDSIR([sys.argv[1]], [sys.argv[2]], tempfile.mkdtemp(), num_proc=1, min_example_length=0)
d.fit_importance_estimator(num_tokens_to_fit="all")
d.compute_importance_weights()
np.save(sys.argv[3], np.load(d.log_importance_weights_dir / "0.npy"))
"""


def _reference_python() -> str | None:
    try:
        import data_selection  # noqa: F401

        return sys.executable
    except ImportError:
        return os.environ.get("DSIR_REFERENCE_PYTHON")  # a venv with data-selection==1.0.3 (it needs nltk)


def test_compat_mode_matches_reference_package(tmp_path):
    ref_python = _reference_python()
    if ref_python is None:
        pytest.skip("data-selection not importable and DSIR_REFERENCE_PYTHON not set")
    rng = random.Random(5)
    words = PROSE + CODE + ["Ünïcödé", "naïve", "—", "“quoted”", "x_y", "3.14", "İstanbul", "don't", "日本語", "ﬁ"]
    pool = _write_jsonl(tmp_path / "pool.jsonl", [{"text": " ".join(rng.choices(words, k=rng.randint(1, 80)))}
                                                  for _ in range(500)])
    tgt = _write_jsonl(tmp_path / "t.jsonl", [{"text": _doc(rng, PROSE)} for _ in range(40)])
    subprocess.run([ref_python, "-c", _REFERENCE, str(pool), str(tgt), str(tmp_path / "ref.npy")], check=True,
                   capture_output=True)
    run_selection(_cfg(k=5, min_length=0, hash="dsir-compat"), [pool], [tgt], tmp_path / "o", progress=False)
    ours, ref = np.load(tmp_path / "o" / "weights.npy"), np.load(tmp_path / "ref.npy")
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-6


@pytest.mark.slow
def test_shards_run_on_dask_through_prefect(corpus, tmp_path, prefect_server):
    """The shard function on a Dask LocalCluster of 2 worker processes via prefect-dask's DaskTaskRunner."""
    pytest.importorskip("prefect_dask")
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    shard_task = task(core.run_shard, name="dsir-shard", cache_policy=NO_CACHE)

    def dask_map(fn, tasks):
        return [f.result() for f in shard_task.map(tasks)]

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None})

    @flow(task_runner=runner)
    def select(out: str) -> dict:
        cfg = _cfg(shard_bytes=60_000)
        return run_selection(cfg, [corpus["pool"]], [corpus["prose"]], Path(out), progress=False,
                             executor=dask_map).metrics

    metrics = select(str(tmp_path / "dask"))
    assert metrics["executor"] == "custom" and metrics["cache"]["weights_computed"] == metrics["shards"] >= 2
    run_selection(_cfg(shard_bytes=60_000), [corpus["pool"]], [corpus["prose"]], tmp_path / "inline", progress=False)
    assert np.array_equal(np.load(tmp_path / "dask" / "weights.npy"), np.load(tmp_path / "inline" / "weights.npy"))
    assert np.array_equal(np.load(tmp_path / "dask" / "selected_ids.npy"),
                          np.load(tmp_path / "inline" / "selected_ids.npy"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_shards_run_on_a_local_cluster_from_the_recipe_and_match_inline(kind, corpus, tmp_path):
    """runtime.executor: a local cluster of 2 worker processes (Dask or Ray) computes the same selection as one
    process; a rerun on it reuses every cached shard; a path the workers cannot see fails before any shard runs."""
    from llm_compress.schema import ExecutorConfig
    from llm_compress.dsir.executors import make_executor

    cache = tmp_path / "cache"
    cache.mkdir()
    cfg = ExecutorConfig(kind=kind, workers=2)
    ex = make_executor(cfg, [corpus["pool"], corpus["prose"], cache])
    try:
        m = run_selection(_cfg(shard_bytes=60_000), [corpus["pool"]], [corpus["prose"]], tmp_path / kind,
                          cache_dir=cache, progress=False, executor=ex).metrics
        again = run_selection(_cfg(shard_bytes=60_000), [corpus["pool"]], [corpus["prose"]], tmp_path / "again",
                              cache_dir=cache, progress=False, executor=ex).metrics
    finally:
        ex.close()
    assert m["executor"] == kind and m["processes"] == 2 and m["cache"]["weights_computed"] == m["shards"] >= 2
    assert again["cache"]["weights_computed"] == 0  # every shard came from the cache
    run_selection(_cfg(shard_bytes=60_000), [corpus["pool"]], [corpus["prose"]], tmp_path / "inline", progress=False)
    for f in ("weights.npy", "selected_ids.npy"):
        assert np.array_equal(np.load(tmp_path / kind / f), np.load(tmp_path / "inline" / f))
    with pytest.raises(InputError, match=rf"runtime.executor {kind}: worker .* cannot see .*nowhere.jsonl"):
        make_executor(cfg, [corpus["pool"], tmp_path / "nowhere.jsonl"])
    if kind == "ray":
        import ray

        assert not ray.is_initialized()  # the refused executor shut down the cluster it started


_WORKER_ENV = """
import os
from llm_compress.schema import ExecutorConfig
from llm_compress.dsir.executors import make_executor

if __name__ == "__main__":
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"  # as an earlier Dask nanny in this process leaves it
    ex = make_executor(ExecutorConfig(kind="dask", workers=1), [os.getcwd()])
    # the environment the worker process started with (glibc reads the variable then, not later)
    started = ex.client.run(lambda: b"MALLOC_TRIM_THRESHOLD_=" in open("/proc/self/environ", "rb").read())
    print(sorted(set(started.values())), os.environ["MALLOC_TRIM_THRESHOLD_"])  # and this process' own is back
    ex.close()
"""


@pytest.mark.slow
def test_the_local_dask_cluster_starts_its_workers_without_the_malloc_trim_threshold(tmp_path):
    """Dask starts worker processes with MALLOC_TRIM_THRESHOLD_=65536, under which the featurizer ran 3.4x slower
    (bench/RESULTS.md, where it was 3.4x); the executor's local cluster starts them without it. Checked in a fresh
    process, on the environment the worker process started with (/proc/self/environ: glibc reads the variable at
    start; the nanny sets it in os.environ afterwards, where it does nothing)."""
    script = tmp_path / "worker_env.py"
    script.write_text(_WORKER_ENV)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[False] 65536"
