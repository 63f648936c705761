"""Cache keys cover what a stage really reads, and nothing else: libraries, hub commits, device, code, data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import llm_compress.io as sio
from llm_compress.config import parse_recipe
from llm_compress.errors import InputError
from llm_compress.pipeline import make_call, preflight
from llm_compress.stage import Env

CPU = Env(device="cpu")
DOWNSTREAM = ("data", "distill", "quantize", "evaluate", "export")


def _fake_done(tmp: Path) -> dict[str, dict]:
    """Manifests of finished upstream stages (paths need not exist: their digests are in the manifests)."""
    def outs(stage, **names):
        return {"outputs": {n: {"path": str(tmp / stage / p), "sha256": f"{stage}-{n}"} for n, p in names.items()}}

    return {"bootstrap": outs("bootstrap", teacher="teacher", tokenizer="tokenizer", corpus="corpus"),
            "data": outs("data", train="train.safetensors", eval="eval.safetensors"),
            "distill": outs("distill", model="model"), "quantize": outs("quantize", model="model")}


def _keys(recipe, done, env=CPU, stages=DOWNSTREAM) -> dict[str, str]:
    return {s: make_call(recipe, s, {k: v for k, v in done.items() if k != s}, env).key for s in stages}


def test_a_library_version_invalidates_only_the_stages_that_run_on_it(tmp_path, monkeypatch):
    recipe, done = parse_recipe({}), _fake_done(tmp_path)
    before = _keys(recipe, done)
    real = sio.package_versions

    def bumped(name):
        def versions(names=sio._PACKAGES):
            return {n: ("9.9.9" if n == name else v) for n, v in real(names).items()}
        return versions

    monkeypatch.setattr(sio, "package_versions", bumped("onnxruntime"))
    after = _keys(recipe, done)
    assert [s for s in DOWNSTREAM if after[s] != before[s]] == ["export"]
    monkeypatch.setattr(sio, "package_versions", bumped("torch"))
    after = _keys(recipe, done)
    assert [s for s in DOWNSTREAM if after[s] != before[s]] == list(DOWNSTREAM)


def test_the_resolved_device_is_in_the_keys_of_the_stages_that_compute_on_it(tmp_path):
    recipe, done = parse_recipe({}), _fake_done(tmp_path)
    cpu, cuda = _keys(recipe, done, CPU), _keys(recipe, done, Env(device="cuda"))
    assert [s for s in DOWNSTREAM if cpu[s] != cuda[s]] == ["distill", "quantize", "evaluate", "export"]
    # 'auto' never reaches a key: it is resolved first
    call = make_call(parse_recipe({"runtime": {"device": "auto"}}), "distill", done)
    assert call.device == "cpu" and call.config["runtime"]["device"] == "cpu"


def _hub_cache(root: Path, repo: str, sha: str, repo_type: str = "model") -> None:
    folder = root / f"{repo_type}s--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(sha)


def test_a_hub_model_is_keyed_by_the_commit_it_resolves_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    recipe = parse_recipe({"models": {"teacher": "acme/teacher-1b"}, "data": {"source": "files", "train": ["t"],
                                                                            "eval": ["e"]}})
    done = _fake_done(tmp_path)
    with pytest.raises(InputError, match="cannot resolve it to a commit"):
        make_call(recipe, "distill", done, CPU)
    _hub_cache(tmp_path / "hub", "acme/teacher-1b", "a" * 40)
    first = make_call(recipe, "distill", done, CPU)
    assert first.input_digests["teacher"] == f"hub:model:acme/teacher-1b@{'a' * 40}"
    assert make_call(recipe, "distill", done, CPU).key == first.key
    _hub_cache(tmp_path / "hub", "acme/teacher-1b", "b" * 40)  # a new commit on main
    assert make_call(recipe, "distill", done, CPU).key != first.key
    # a pinned commit is used as is, whatever main says
    pinned = parse_recipe({**recipe.model_dump(mode="json"), "models": {"teacher": "acme/teacher-1b",
                                                                         "revision": "c" * 40}})
    assert make_call(pinned, "distill", done, CPU).input_digests["teacher"].endswith("c" * 40)


def test_a_datasets_folder_is_keyed_by_its_content_and_a_hub_dataset_by_its_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "one"}\n')
    done = _fake_done(tmp_path)
    recipe = parse_recipe({"data": {"source": "hf", "hf": {"name": str(folder)}}})
    first = make_call(recipe, "data", done, CPU).key
    (folder / "train.jsonl").write_text('{"text": "two"}\n')
    assert make_call(recipe, "data", done, CPU).key != first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_cache(tmp_path / "hub", "acme/corpus", "d" * 40, "dataset")
    hub = parse_recipe({"data": {"source": "hf", "hf": {"name": "acme/corpus"}}})
    assert make_call(hub, "data", done, CPU).input_digests["dataset"] == f"hub:dataset:acme/corpus@{'d' * 40}"


def test_a_stage_code_version_covers_the_code_it_runs_and_no_other(tmp_path, monkeypatch):
    copy = tmp_path / "stages"
    shutil.copytree(sio._ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sio, "_ROOT", copy)
    monkeypatch.setattr(sio, "_STAGE_CODE", {})
    names = ["llm_compress.pipeline.distill", "llm_compress.pipeline.quantize", "llm_compress.pipeline.export"]

    def versions():
        sio._STAGE_CODE.clear()
        return {n: sio.stage_code_version(n) for n in names}

    base = versions()
    with open(copy / "export.py", "a") as f:  # a file only the export stage runs
        f.write("\n# edited\n")
    after = versions()
    assert [n for n in names if after[n] != base[n]] == ["llm_compress.pipeline.export"]
    with open(copy / "quantize" / "gptq.py", "a") as f:  # only the quantize stage runs GPTQ
        f.write("\n# edited\n")
    assert [n for n in names if versions()[n] != after[n]] == ["llm_compress.pipeline.quantize"]
    with open(copy / "modeling.py", "a") as f:  # every model stage loads models through it
        f.write("\n# edited\n")
    assert all(a != b for a, b in zip(versions().values(), after.values()))
    with open(copy / "config.py", "a") as f:  # the schema: its resolved values are in the key, not its source
        f.write("\n# edited\n")
    v = versions()
    sio._STAGE_CODE.clear()
    assert v == versions()


def _checkpoint(tmp: Path, model_type: str, vocab: int = 2048, layers: int = 4) -> str:
    d = tmp / model_type
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": vocab,
                                               "num_hidden_layers": layers}))
    return str(d)


def test_checks_before_work_name_the_cause(tmp_path):
    gpt2 = _checkpoint(tmp_path, "gpt2")
    ost = {"models": {"teacher": gpt2}, "data": {"source": "files", "train": [gpt2 + "/config.json"],
                                                   "eval": [gpt2 + "/config.json"]},
           "quantize": {"scheme": {"method": "ostquant"}}, "export": {"formats": ["safetensors"]}}
    with pytest.raises(InputError, match="OSTQuant supports model types llama, mistral, qwen2; the model to "
                                         "quantize is a 'gpt2'"):
        preflight(parse_recipe(ost))
    a4 = {**ost, "quantize": {"scheme": {"method": "rtn", "setting": "W4A4"}}}
    with pytest.raises(InputError, match="W4A4KV16's activation/KV quantization supports model types"):
        preflight(parse_recipe(a4))
    preflight(parse_recipe({**ost, "quantize": {"scheme": {"method": "gptq"}}}))  # W4A16 GPTQ suits any layout
    layers = {**ost, "quantize": {"enabled": False}, "distill": {"student": {"layers": [0, 4]}}}
    with pytest.raises(InputError, match=r"distill.student.layers: \[0, 4\] must be indices in \[0, 4\)"):
        preflight(parse_recipe(layers))
    hf = {**ost, "quantize": {"enabled": False}, "data": {"source": "hf", "hf": {"name": "wikitext"}}}
    preflight(parse_recipe(hf))  # a hub dataset without an org is a name, not a missing folder
    with pytest.raises(InputError, match="data.hf.name: dataset folder not found: ./no-such-dataset"):
        preflight(parse_recipe({**hf, "data": {"source": "hf", "hf": {"name": "./no-such-dataset"}}}))
    student = _checkpoint(tmp_path, "llama", vocab=4096)
    vocab = {**ost, "quantize": {"enabled": False}, "models": {"teacher": gpt2, "student": student}}
    with pytest.raises(InputError, match="vocabulary mismatch: models.teacher has vocab_size 2048"):
        preflight(parse_recipe(vocab))


def test_a_given_student_is_checked_even_when_distillation_is_off(tmp_path):
    data = {"models": {"student": str(tmp_path / "no-student")}, "distill": {"enabled": False}}
    for off in ({}, {"quantize": {"enabled": False}}, {"quantize": {"enabled": False}, "export": {"enabled": False}}):
        with pytest.raises(InputError, match="models.student: model directory not found"):
            preflight(parse_recipe({**data, **off}))


def test_validate_runs_the_same_checks_as_run(tmp_path, capsys):
    from llm_compress.flows.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantize:\n  scheme: {method: gptq, calibration: {file: /nonexistent/calib.jsonl}}\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "quantize.scheme.calibration.file: not found: /nonexistent/calib.jsonl" in err


def test_validation_and_the_prefect_form_import_no_torch():
    import subprocess
    import sys

    from tests.conftest import ROOT

    heavy = "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'prefect') if m in sys.modules))"
    validate = f"import sys; from llm_compress.flows.cli import main; main(['validate', 'configs/demo.yaml']); {heavy}"
    out = subprocess.run([sys.executable, "-c", validate], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    form = ("import sys; from prefect.utilities.callables import parameter_schema; "
            "from llm_compress.flows.pipeline import compress; "
            "parameter_schema(compress); " + heavy.replace(", 'prefect'", ""))
    out = subprocess.run([sys.executable, "-c", form], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_raw_pool_is_not_re_read_to_key_the_selection(tmp_path, monkeypatch):
    import os
    import time

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        (pool / f"{i}.jsonl").write_text(f'{{"text": "document {i}"}}\n' * 100)
        os.utime(pool / f"{i}.jsonl", (time.time() - 60, time.time() - 60))  # settled files get memo entries
    target = tmp_path / "target.jsonl"
    target.write_text('{"text": "document"}\n')
    os.utime(target, (time.time() - 60, time.time() - 60))
    recipe = parse_recipe({"select": {"enabled": True, "raw": [str(pool)], "targets": [{"paths": [str(target)]}],
                                      "dsir": {"k": 2}}, "data": {"source": "files", "train": [str(target)],
                                                                  "eval": [str(target)]}})
    reads = []
    real = sio.sha256_file
    monkeypatch.setattr(sio, "sha256_file", lambda p: reads.append(Path(p).name) or real(p))
    memo = tmp_path / "memo"
    first = make_call(recipe, "select", {}, CPU, memo)
    assert sorted(reads) == ["0.jsonl", "1.jsonl", "2.jsonl", "target.jsonl"]
    reads.clear()
    assert make_call(recipe, "select", {}, CPU, memo).key == first.key and reads == []
    (pool / "1.jsonl").write_text('{"text": "changed"}\n')
    os.utime(pool / "1.jsonl", (time.time() - 30, time.time() - 30))
    assert make_call(recipe, "select", {}, CPU, memo).key != first.key and reads == ["1.jsonl"]


def test_the_kv_cache_is_an_input_of_evaluate_and_export_only_when_the_kv_stage_is_on(tmp_path):
    base = _fake_done(tmp_path)
    done = {**base, "kv": {"outputs": {"kv_cache": {"path": str(tmp_path / "kv" / "kv_cache.json"), "sha256": "a"}}}}
    off = _keys(parse_recipe({}), base)
    # kv off: its settings and a kv stage's output are in no key
    assert _keys(parse_recipe({"kv": {"eval_rows": 2, "prefill": 0.25}}), done) == off
    on = parse_recipe({"kv": {"enabled": True}})
    for stage in ("evaluate", "export"):
        assert make_call(on, stage, done, CPU).inputs["kv_cache"] == str(tmp_path / "kv" / "kv_cache.json")
    keys = _keys(on, done)
    assert [s for s in DOWNSTREAM if keys[s] != off[s]] == ["evaluate", "export"]
    # the rows evaluate measures the cache on are in its key; another spec (digest) changes both
    rows = _keys(parse_recipe({"kv": {"enabled": True, "eval_rows": 2}}), done)
    assert [s for s in DOWNSTREAM if rows[s] != keys[s]] == ["evaluate"]
    done["kv"]["outputs"]["kv_cache"]["sha256"] = "b"
    spec = _keys(on, done)
    assert [s for s in DOWNSTREAM if spec[s] != keys[s]] == ["evaluate", "export"]


def _settled(*paths: Path) -> None:
    """Date files a minute back, so their digests get memo entries (a just-written file gets none)."""
    import os
    import time

    for p in paths:
        os.utime(p, (time.time() - 60, time.time() - 60))


def test_a_finished_stage_is_reused_only_while_its_files_are_the_ones_it_recorded(tmp_path, monkeypatch, caplog):
    from llm_compress.result import StageResult
    from llm_compress.runner import execute
    from llm_compress.stage import Call

    root, runs = tmp_path / "art", []
    call = Call(stage="probe", config={}, inputs={}, key="k" * 64)

    def fn(out: Path) -> StageResult:
        runs.append(out)
        (out / "model").mkdir()
        (out / "model" / "weights.bin").write_bytes(bytes(range(256)) * 4)
        (out / "eval.json").write_text('{"ppl": 1.5}\n')
        return StageResult(outputs={"model": "model", "eval": "eval.json"}, metrics={"ppl": 1.5})

    def run(name: str) -> dict:
        return execute(call, run_dir=root / name, artifacts_root=root, seed=0, fn=fn)

    first = run("a")
    weights = Path(first["outputs"]["model"]["path"]) / "weights.bin"
    _settled(weights, Path(first["outputs"]["eval"]["path"]))
    reads = []
    real = sio.sha256_file
    monkeypatch.setattr(sio, "sha256_file", lambda p: reads.append(Path(p).name) or real(p))
    assert run("b")["reused"] and len(runs) == 1 and sorted(reads) == ["eval.json", "weights.bin"]
    reads.clear()
    assert run("b")["reused"] and len(runs) == 1 and reads == []  # unchanged files: their memoised digests
    # one output edited in place, same size: not reused, recomputed (into this run's folder), and logged why
    data = bytearray(weights.read_bytes())
    data[7] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="llm_compress.runner"):
        again = run("c")
    assert not again.get("reused") and len(runs) == 2 and again["stage_dir"] == str(root / "c" / "probe")
    assert "output 'model' on disk is not the one recorded" in caplog.text and str(root / "a") in caplog.text
    assert run("d")["reused"] and len(runs) == 2  # the recomputed record is reused while it is intact
    Path(again["outputs"]["eval"]["path"]).unlink()  # a deleted output: recomputed too
    assert not run("e").get("reused") and len(runs) == 3


def test_the_models_dtype_is_in_the_key_of_every_stage_that_loads_a_model_in_it(tmp_path):
    """The KV and export stages load their input model in models.dtype: a changed dtype must not be served stale."""
    done = _fake_done(tmp_path)
    done["evaluate"] = {"outputs": {"eval": {"path": str(tmp_path / "evaluate" / "eval.json"), "sha256": "e"}}}
    stages = ("data", "distill", "quantize", "kv", "evaluate", "export")
    f32, bf16 = (_keys(parse_recipe({"models": {"dtype": d}}), done, stages=stages) for d in ("float32", "bfloat16"))
    assert [s for s in stages if f32[s] != bf16[s]] == ["distill", "quantize", "kv", "evaluate", "export"]
