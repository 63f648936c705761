"""Export stage: every format round-trips through disk and matches its source; a failed format publishes nothing
and takes no other format down.

The model is a tiny random Llama (vocab 320, hidden 64, 2 layers, 4 heads, 2 KV heads) with a
byte-level BPE tokenizer trained here, so the whole file runs in seconds on a CPU, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_compress.card import CARD_FILE, front_matter, render, teacher_license
from llm_compress.errors import ExportError, InputError
from llm_compress.export import FORMATS, check_batch, compare_logits, run_export
from llm_compress.export_support import ExportCheck, ExportConfig
from llm_compress.io import path_size
from llm_compress.modeling import load_causal_lm, load_tokenizer

SEED = 0


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["cat", "dog", "bird", "fish", "tree", "stone"]
    texts = [f"the {w} number {i} is {i * 7 % 13} and {w}s like {words[i % 6]}" for i in range(60) for w in words]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny random LlamaForCausalLM + tokenizer (safetensors, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ids(model_dir) -> torch.Tensor:
    """A fixed [2, 16] batch, drawn with another seed than the stage's default one."""
    return check_batch(len(load_tokenizer(str(model_dir))), 2, 16, 1)


@pytest.fixture(scope="module")
def ref_logits(model_dir, ids) -> torch.Tensor:
    """The source model's logits [B, T, V] on ``ids``, computed here, independently of the stage."""
    model = load_causal_lm(str(model_dir))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reload_logits(fmt: str, d: Path, ids: torch.Tensor) -> torch.Tensor:
    """Load an export from disk the way a user would, and run it on ``ids``: logits [B, T, V]."""
    if fmt.startswith("onnx"):
        from optimum.onnxruntime import ORTModelForCausalLM

        model = ORTModelForCausalLM.from_pretrained(str(d))
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    from transformers import AutoModelForCausalLM

    # dtype: without it the bitsandbytes loader keeps the unquantized layers (embeddings, norms) in float16
    model = AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", dtype=torch.float32,
                                                 use_safetensors=True).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _check_card(fmt: str, d: Path, m: dict) -> str:
    """The folder's model card: YAML front matter with the fields a hub reads, the format named, its own figures,
    and the two loading lines of its folder type. Returns the card's text."""
    text = (d / CARD_FILE).read_text()
    head = front_matter(text)
    assert head is not None and head["license"] and fmt in head["tags"]
    assert head["library_name"] == ("onnx" if fmt.startswith("onnx") else "transformers")
    assert f"({fmt})" in text and f"`{fmt}`" in text and f"{m['bytes']:,}" in text
    code = text.split("```python\n", 1)[1].split("```", 1)[0].splitlines()
    if fmt.startswith("onnx"):
        assert code == ["from optimum.onnxruntime import ORTModelForCausalLM",
                        f'model = ORTModelForCausalLM.from_pretrained("{fmt}")']
    else:
        assert code[0] == "from transformers import AutoModelForCausalLM, AutoTokenizer"
        assert code[1] == (f'tok, model = AutoTokenizer.from_pretrained("{fmt}"), '
                           f'AutoModelForCausalLM.from_pretrained("{fmt}")')
        assert ("bitsandbytes` must be installed" in text) == fmt.startswith("bnb")
    assert ("load_kv_cache" in text) == (d / "kv_cache.json").is_file()
    return text


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "compressed-tensors"])  # that one: test_packed.py
def test_round_trip(fmt, model_dir, ids, ref_logits, tmp_path):
    res = run_export(ExportConfig(formats=[fmt]), model_dir, tmp_path, check_ids=ids, progress=False)

    d = tmp_path / fmt
    assert res.outputs == {fmt: str(d)}
    assert _names(tmp_path) == [fmt]  # no temporary sibling left behind
    assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    m = res.metrics[fmt]
    json.dumps(m)  # JSON-able
    assert m["passed"] is True
    assert m["bytes"] == path_size(d) - (d / "README.md").stat().st_size and m["check_tokens"] == ids.numel()
    assert m["load_seconds"] >= 0 and m["kl"] >= 0
    assert 0 <= m["mean_abs_diff"] <= m["max_abs_diff"]

    _check_card(fmt, d, m)

    # The stage's figures are those of the model on disk: recompute them from a fresh load here.
    out = _reload_logits(fmt, d, ids)
    assert out.shape == ref_logits.shape
    again = compare_logits(ref_logits, out)
    assert again["max_abs_diff"] == pytest.approx(m["max_abs_diff"], rel=1e-3, abs=1e-6)
    assert again["top1_agreement"] == pytest.approx(m["top1_agreement"])

    full = path_size(model_dir)
    if fmt == "safetensors":  # a float32 re-save is bit-exact
        assert m["max_abs_diff"] == 0.0 and m["kl"] == 0.0 and m["top1_agreement"] == 1.0
        assert m["limit_max_abs_diff"] == 1e-4
    elif fmt == "onnx":
        assert m["max_abs_diff"] < 1e-4 and m["top1_agreement"] == 1.0
        assert "model.onnx" in m["onnx_files"] and all((d / f).is_file() for f in m["onnx_files"])
    elif fmt.startswith("onnx-"):  # really low-bit ONNX: quantized ops in the graph, smaller files
        import onnx

        ops = {n.op_type for n in onnx.load(str(d / "model.onnx")).graph.node}
        assert ("MatMulNBits" in ops) if fmt == "onnx-int4" else ("MatMulInteger" in ops)
        assert m["quantized_ops"] and m["max_abs_diff"] > 1e-4
        assert m["top1_agreement"] >= (0.8 if fmt == "onnx-int8" else 0.5)
    else:  # really quantized: logits move, weights shrink, and the reload holds bitsandbytes layers
        import bitsandbytes as bnb

        assert m["max_abs_diff"] > 1e-4 and m["kl"] > 0
        assert m["bytes"] < 0.75 * full
        cls = bnb.nn.Linear4bit if fmt == "bnb-nf4" else bnb.nn.Linear8bitLt
        cfg = json.loads((d / "config.json").read_text())["quantization_config"]
        assert cfg["load_in_4bit" if fmt == "bnb-nf4" else "load_in_8bit"] is True
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", use_safetensors=True)
        assert isinstance(reloaded.model.layers[0].mlp.up_proj, cls)
        assert m["top1_agreement"] >= (0.9 if fmt == "bnb-int8" else 0.5)


def test_default_batch_is_seeded(model_dir, tmp_path):
    """Without check_ids the batch is cfg.check_batch_size x cfg.check_seq_len, the same for the same seed."""
    cfg = ExportConfig(formats=["bnb-int8"], check_batch_size=3, check_seq_len=8)
    a = run_export(cfg, model_dir, tmp_path / "a", seed=5, progress=False).metrics["bnb-int8"]
    b = run_export(cfg, model_dir, tmp_path / "b", seed=5, progress=False).metrics["bnb-int8"]
    c = run_export(cfg, model_dir, tmp_path / "c", seed=6, progress=False).metrics["bnb-int8"]
    assert a["check_tokens"] == 24
    assert a["max_abs_diff"] == b["max_abs_diff"] and a["kl"] == b["kl"]
    assert c["kl"] != a["kl"]


@pytest.mark.parametrize("check, figure", [(ExportCheck(max_abs_diff=0.0), "max_abs_diff"),
                                           (ExportCheck(min_top1_agreement=1.0), "top1_agreement")])
def test_a_failed_check_publishes_that_format_only(check, figure, model_dir, ids, tmp_path):
    cfg = ExportConfig(formats=["safetensors", "bnb-nf4", "bnb-int8"], checks={"bnb-nf4": check})
    with pytest.raises(ExportError, match=rf"1 of 3 formats failed.*bnb-nf4.*{figure}") as info:
        run_export(cfg, model_dir, tmp_path, check_ids=ids, progress=False)

    # The failed format is absent (no temp dir either); the ones before and after it are whole.
    assert _names(tmp_path) == ["bnb-int8", "safetensors"]
    reloaded = load_causal_lm(str(tmp_path / "safetensors"))
    assert reloaded.config.num_hidden_layers == 2
    m = info.value.metrics
    assert m["safetensors"]["passed"] is True and m["bnb-int8"]["passed"] is True
    assert m["bnb-nf4"]["passed"] is False and figure in m["bnb-nf4"]["error"] and m["failed"] == ["bnb-nf4"]
    assert info.value.partial.outputs == {f: str(tmp_path / f) for f in ("safetensors", "bnb-int8")}
    if figure == "top1_agreement":
        assert m["bnb-nf4"]["top1_agreement"] < 1.0


def _break_builder(monkeypatch, fmt: str) -> None:
    """Make ``fmt``'s builder fail after writing a file, as an exporter crashing half-way would."""
    import llm_compress.export as export

    def broken(src_model, model_dir, dst, device, dtype):
        (dst / "half-written.onnx").write_bytes(b"\0")
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setitem(export.BUILDERS, fmt, broken)


def test_a_failing_format_does_not_take_the_others_down(model_dir, ids, ref_logits, tmp_path, monkeypatch):
    _break_builder(monkeypatch, "onnx")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "older.txt").write_text("an earlier export")  # a failed format leaves it as it was
    cfg = ExportConfig(formats=["onnx", "safetensors", "bnb-int8"])
    with pytest.raises(ExportError, match="1 of 3 formats failed, not published: export onnx: could not build it "
                                          "or load it back: RuntimeError: simulated exporter crash") as info:
        run_export(cfg, model_dir, tmp_path, check_ids=ids, progress=False)

    assert _names(tmp_path) == ["bnb-int8", "onnx", "safetensors"]
    assert _names(tmp_path / "onnx") == ["older.txt"]
    m = info.value.metrics
    assert m["failed"] == ["onnx"] and m["onnx"] == {"passed": False, "error": m["onnx"]["error"]}
    assert "simulated exporter crash" in m["onnx"]["error"]
    for fmt in ("safetensors", "bnb-int8"):  # built after the failure, checked, published, and they reload
        assert m[fmt]["passed"] is True
        again = compare_logits(ref_logits, _reload_logits(fmt, tmp_path / fmt, ids))
        assert again["top1_agreement"] == pytest.approx(m[fmt]["top1_agreement"])
    json.dumps(m)


def test_the_stage_publishes_what_passed_as_a_failed_stage_that_no_cache_serves(model_dir, ids, tmp_path,
                                                                               monkeypatch):
    from llm_compress.report import build, markdown
    from llm_compress.runner import execute, failed_manifest, lookup
    from llm_compress.stage import Call

    _break_builder(monkeypatch, "onnx-int8")
    call = Call(stage="export", config={}, inputs={}, key="k" * 64)
    run_dir, root = tmp_path / "run", tmp_path / "artifacts"
    runs = []

    def fn(out: Path):
        runs.append(out)
        return run_export(ExportConfig(formats=["safetensors", "onnx-int8"]), model_dir, out, check_ids=ids,
                          progress=False)

    for attempt in (1, 2):  # the second attempt runs again: a failed stage is never served from a cache
        with pytest.raises(ExportError, match="export onnx-int8: could not build it") as info:
            execute(call, run_dir=run_dir, artifacts_root=root, seed=0, fn=fn)
        assert len(runs) == attempt and lookup(root, call.key) is None
        assert not (root / ".cache" / f"{call.key}.json").exists()
    stage = run_dir / "export"
    assert _names(run_dir) == ["export"] and _names(stage) == ["manifest.json", "safetensors"]
    man = failed_manifest(run_dir, call)
    assert man == info.value.manifest == json.loads((stage / "manifest.json").read_text())
    assert man["status"] == "failed" and "onnx-int8" in man["error"] and list(man["outputs"]) == ["safetensors"]
    assert man["metrics"]["failed"] == ["onnx-int8"] and man["metrics"]["safetensors"]["passed"] is True
    assert load_causal_lm(man["outputs"]["safetensors"]["path"]).config.num_hidden_layers == 2

    rep = build("r", "t", {}, [], "failed", str(info.value), False, man)
    assert [(e["format"], e["passed"]) for e in rep["exports"]] == [("safetensors", True), ("onnx-int8", False)]
    md = markdown(rep)
    assert "| False: export onnx-int8: could not build it" in md and "not published |" in md


def test_missing_model_dir(tmp_path):
    with pytest.raises(InputError, match="not found"):
        run_export(ExportConfig(formats=["safetensors"]), tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        run_export(ExportConfig(formats=["safetensors"]), tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "safetensors").exists()


def test_bad_check_ids(model_dir, tmp_path):
    with pytest.raises(InputError, match="vocabulary"):
        run_export(ExportConfig(formats=["safetensors"]), model_dir, tmp_path,
                   check_ids=torch.tensor([[0, 1, 10_000]]), progress=False)
    with pytest.raises(InputError, match="2-D"):
        run_export(ExportConfig(formats=["safetensors"]), model_dir, tmp_path,
                   check_ids=torch.tensor([0, 1, 2]), progress=False)
    assert _names(tmp_path) == []


def test_generate_idiom_on_embedded_tokenizer_export(tmp_path):
    """The export folder alone serves ``model.generate(**tok(prompt, return_tensors="pt"))`` with stock transformers
    classes: the embedded tokenizer is in it and returns no token_type_ids (which generate() refuses)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm_compress.embedded import train_tokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the cat {i} sat on the mat {i * 3}"}) + "\n" for i in range(40)))
    src = tmp_path / "src"
    tok = train_tokenizer([corpus], vocab_size=300, out_dir=src)
    torch.manual_seed(SEED)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                     ).save_pretrained(src, safe_serialization=True)
    run_export(ExportConfig(formats=["safetensors"]), src, tmp_path / "out", progress=False)

    d = tmp_path / "out" / "safetensors"
    assert json.loads((d / "tokenizer_config.json").read_text())["model_input_names"] == ["input_ids",
                                                                                          "attention_mask"]
    user_tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    inputs = user_tok("the cat sat", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert isinstance(user_tok.decode(out[0]), str)


NEMO = {"model_type": "mistral", "hidden_size": 5120, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "num_hidden_layers": 40, "vocab_size": 131072}  # Mistral-NeMo: 5120 / 32 = 160, not 128


def test_onnx_is_refused_at_validation_for_a_head_dim_it_cannot_export(tmp_path):
    from llm_compress.config import parse_recipe
    from llm_compress.export_support import onnx_export_problem
    from llm_compress.pipeline import preflight

    assert "head_dim 128, not hidden_size // num_attention_heads (5120 // 32 = 160)" in onnx_export_problem(NEMO)
    assert onnx_export_problem({**NEMO, "head_dim": 160}) is None  # transformers writes the default one out
    assert onnx_export_problem({k: v for k, v in NEMO.items() if k != "head_dim"}) is None
    assert onnx_export_problem(None) is None

    student = tmp_path / "nemo"
    student.mkdir()
    (student / "config.json").write_text(json.dumps(NEMO))
    recipe = {"models": {"student": str(student)}, "distill": {"enabled": False}, "quantize": {"enabled": False},
              "export": {"formats": ["safetensors", "onnx", "onnx-int4"]}}
    with pytest.raises(InputError, match=r"export.formats \['onnx', 'onnx-int4'\]: the model to export cannot be "
                                         r"exported to ONNX correctly: its config sets head_dim 128.*Mistral-NeMo.*"
                                         r"drop the onnx formats \(export.formats: \[safetensors\]\)"):
        preflight(parse_recipe(recipe))
    preflight(parse_recipe({**recipe, "export": {"formats": ["safetensors", "bnb-nf4"]}}))
    derived = {"models": {"teacher": str(student)}, "quantize": {"enabled": False}, "distill": {"student": {
        "layers": [0, 1], "init": "random", "config": {"head_dim": 160}}}}  # a student that overrides head_dim
    preflight(parse_recipe(derived))
    with pytest.raises(InputError, match="head_dim 128"):
        preflight(parse_recipe({**derived, "distill": {"student": {"layers": [0, 1]}}}))


def test_onnx_of_a_head_dim_it_cannot_export_fails_that_format_only_at_run_time(tmp_path):
    """A model validation could not read (a hub id not yet downloaded) is caught before the ONNX export starts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    d = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    with pytest.raises(ExportError, match=r"export onnx: .* cannot be exported to ONNX correctly: its config sets "
                                          r"head_dim 32, not hidden_size // num_attention_heads \(64 // 4 = 16\)"):
        run_export(ExportConfig(formats=["onnx", "safetensors"]), d, tmp_path / "out", progress=False)
    assert _names(tmp_path / "out") == ["safetensors"]


def test_onnx_without_onnx_runtime_is_refused_at_validation(monkeypatch):
    """ONNX Runtime comes from the cpu or gpu extra (onnxruntime or onnxruntime-gpu, never both): without either the
    ONNX formats are refused before any work."""
    import llm_compress.export_support as support
    from llm_compress.config import parse_recipe
    from llm_compress.pipeline import preflight

    recipe = parse_recipe({"export": {"formats": ["safetensors", "onnx-int4"]}})
    preflight(recipe)
    monkeypatch.setattr(support, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"export.formats \[.onnx-int4.\]: ONNX Runtime is not installed: install "
                                         r"the project with its cpu extra .*drop the onnx formats"):
        preflight(recipe)
    preflight(parse_recipe({"export": {"formats": ["safetensors", "bnb-int8"]}}))


# --------------------------------------------------------------------------------------------
# the model card


def test_teacher_license_is_read_from_its_readme_front_matter_and_never_guessed(tmp_path):
    t = tmp_path / "teacher"
    t.mkdir()
    (t / "config.json").write_text("{}")
    lic, where = teacher_license(str(t))
    assert lic == "unknown" and where.startswith("not known")
    (t / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# A teacher\n")
    assert teacher_license(str(t))[0] == "apache-2.0"
    (t / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert teacher_license(str(t))[0] == "unknown"
    (t / "config.json").write_text('{"license": "llama3.2"}')
    assert teacher_license(str(t))[0] == "llama3.2"


FIGURES = {"ppl": 20.0, "ppl_ratio": 1.25, "kl_to_teacher": 0.12, "top1_agreement": 0.8, "params": 1000,
           "bytes_on_disk": 4000, "size_ratio": 0.5, "latency_ms_per_token": 3.25}
EXPORTED = {"bytes": 4100, "check_tokens": 64, "max_abs_diff": 0.0, "kl": 0.0, "top1_agreement": 1.0}


def _card(fmt: str, runtime: str, needs: dict, files=("config.json",)) -> str:
    facts = {"source": "quantize", "teacher": "org/teacher", "license": "mit", "license_source": "its README",
             "made": {"quantize": {"method": "ostquant", "setting": "W4A4KV4"}}, "runtime_needs": needs,
             "evaluation": {"teacher": {**FIGURES, "runtime": "standard"}, "quantize": {**FIGURES, "runtime": runtime}},
             "lineage": {"quantize": "abc123"}, "evaluate_device": "cpu"}
    return render(fmt, EXPORTED, facts, list(files))


def test_card_reports_latency_only_for_a_model_without_run_time_parts():
    fake = _card("safetensors", "online Hadamard (128), A4 KV4 (fake-quantized at run time)",
                 {"online_hadamard": {"size": 128, "seed": 0}, "simulated": "A4 KV4 (fake-quantized at run time)"})
    assert "3.25 ms" not in fake and "not the speed of a quantized model" in fake
    code = fake.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'load_causal_lm("safetensors")' in code and "from_pretrained" not in code  # only our loader re-creates it
    std = _card("safetensors", "standard", {})
    assert "3.25 ms per generated token" in std and "not the speed" not in std
    assert "W4A4KV4 values stored as floats" in std  # the float checkpoint's speed, not a low-bit kernel's
    nf4 = _card("bnb-nf4", "standard", {}, files=("config.json", "kv_cache.json"))
    assert "this `bnb-nf4` folder was not timed" in nf4  # the timing is the source's, never the format's
    assert "from llm_compress.kv import load_kv_cache" in nf4
    head = front_matter(std)
    assert head == {"license": "mit", "library_name": "transformers", "base_model": "org/teacher",
                    "tags": ["compressed", "safetensors", "quantize"]}
    assert "1.25x the teacher's" in std and "cache key: `abc123`" in std
