"""The embedded world: corpus from Python's own text, and the byte-level BPE tokenizer trained on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llm_compress.data import bos_prefix
from llm_compress.embedded import DOMAINS, MB, build_corpus, train_tokenizer
from llm_compress.errors import InputError

SMALL_MB = 0.3
VOCAB = 1024


def _read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _build(root: Path, name: str, **kw) -> tuple[Path, dict]:
    out = root / name
    out.mkdir()
    args = {"max_mb": SMALL_MB, "eval_fraction": 0.05, "seed": 0} | kw
    return out, build_corpus(out, **args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("corpus"), "a")


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    from transformers import AutoTokenizer

    _, paths = corpus
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([Path(paths[d]["train"]) for d in DOMAINS], vocab_size=VOCAB, out_dir=out)
    return AutoTokenizer.from_pretrained(out)


# --------------------------------------------------------------------------------------------
# corpus


def test_domains_and_splits_exist(corpus):
    out, paths = corpus
    assert set(paths) == set(DOMAINS)
    stats = json.loads((out / "corpus.json").read_text())["domains"]
    for domain in DOMAINS:
        for split in ("train", "eval"):
            path = Path(paths[domain][split])
            assert path == out / domain / f"{split}.jsonl"
            rows = _read(path)
            assert rows, f"{domain}/{split} is empty"
            assert all(set(r) == {"text", "source"} and isinstance(r["text"], str) and r["text"].strip()
                       for r in rows)
            assert stats[domain][split]["docs"] == len(rows)
            assert stats[domain][split]["bytes"] == path.stat().st_size
        assert len(_read(paths[domain]["eval"])) < len(_read(paths[domain]["train"]))
    assert sorted(p.name for p in out.iterdir()) == sorted([*DOMAINS, "corpus.json"])


def test_domain_contents(corpus):
    _, paths = corpus
    rows = {d: _read(paths[d]["train"]) + _read(paths[d]["eval"]) for d in DOMAINS}
    for domain in DOMAINS:
        assert len({r["text"] for r in rows[domain]}) == len(rows[domain]), f"{domain} has duplicate texts"
    assert all(r["source"].startswith("pydoc:") for r in rows["prose"])
    assert all(len(r["text"]) <= 3000 for r in rows["prose"] + rows["code"])
    assert all(r["source"].startswith("stdlib:") for r in rows["code"] + rows["docstrings"])
    # Tests, third-party packages and the prose's own source are left out of the code.
    assert not any(re.search(r"(^|/)(tests?|idle_test|site-packages|pydoc_data)/", r["source"][7:])
                   for r in rows["code"] + rows["docstrings"])
    assert any(re.search(r"^(def|class) ", r["text"], re.M) for r in rows["code"])
    for r in rows["docstrings"]:
        qualname, _, doc = r["text"].partition("\n")
        assert re.fullmatch(r"[A-Za-z_][\w.]*", qualname), qualname
        assert r["source"].endswith(":" + qualname)
        assert len(doc) >= 80


def test_same_seed_is_byte_identical(corpus, tmp_path):
    out, _ = corpus
    again, _ = _build(tmp_path, "b")
    assert _files(again) == _files(out)


def test_other_seed_changes_split_not_content(corpus, tmp_path):
    _, paths = corpus
    _, other = _build(tmp_path, "c", seed=1)
    for domain in DOMAINS:
        mine = {s: {r["source"] for r in _read(paths[domain][s])} for s in ("train", "eval")}
        theirs = {s: {r["source"] for r in _read(other[domain][s])} for s in ("train", "eval")}
        assert mine["train"] | mine["eval"] == theirs["train"] | theirs["eval"]
        assert mine["eval"] != theirs["eval"]


def test_train_and_eval_are_disjoint(corpus):
    _, paths = corpus
    for domain in DOMAINS:
        train, ev = _read(paths[domain]["train"]), _read(paths[domain]["eval"])
        assert not {r["text"] for r in train} & {r["text"] for r in ev}
        assert not {r["source"] for r in train} & {r["source"] for r in ev}


def _docstrings_not_in_code_train(paths: dict) -> None:
    """The code document that holds an eval docstring is never in code train."""
    def spans(split):
        for r in _read(paths["code"][split]):
            rel, a, b = re.fullmatch(r"stdlib:(.+):L(\d+)-L(\d+)", r["source"]).groups()
            yield rel, int(a), int(b)

    train_spans, eval_spans = list(spans("train")), list(spans("eval"))
    checked = 0
    for r in _read(paths["docstrings"]["eval"]):
        rel, line = re.fullmatch(r"stdlib:(.+):L(\d+):[\w.]+", r["source"]).groups()
        assert not any(rel == f and a <= int(line) <= b for f, a, b in train_spans), r["source"]
        checked += any(rel == f and a <= int(line) <= b for f, a, b in eval_spans)
    assert checked, "no eval docstring lies in an eval code document: the check proved nothing"


def test_cap_is_respected_and_binding(corpus):
    out, _ = corpus
    cap = SMALL_MB * MB / 3
    for domain in DOMAINS:
        size = sum(p.stat().st_size for p in (out / domain).iterdir())
        assert size <= cap
        assert size > 0.9 * cap, f"{domain}: {size} bytes, the cap of {cap:.0f} does not bind"


def test_eval_never_empty(tmp_path):
    """With an eval_fraction so small that no hash falls below it, each domain still gets eval text."""
    _, paths = _build(tmp_path, "rare", eval_fraction=1e-9)
    for domain in DOMAINS:
        assert len(_read(paths[domain]["eval"])) >= 1
        assert len(_read(paths[domain]["train"])) > 10


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="too small"):
        _build(tmp_path, "tiny", max_mb=0.001)
    with pytest.raises(InputError, match="eval_fraction"):
        _build(tmp_path, "frac", eval_fraction=1.5)


def test_default_size(tmp_path):
    """The recipe's default 6 MB: every domain full-ish, eval about eval_fraction of each."""
    out, paths = _build(tmp_path, "full", max_mb=6.0)
    stats = json.loads((out / "corpus.json").read_text())["domains"]
    for domain in DOMAINS:
        texts = [r["text"] for split in ("train", "eval") for r in _read(paths[domain][split])]
        if domain == "docstrings":  # the same docstring under two names is still a duplicate
            texts = [t.partition("\n")[2] for t in texts]
        assert len(set(texts)) == len(texts), f"{domain} has duplicate texts"
        s = stats[domain]
        total = s["train"]["bytes"] + s["eval"]["bytes"]
        assert total <= 2 * MB
        assert 0.01 < s["eval"]["docs"] / (s["train"]["docs"] + s["eval"]["docs"]) < 0.12
    assert stats["code"]["train"]["bytes"] + stats["code"]["eval"]["bytes"] > 1.9 * MB
    # Needs the full size: at small caps the code covers too few files to hold any eval docstring.
    _docstrings_not_in_code_train(paths)


# --------------------------------------------------------------------------------------------
# tokenizer

SAMPLES = [
    "The quick brown fox jumps over the lazy dog. Isn't it?  Two  spaces , and a comma .",
    "class Foo(Bar):\n    def f(self, x):\n\tif x:\n        return {'a': [1, 2]}  # comment\n\n\n"
    "    async def g(self) -> None:\r\n        pass\n",
    "naïve café — 日本語のテキスト, emoji 🐍🚀, Ελληνικά, \u00a0nbsp, zero\u200bwidth",
    "   leading spaces and trailing   \n\n",
    "<|endoftext|> between documents <|endoftext|>",
]


def test_tokenizer_loads_with_auto(tokenizer):
    assert type(tokenizer).__name__ == "PreTrainedTokenizerFast"
    assert len(tokenizer) == VOCAB
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == tokenizer.unk_token
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == tokenizer.eos_token_id
    assert tokenizer("hello")["input_ids"] == tokenizer.encode("hello", add_special_tokens=False)
    assert bos_prefix(tokenizer) == []  # packed documents are joined by EOS alone, no BOS
    # no token_type_ids: a causal LM's generate() refuses them, so generate(**tok(...)) must not get any
    assert list(tokenizer("hello", return_tensors="pt")) == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < VOCAB for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_on_eval_splits(tokenizer, corpus):
    _, paths = corpus
    for domain in DOMAINS:
        nbytes = ntokens = 0
        for r in _read(paths[domain]["eval"]):
            ids = tokenizer.encode(r["text"])
            assert tokenizer.decode(ids) == r["text"]
            nbytes += len(r["text"].encode())
            ntokens += len(ids)
        # Merges learned: well under one token per byte (bytes alone would give 1.0).
        assert ntokens / nbytes < 0.5, (domain, ntokens / nbytes)


def test_tokenizer_vocab_at_most_requested(corpus, tmp_path):
    from transformers import AutoTokenizer

    _, paths = corpus
    # A corpus too small for the requested merges gives fewer tokens, never more.
    train_tokenizer([Path(paths["prose"]["eval"])], vocab_size=50000, out_dir=tmp_path / "t")
    n = len(AutoTokenizer.from_pretrained(tmp_path / "t"))
    assert 257 < n < 50000


def _bad(tmp_path: Path, content: bytes) -> tuple[Path, Path]:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "fine text " * 20}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    return good, bad


@pytest.mark.parametrize("content, line, what", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "UTF-8"),
    (b'{"text": "ok"}\n\n{"text": "ok"}\n{"text": "unterminated}\n', 4, "JSON"),
    (b'{"text": "ok"}\n{"body": "no text field"}\n', 2, "'text'"),
    (b'{"text": 3}\n', 1, "'text'"),
    (b'["text"]\n', 1, "'text'"),
])
def test_tokenizer_bad_lines(tmp_path, content, line, what):
    good, bad = _bad(tmp_path, content)
    with pytest.raises(InputError) as e:
        train_tokenizer([good, bad], vocab_size=300, out_dir=tmp_path / "tok")
    msg = str(e.value)
    assert str(bad) in msg and f"line {line}:" in msg and what in msg, msg
    assert not (tmp_path / "tok").exists()


def test_tokenizer_other_text_field(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"body": "some words here " * 30}) + "\n")
    train_tokenizer([f], vocab_size=300, out_dir=tmp_path / "tok", text_field="body")
    with pytest.raises(InputError, match=r"c\.jsonl, line 1: no 'text' field"):
        train_tokenizer([f], vocab_size=300, out_dir=tmp_path / "tok2")


def test_tokenizer_empty_corpus(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n\n')
    with pytest.raises(InputError, match=r"no text.*empty\.jsonl.*blank\.jsonl"):
        train_tokenizer([empty, blank], vocab_size=300, out_dir=tmp_path / "tok")
    with pytest.raises(InputError, match=r"data file not found: .*missing\.jsonl"):
        train_tokenizer([tmp_path / "missing.jsonl"], vocab_size=300, out_dir=tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


# --------------------------------------------------------------------------------------------
# site-packages: a larger corpus from the installed packages


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A site-packages folder with one package (300 modules, a test folder, a README) and its dist-info."""
    import llm_compress.embedded as emb

    site = tmp_path / "site"
    pkg = site / "fakepkg"
    (pkg / "tests").mkdir(parents=True)
    for i in range(300):
        (pkg / f"mod{i}.py").write_text(f'"""Module {i} of the fake package, with a docstring long enough to be kept '
                                        f'as a document of its own."""\n\n\ndef f{i}(x):\n    return x + {i}\n')
    (pkg / "tests" / "test_mod.py").write_text("def test_x():\n    assert True\n")
    para = "The fake package does one thing well, and this paragraph says so at length. " * 8
    for i in range(40):
        (pkg / f"guide{i}.md").write_text(f"# Guide {i}\n\n{para}\n\n{i} {para}\n")
    meta = site / "fakepkg-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n\nLong description. {para}\n")
    monkeypatch.setattr(emb, "_site_roots", lambda: [site])
    return site


def test_site_packages_sources(fake_site):
    import llm_compress.embedded as emb

    files = [label for label, _ in emb._source_files(site_packages=True)]
    site = {f for f in files if f.startswith("site:")}
    assert len(site) == 300 and "site:fakepkg/mod0.py" in site and not any("tests/" in f for f in site)
    # The stdlib part keeps its order, so switching site_packages on does not reshuffle it.
    assert [f for f in files if f.startswith("stdlib:")] == [label for label, _ in emb._source_files()]
    prose = emb._package_prose()
    sources = {d.source.split("#")[0] for d in prose}
    assert "site:fakepkg-1.0.dist-info/METADATA" in sources and "site:fakepkg/guide3.md" in sources
    meta = next(d for d in prose if "METADATA" in d.source)
    assert meta.text.startswith("Long description.") and "Metadata-Version" not in meta.text


def test_site_packages_corpus(fake_site, tmp_path):
    out, paths = _build(tmp_path, "corpus", site_packages=True)
    info = json.loads((out / "corpus.json").read_text())
    assert info["site_packages"] is True and info["distributions"] and all("==" in d for d in info["distributions"])
    rows = {d: _read(paths[d]["train"]) + _read(paths[d]["eval"]) for d in DOMAINS}
    for domain in DOMAINS:  # the cap takes some of each source
        assert any(r["source"].startswith("site:") for r in rows[domain]), domain
        assert any(not r["source"].startswith("site:") for r in rows[domain]), domain
    assert _files(_build(tmp_path, "again", site_packages=True)[0]) == _files(out)
