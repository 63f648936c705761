"""The unlearn stage in the pipeline: order, inputs, bad input refused before work, the tiny recipe end to end with
quantization and a KV cache after it, the forget gates, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_compress.errors import InputError
from tests.conftest import one_torch_thread


def _recipe(tiny_recipe, **unlearn):
    from llm_compress.config import parse_recipe

    data = tiny_recipe.model_dump(mode="json")
    data["unlearn"] = {"enabled": True, **unlearn}
    return parse_recipe(data)


def test_unlearn_runs_after_distill_and_before_quantize_and_kv(tiny_recipe):
    from llm_compress.pipeline import enabled

    data = tiny_recipe.model_dump(mode="json")
    data["kv"] = {"enabled": True}
    data["unlearn"] = {"enabled": True}
    from llm_compress.config import parse_recipe

    order = enabled(parse_recipe(data))
    assert order == ["bootstrap", "data", "distill", "unlearn", "quantize", "kv", "evaluate", "export"]


def _write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


@pytest.mark.parametrize("lines, match", [
    ([], "holds no records"),
    ([{"title": "no text here"}], r"line 1: no 'text' field"),
    ([{"text": "Ada was born in 1815.", "answer": "1816"}], "answer span is outside its text"),
    ([{"question": "When?"}], "needs string fields 'question' and 'answer'"),
    (["{not json"], "line 1: not valid JSON"),
])
def test_bad_forget_file_is_refused_before_any_work(tmp_path, tiny_recipe, lines, match):
    from llm_compress.pipeline import preflight

    recipe = _recipe(tiny_recipe, forget=_write(tmp_path / "forget.jsonl", lines), keep=None, holdout=None)
    with pytest.raises(InputError, match=match):
        preflight(recipe)


def test_missing_forget_file_and_bad_layers_regex_are_refused(tmp_path, tiny_recipe):
    from llm_compress.pipeline import preflight

    with pytest.raises(InputError, match="unlearn.forget: file not found"):
        preflight(_recipe(tiny_recipe, forget=str(tmp_path / "nope.jsonl")))
    ok = _write(tmp_path / "f.jsonl", [{"text": "Ada was born in 1815."}])
    with pytest.raises(InputError, match="unlearn.method.layers: not a regular expression"):
        preflight(_recipe(tiny_recipe, forget=ok, method={"method": "kfade", "layers": "(("}))


def test_a_record_longer_than_the_context_is_refused(tmp_path):

    from llm_compress.unlearn.data import read_records, tokenize

    class Tok:  # one token per character, offsets like a fast tokenizer's
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, text, return_offsets_mapping=True):
            return {"input_ids": [ord(c) % 50 + 1 for c in text],
                    "offset_mapping": [(i, i + 1) for i in range(len(text))]}

        def decode(self, ids):
            return "x" * len(ids)

    records = read_records(_write(tmp_path / "f.jsonl", [{"text": "a" * 40, "answer": "a" * 10}]))
    with pytest.raises(InputError, match="record 1 is 40 tokens, longer than the model's context \\(32\\)"):
        tokenize(records, Tok(), prefix_tokens=4, max_len=32)
    fs = tokenize(records, Tok(), prefix_tokens=4, max_len=64)
    assert fs.span[0].sum() == 10 and fs.prompt_len[0] == 30  # the answer's last occurrence is the span


@pytest.fixture(scope="module")
def unlearn_run(tiny_recipe, tiny_world):
    """The tiny recipe with NPO, then W4 RTN and a 4-bit KIVI cache, run without an orchestrator. (The tiny teacher
    memorises nothing in 30 steps; SHRED, which only demotes tokens the model predicts, then has next to nothing to
    remove: the bench shows it on a teacher that has memorised its facts.)"""
    from llm_compress.config import parse_recipe
    from llm_compress.pipeline import run_local

    data = tiny_recipe.model_dump(mode="json")
    data["unlearn"] = {"enabled": True, "method": {"method": "npo", "steps": 5, "lr": 1e-3, "batch_size": 4}}
    data["kv"] = {"enabled": True, "cache": {"method": "kivi", "bits": [4, 4], "group_size": 8, "residual": 8}}
    data["gates"] = {"max_forget_regain": 0.5}
    data["export"] = {"formats": ["safetensors"]}
    recipe = parse_recipe(data)
    root, _ = tiny_world  # its bootstrap and data stages are the session's, reused
    with one_torch_thread():
        done = run_local(recipe, root / "tiny-unlearn", root)
    return recipe, done


def test_tiny_unlearning_forgets_and_keeps_utility(unlearn_run):
    _, done = unlearn_run
    m = done["unlearn"]["metrics"]
    before, after = m["before"], m["after"]
    assert m["records"] == 4  # embedded.facts 8: the first half is the forget set
    # the forget set's answers got measurably less likely; held-out perplexity stayed within 5 %
    assert after["forget"]["answer_prob"] < 0.8 * before["forget"]["answer_prob"]
    assert after["utility"]["ppl"] < 1.05 * before["utility"]["ppl"]
    assert after["utility"]["kl_to_original"] < 0.1


def test_evaluate_remeasures_the_forget_set_on_the_quantized_model_with_its_kv_cache(unlearn_run):
    from llm_compress.report import build, markdown

    _, done = unlearn_run
    models = done["evaluate"]["metrics"]["models"]
    assert list(models) == ["teacher", "distill", "unlearn", "quantize"]
    final = models["quantize"]["unlearn"]
    assert final["kv_cache"] == "kivi" and set(final) >= {"forget", "keep"}
    assert 0 <= final["forget"]["rouge_l"] <= 1 and final["forget"]["mink_auc"] is not None
    quantize_in = json.loads((Path(done["quantize"]["stage_dir"]) / "manifest.json").read_text())
    assert quantize_in["inputs"]["model"]["ref"] == done["unlearn"]["outputs"]["model"]["path"]  # took the unlearned
    md = markdown(build("tiny-unlearn", "tiny", done, [], "completed", None, True))
    assert "## Unlearning" in md and "| quantize (evaluate) | forget |" in md and "| unlearned (unlearn stage) |" in md


def test_forget_gates_fail_when_compression_brings_text_back():
    from llm_compress.pipeline.evaluate import GatesConfig
    from llm_compress.pipeline.evaluate import check_gates

    models = {"teacher": {"ppl": 10.0, "ppl_ratio": 1.0},
              "quantize": {"ppl": 10.0, "ppl_ratio": 1.0, "unlearn": {"forget": {"rouge_l": 0.45}}}}
    unlearned = {"forget": {"rouge_l": 0.2}}
    misses = check_gates(GatesConfig(max_forget_regain=0.1, max_forget_rouge=0.3), models, "quantize", [], unlearned)
    assert len(misses) == 2
    assert "max_forget_regain" in misses[1] and "0.2000 right after unlearning, 0.4500" in misses[1]
    assert check_gates(GatesConfig(max_forget_regain=0.3, max_forget_rouge=0.5), models, "quantize", [],
                       unlearned) == []
