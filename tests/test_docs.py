"""The README, CONTRIBUTING.md and docs/ stay true to the code.

What the pages name is checked against what exists: file paths (inline code and Markdown links) against the
repository, ``compress <subcommand> --flag`` against the CLI's argparse parser, dotted recipe keys (``kv.cache.method``)
against the recipe schema, ``llm_compress.*`` names against the package, and the recipe reference page against its
generator. Every recipe under configs/
validates. The last tests feed the checkers a page with one bad name of each kind, so they are known to fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A word in inline code is checked as a repository path when it has a '/' and either starts with one of the
# repository's folders or ends with a source-file extension (so `llm_compress/dsir/selection.py` is checked, while a
# hub id such as `Qwen/Qwen2.5-0.5B` is not). Run outputs are written `<run>/quantize/...` or `artifacts/...`.
SOURCE_EXT = (".py", ".md", ".yaml", ".yml", ".toml", ".png", ".json", ".sh", ".txt", ".cfg")
NOT_PATHS = ("artifacts/",)  # run outputs: never in git
PLACEHOLDER = re.compile(r"[<>*{}$]|\.\.\.")
FILE_EXT = {"py", "md", "json", "jsonl", "yaml", "yml", "png", "txt", "safetensors", "npy", "log", "toml", "lock"}


def _page(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _spans(text: str) -> list[str]:
    return CODE_SPAN.findall(_prose(text))


def _words(span: str) -> list[str]:
    return [w.strip("'\"()[],;") for w in span.split()]


def _repo_dirs() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".git", ".venv", "__"))
            and p.name != "artifacts" and not p.name.endswith(".egg-info")}


def missing_paths(text: str, base: Path) -> list[str]:
    """Repository paths a page names (inline code, relative to the repository; links, relative to the page) that
    do not exist."""
    dirs, missing = _repo_dirs(), []
    for span in _spans(text):
        for word in _words(span):
            word = word.split(":", 1)[0] if "://" not in word else ""  # entrypoints: file.py:flow
            if "/" not in word or word.startswith(("/", "~")) or PLACEHOLDER.search(word) or \
                    word.startswith(NOT_PATHS):
                continue
            if word.split("/")[0] in dirs or word.rstrip("/").endswith(SOURCE_EXT):
                if not (ROOT / word).exists():
                    missing.append(word)
    for target in LINK.findall(_prose(text)):
        target = target.split("#", 1)[0]
        if not target or "://" in target or target.startswith("mailto:") or PLACEHOLDER.search(target):
            continue
        if not (base / target).exists():
            missing.append(target)
    return missing


def _commands(text: str) -> list[list[str]]:
    """Every ``compress ...`` command a page shows (inline code, code blocks), as words up to the end of the
    command (a comment, ``&&``, ``;``, ``|``)."""
    chunks = list(_spans(text))
    for block in FENCE.finditer(text):
        chunks += block.group(0).replace("\\\n", " ").splitlines()
    out = []
    for chunk in chunks:
        words = chunk.split()
        for i, w in enumerate(words):
            if w == "compress" and i + 1 < len(words):
                cmd = []
                for x in words[i + 1:]:
                    if x.startswith("#") or x in ("&&", "||", ";", "|"):
                        break
                    cmd.append(x)
                out.append(cmd)
    return out


def bad_cli(text: str) -> list[str]:
    """``compress`` subcommands and flags a page names that the CLI's parser does not have."""
    from llm_compress.flows.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    bad = []
    for cmd in _commands(text):
        name = cmd[0]
        if name not in sub.choices:
            bad.append(f"compress {name}")
            continue
        flags = {s for a in sub.choices[name]._actions for s in a.option_strings}
        for w in cmd[1:]:
            flag = w.strip("[]").split("=", 1)[0]
            if flag.startswith("-") and flag not in flags:
                bad.append(f"compress {name} {flag}")
    return bad


def bad_keys(text: str) -> list[str]:
    """Dotted recipe keys (first part a recipe section) a page names in inline code that the schema lacks."""
    from llm_compress.config import Recipe
    from llm_compress.reference import resolves

    sections, bad = set(Recipe.model_fields), []
    for span in _spans(text):
        for word in _words(span):
            key = word.lstrip("-").split("=", 1)[0].replace("[]", "").rstrip(".:")
            if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+", key) or PLACEHOLDER.search(key):
                continue
            if key.split(".")[0] in sections and key.rsplit(".", 1)[1] not in FILE_EXT and not resolves(key):
                bad.append(key)
    return bad


def bad_python_names(text: str) -> list[str]:
    """``llm_compress.x.y`` names (modules, classes, functions) a page gives in inline code that do not import."""
    import importlib

    bad = []
    for span in _spans(text):
        for word in _words(span):
            name = word.split("(", 1)[0].rstrip(".:")
            if not re.fullmatch(r"llm_compress(\.\w+)+", name):
                continue
            parts, obj = name.split("."), None
            for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for attr in parts[i:]:
                    obj = getattr(obj, attr, None)
                break
            if obj is None:
                bad.append(name)
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_exist(page):
    assert missing_paths(_page(page), page.parent) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cli_flags_exist(page):
    assert bad_cli(_page(page)) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_keys_exist(page):
    assert bad_keys(_page(page)) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_names_exist(page):
    assert bad_python_names(_page(page)) == []


def test_recipe_reference_is_current():
    from llm_compress.reference import COMMAND, reference

    page = ROOT / "docs" / "recipe-reference.md"
    assert page.is_file() and _page(page) == reference(), f"docs/recipe-reference.md is stale: run `{COMMAND}`"


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_validate(recipe):
    from llm_compress.config import load_recipe

    load_recipe(recipe)  # the schema only: own-model.yaml names files a user provides


def test_readme_is_short():
    assert len(_page(ROOT / "README.md").splitlines()) <= 260, "keep the README short; details go to docs/"


def test_checkers_catch_bad_names(tmp_path):
    page = ("Run `compress run configs/demo.yaml --run-name x`, see `llm_compress/pipeline/quantize.py`,\n"
            "[the reference](docs/recipe-reference.md) and `kv.cache.residual`, `gates.stage_ppl_ratio.quantize`.\n"
            "```bash\ncompress select --raw a --target b --out c -k 5   # DSIR\n```\n")
    assert missing_paths(page, ROOT) == [] and bad_cli(page) == [] and bad_keys(page) == []
    assert bad_python_names("`llm_compress.kv.load_kv_cache(folder, model)`, `llm_compress.pipeline`") == []
    assert bad_python_names("`llm_compress.kv.load_cache`, `llm_compress.nope.thing`") == [
        "llm_compress.kv.load_cache", "llm_compress.nope.thing"]
    bad = ("`llm_compress/dsir/selection.py`, `configs/nope.yaml`, [x](docs/nope.md), `compress run r.yaml --nope`,\n"
           "`compress frobnicate`, `kv.cache.nope`, `--set distill.stepz=3`, `runtime.distributed.procs`\n"
           "```\ncompress show RUN --jsonl\n```\n")
    assert missing_paths(bad, ROOT) == ["llm_compress/dsir/selection.py", "configs/nope.yaml", "docs/nope.md"]
    assert bad_cli(bad) == ["compress run --nope", "compress frobnicate", "compress show --jsonl"]
    assert bad_keys(bad) == ["kv.cache.nope", "distill.stepz", "runtime.distributed.procs"]
