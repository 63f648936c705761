"""The whole chain through the Prefect flow: manifests, caching, resume after a kill, gates, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm_compress.errors import InputError
from llm_compress.io import digest_path
from llm_compress.pipeline import get_stage

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow
RAN = ["bootstrap", "data", "distill", "quantize", "evaluate", "export"]


def stage_dir(root: Path, run: str, stage: str) -> Path:
    return root / run / stage


def task_run_states(flow_run: str | None = None, flow_run_id=None) -> tuple[dict[str, str], dict[str, str]]:
    """The stage task runs of one flow run (given by id, or by name: the flow run name is the run_name), as
    ({stage: state name}, {stage: progress artifact note}), read back from the Prefect server."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType,
                                                FlowRunFilter, FlowRunFilterId, FlowRunFilterName)

    with get_client(sync_client=True) as client:
        if flow_run_id is None:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run])))
            assert len(runs) == 1, [r.name for r in runs]
            flow_run_id = runs[0].id
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    stage = {t.id: re.sub(r"^\d+-", "", t.name) for t in tasks}  # task run names: NN-stage or stage
    return ({stage[t.id]: t.state.name for t in tasks},
            {stage[a.task_run_id]: a.description.split(": ", 1)[1] for a in arts if a.task_run_id in stage})


def test_tiny_run_completes_and_publishes(tiny_run):
    root, run, report = tiny_run
    assert report["status"] == "completed" and report["published"] is True
    assert [s["stage"] for s in report["stages"]] == RAN
    assert {e["format"] for e in report["exports"]} == {"safetensors", "bnb-nf4", "bnb-int8", "onnx"}
    assert all(e["passed"] for e in report["exports"])
    assert {r["model"] for r in report["evaluation"]} == {"teacher", "distill", "quantize"}
    on_disk = json.loads((root / run / "report.json").read_text())
    assert on_disk["status"] == "completed"
    md = (root / run / "report.md").read_text()
    assert "## Evaluation" in md and "## Exports" in md and "bnb-nf4" in md
    for s in RAN:
        assert (stage_dir(root, run, s) / "manifest.json").is_file()
    # no temporary or half-written folders left behind
    assert not [p for p in (root / run).iterdir() if p.name.startswith(".")]


def test_each_export_folder_carries_a_model_card(tiny_run):
    """The card of every published format: recipe, lineage through the stage's inputs and upstream keys, evaluate's
    figures of the exported model, latency (a standard W4A16 checkpoint: nothing fake-quantized at run time)."""
    from llm_compress.card import front_matter

    root, run, _ = tiny_run
    exp = json.loads((stage_dir(root, run, "export") / "manifest.json").read_text())
    ev = json.loads((stage_dir(root, run, "evaluate") / "eval.json").read_text())["quantize"]
    assert exp["inputs"]["evaluation"]["ref"].endswith("eval.json") and "teacher" in exp["inputs"]
    for fmt in ("safetensors", "bnb-nf4", "bnb-int8", "onnx"):
        text = (stage_dir(root, run, "export") / fmt / "README.md").read_text()
        head = front_matter(text)
        assert head["license"] == "unknown" and "not known" in text  # the embedded teacher has no license
        assert head["library_name"] == ("onnx" if fmt == "onnx" else "transformers") and "base_model" not in head
        assert "divergence `forward_kl`" in text and "setting `W4A16`" in text
        for s in RAN[:-1]:
            m = json.loads((stage_dir(root, run, s) / "manifest.json").read_text())
            assert f"stage `{s}` cache key: `{m['cache_key']}`" in text
        assert exp["inputs"]["teacher"]["sha256"] in text
        assert f"top-1 agreement with the teacher {ev['top1_agreement']:.4g}" in text
        assert f"{ev['latency_ms_per_token']:.4g} ms per generated token" in text


def test_manifests_record_config_inputs_outputs_and_environment(tiny_run, tiny_recipe):
    root, run, _ = tiny_run
    manifests = {s: json.loads((stage_dir(root, run, s) / "manifest.json").read_text()) for s in RAN}
    for s, m in manifests.items():
        for key in ("stage", "cache_key", "config", "inputs", "outputs", "metrics", "seed", "code_version",
                    "packages", "started_at", "finished_at", "duration_s"):
            assert key in m, (s, key)
        assert m["seed"] == tiny_recipe.runtime.seed
        assert m["packages"]["torch"].startswith("2.") and m["packages"]["prefect"] == "3.8.8"
        for name, out in m["outputs"].items():
            assert out["sha256"] == digest_path(out["path"]), (s, name)
    d = manifests["distill"]
    assert d["config"]["distill"] == tiny_recipe.distill.model_dump(mode="json")
    # lineage: distill's inputs are data's outputs, by path and by digest
    assert d["inputs"]["train"]["ref"] == manifests["data"]["outputs"]["train"]["path"]
    assert d["inputs"]["train"]["sha256"] == manifests["data"]["outputs"]["train"]["sha256"]
    assert manifests["quantize"]["inputs"]["model"]["sha256"] == d["outputs"]["model"]["sha256"]
    assert manifests["export"]["metrics"]["onnx"]["passed"] is True


def test_same_recipe_under_another_name_reuses_every_stage(tiny_run, tiny_recipe):
    from llm_compress.flows.pipeline import compress

    root, first, _ = tiny_run
    state = compress(recipe=tiny_recipe, run_name="tiny-b", artifacts_dir=str(root), return_state=True)
    report = state.result()
    assert [s["state"] for s in report["stages"]] == ["cached"] * len(RAN)
    # the UI: the first run's stage task runs Completed, the second's Reused (the runner's index, no Prefect cache),
    # each with its progress artifact at 100 % saying so
    assert task_run_states("tiny-a") == ({s: "Completed" for s in RAN}, {s: "done" for s in RAN})
    assert task_run_states(flow_run_id=state.state_details.flow_run_id) == ({s: "Reused" for s in RAN},
                                                                            {s: "reused" for s in RAN})
    m = json.loads((stage_dir(root, "tiny-b", "distill") / "manifest.json").read_text())
    assert m["reused"] is True and m["reused_from"] == str(stage_dir(root, first, "distill"))
    assert report["published"] is True


def test_changed_config_reruns_only_downstream_stages(tiny_run, tiny_recipe):
    from llm_compress.flows.pipeline import compress

    root, _, _ = tiny_run
    recipe = tiny_recipe.model_copy(deep=True)
    recipe.quantize.scheme.setting = "W8A16"
    recipe.export.formats = ["safetensors"]
    report = compress(recipe=recipe, run_name="tiny-w8", artifacts_dir=str(root))
    states = {s["stage"]: s["state"] for s in report["stages"]}
    assert states == {"bootstrap": "cached", "data": "cached", "distill": "cached", "quantize": "ran",
                      "evaluate": "ran", "export": "ran"}
    ev = {r["model"]: r for r in report["evaluation"]}
    assert ev["quantize"]["kl_to_teacher"] <= ev["distill"]["kl_to_teacher"] * 1.5


def test_missed_gate_fails_the_run_and_publishes_nothing(tiny_run, tiny_recipe):
    from llm_compress.flows.pipeline import compress
    from llm_compress.errors import GateError

    root, _, _ = tiny_run
    recipe = tiny_recipe.model_copy(deep=True)
    recipe.gates.max_ppl_ratio = 0.5
    recipe.gates.max_kl = 1e-9
    with pytest.raises(GateError) as e:
        compress(recipe=recipe, run_name="tiny-gate", artifacts_dir=str(root))
    msg = str(e.value)
    assert "gates.max_ppl_ratio" in msg and "limit 0.5" in msg and "gates.max_kl" in msg
    rep = json.loads((root / "tiny-gate" / "report.json").read_text())
    assert rep["status"] == "failed_gate" and rep["published"] is False and "max_ppl_ratio" in rep["error"]
    assert not stage_dir(root, "tiny-gate", "export").exists()
    assert "gates.max_ppl_ratio" in (root / "tiny-gate" / "report.md").read_text()


def test_a_failed_export_format_keeps_the_others_and_fails_the_run_uncached(tiny_run, tiny_recipe, monkeypatch):
    import llm_compress.export as export
    from llm_compress.flows.pipeline import compress
    from llm_compress.errors import ExportError

    root, _, _ = tiny_run
    crashes = []

    def broken(src_model, model_dir, dst, device, dtype):
        crashes.append(dst)
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setitem(export.BUILDERS, "onnx-int4", broken)
    recipe = tiny_recipe.model_copy(deep=True)
    recipe.export.formats = ["onnx-int4", "safetensors"]
    for attempt in (1, 2):  # the failed stage is not served from a cache: the second run exports again
        with pytest.raises(ExportError, match="1 of 2 formats failed.*onnx-int4.*simulated exporter crash"):
            compress(recipe=recipe, run_name="tiny-export-fail", artifacts_dir=str(root))
        assert len(crashes) == attempt
    rep = json.loads((root / "tiny-export-fail" / "report.json").read_text())
    assert rep["status"] == "failed" and rep["published"] is False and "onnx-int4" in rep["error"]
    assert rep["stages"][-1]["stage"] == "export" and rep["stages"][-1]["state"] == "failed"
    rows = {e["format"]: e for e in rep["exports"]}
    assert rows["safetensors"]["passed"] is True and rows["onnx-int4"]["passed"] is False
    assert "simulated exporter crash" in rows["onnx-int4"]["error"] and rows["onnx-int4"]["path"] is None
    d = stage_dir(root, "tiny-export-fail", "export")
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "safetensors"]
    assert json.loads((d / "manifest.json").read_text())["status"] == "failed"
    assert Path(rows["safetensors"]["path"]) == d / "safetensors" and (d / "safetensors" / "config.json").is_file()


def _cli(args: list[str], artifacts: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "llm_compress.flows.cli", *args, "--artifacts", str(artifacts)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def test_resume_after_a_killed_run(tmp_path):
    """Kill a run (SIGKILL, whole process group) during export; the rerun reuses every finished stage."""
    art = tmp_path / "art"
    proc = _cli(["run", str(TINY), "--run-name", "killed"], art)
    evaluated = stage_dir(art, "killed", "evaluate") / "manifest.json"
    deadline = time.time() + 400
    while not evaluated.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "run did not reach evaluate"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage_dir(art, "killed", "export") / "manifest.json").exists()

    proc = _cli(["run", str(TINY), "--run-name", "killed"], art)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    report = json.loads((art / "killed" / "report.json").read_text())
    states = {s["stage"]: s["state"] for s in report["stages"]}
    assert states == {**{s: "cached" for s in RAN[:-1]}, "export": "ran"}, out
    assert report["published"] is True
    assert "Finished in state Reused(" in out  # Prefect's log names the reused stages' state
    assert not [p for p in (art / "killed").iterdir() if p.name.startswith(".")]  # stale temp dirs cleaned


def test_cli_runs_show_and_bad_run_names(tiny_run, capsys):
    from llm_compress.flows.cli import main

    root, run, _ = tiny_run
    assert main(["runs", "--artifacts", str(root)]) == 0
    assert run in capsys.readouterr().out
    assert main(["show", run, "--artifacts", str(root)]) == 0
    assert "## Evaluation" in capsys.readouterr().out
    for bad in ("../x", "a/b", ".."):
        assert main(["run", str(TINY), "--run-name", bad, "--artifacts", str(root)]) == 2
        assert "not a safe name" in capsys.readouterr().err
    assert main(["show", "nope", "--artifacts", str(root)]) == 2


def test_missing_model_path_fails_before_any_work(tmp_path, capsys):
    from llm_compress.flows.cli import main

    r = tmp_path / "r.yaml"
    r.write_text(f"models: {{teacher: {tmp_path / 'no-such-model'}, student: derive}}\n"
                 f"data: {{source: files, train: [{tmp_path / 'a.jsonl'}], eval: [{tmp_path / 'a.jsonl'}]}}\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert main(["run", str(r), "--artifacts", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "models.teacher: model directory not found" in err
    assert not (tmp_path / "art").exists()  # nothing started


def _random_llama(path: Path, vocab: int, tokenizer_from: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)


def test_vocabulary_mismatch_is_refused(tiny_run, tmp_path):
    from llm_compress.config import parse_recipe
    from llm_compress.errors import InputError
    from llm_compress.pipeline import preflight

    root, run, _ = tiny_run
    tok = stage_dir(root, run, "bootstrap") / "tokenizer"
    _random_llama(tmp_path / "t", 512, tok)
    _random_llama(tmp_path / "s", 600, tok)
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    recipe = parse_recipe({"models": {"teacher": str(tmp_path / "t"), "student": str(tmp_path / "s")},
                           "data": {"source": "files", "train": [str(tmp_path / "d.jsonl")],
                                    "eval": [str(tmp_path / "d.jsonl")]}})
    with pytest.raises(InputError, match="vocabulary mismatch: models.teacher has vocab_size 512, models.student "
                                         "has 600"):
        preflight(recipe)
    # the stage itself checks too (e.g. a hub student whose config could not be read up front)
    from llm_compress.modeling import check_same_vocab, load_causal_lm

    with pytest.raises(InputError, match="vocabulary mismatch"):
        check_same_vocab(load_causal_lm(str(tmp_path / "t")), load_causal_lm(str(tmp_path / "s")))


def test_bad_data_fails_in_the_data_stage_and_keeps_earlier_outputs(tiny_run, tmp_path):
    from llm_compress.config import parse_recipe
    from llm_compress.errors import InputError
    from llm_compress.pipeline import run_local

    root, run, _ = tiny_run
    teacher = stage_dir(root, run, "bootstrap") / "teacher"
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    for name, match in (("empty.jsonl", "empty corpus"), ("bad.jsonl", r"bad.jsonl, line 2: not UTF-8")):
        recipe = parse_recipe({"models": {"teacher": str(teacher)},
                               "data": {"source": "files", "train": [str(tmp_path / name)],
                                        "eval": [str(tmp_path / name)]},
                               "runtime": {"progress": False}})
        with pytest.raises(InputError, match=match):
            run_local(recipe, tmp_path / "art" / "bad", tmp_path / "art")
        assert not (tmp_path / "art" / "bad" / "data").exists()
    assert (teacher / "model.safetensors").is_file()


def test_an_input_error_in_a_stage_is_one_line_on_the_console_and_a_traceback_in_the_run_log(tiny_run, tmp_path):
    root, run, _ = tiny_run
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"models: {{teacher: {stage_dir(root, run, 'bootstrap') / 'teacher'}}}\n"
                      f"data: {{source: files, train: [{tmp_path / 'bad.jsonl'}], eval: [{tmp_path / 'bad.jsonl'}]}}\n"
                      "runtime: {progress: false}\n")
    out, _ = _cli(["run", str(recipe), "--run-name", "bad-data"], tmp_path / "art").communicate(timeout=300)
    assert "error: " in out and "bad.jsonl, line 2: not UTF-8" in out, out
    assert "Traceback" not in out and len(out.splitlines()) < 20, out
    log = (tmp_path / "art" / "bad-data" / "run.log").read_text()
    assert "Traceback" in log and "llm_compress/data.py" in log
    assert f"full log: {tmp_path / 'art' / 'bad-data' / 'run.log'}" in out


def test_kv_stage_writes_its_cache_and_measures_it_against_the_full_cache(tiny_run, tiny_recipe):
    from llm_compress.config import parse_recipe
    from llm_compress.errors import InputError
    from llm_compress.kv import load_kv_cache
    from llm_compress.modeling import load_causal_lm
    from llm_compress.pipeline import preflight, run_local

    root, run, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["kv"] = {"enabled": True, "cache": {"method": "kivi", "bits": [4, 4], "group_size": 32, "residual": 32}}
    with pytest.raises(InputError, match="kv.cache: KIVI group size 32 does not divide head_dim 16"):
        preflight(parse_recipe(data))  # the tiny model's heads are 16 wide: refused before any work
    data["kv"]["cache"].update(group_size=16, residual=16)
    data["export"]["formats"] = ["safetensors", "onnx"]
    recipe = parse_recipe(data)
    done = run_local(recipe, root / "tiny-kv", root)
    m = done["kv"]["metrics"]
    assert m["method"] == "kivi" and m["scored_tokens"] == 4 * 32 and m["bytes_mean"] < m["full_bytes_mean"]
    assert m["memory_ratio_mean"] == pytest.approx(m["full_bytes_mean"] / m["bytes_mean"], rel=1e-5)
    assert m["memory_steps"] == 31 and m["bytes_mean"] <= m["bytes_max"] and m["memory_ratio_min"] > 1
    assert 1.0 < m["ppl_ratio"] < 1.5 and m["kl_to_full"] > 0 and 0.5 < m["top1_agreement"] <= 1
    assert all(done[s].get("reused") for s in ("bootstrap", "data", "distill", "quantize"))
    # what a user does with it: the quantized model generates through the cache the stage wrote
    folder = Path(done["kv"]["outputs"]["kv_cache"]["path"]).parent
    model = load_causal_lm(done["quantize"]["outputs"]["model"]["path"])
    cache = load_kv_cache(folder, model)
    out = model.generate(torch.ones(2, 8, dtype=torch.long), past_key_values=cache, max_new_tokens=40,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 48) and cache.get_seq_length() == 47

    # evaluate measured every model with the cache (the KV stage's rows), and decoding with it and without
    assert done["evaluate"]["inputs"]["kv_cache"]["sha256"] == done["kv"]["outputs"]["kv_cache"]["sha256"]
    ev = done["evaluate"]["metrics"]["models"]
    assert set(ev) == {"teacher", "distill", "quantize"}
    for name, e in ev.items():
        kv = e["kv"]
        assert kv["method"] == "kivi" and kv["memory_ratio_mean"] > 1 and kv["bytes_mean"] < kv["full_bytes_mean"], name
        assert kv["decode_tokens_per_s"] > 0 and kv["decode_tokens_per_s_full"] > 0, name
    for k in ("bytes_mean", "bytes_max", "memory_ratio_mean", "memory_ratio_min", "ppl_ratio", "kl_to_full",
              "top1_agreement"):
        assert ev["quantize"]["kv"][k] == pytest.approx(m[k], rel=1e-4), k  # the KV stage measured that model
    from llm_compress.report import build, markdown

    md = markdown(build("tiny-kv", "tiny", done, [], "completed", None, True))
    assert "decode_tokens_per_s_full" in md and "kivi: 8" in md and "no (ONNX Runtime runs" in md

    # the transformers export carries the cache spec and was checked generating with it; ONNX carries none
    ex = done["export"]["metrics"]
    st = Path(done["export"]["outputs"]["safetensors"]["path"])
    assert (st / "kv_cache.json").read_text() == (folder / "kv_cache.json").read_text()
    assert ex["safetensors"]["kv_cache"]["generated_tokens"] == 8 and ex["safetensors"]["passed"]
    assert not (Path(done["export"]["outputs"]["onnx"]["path"]) / "kv_cache.json").exists()
    assert ex["onnx"]["kv_cache"]["file"] is None and "ONNX Runtime" in ex["onnx"]["kv_cache"]["reason"]
    card = (st / "README.md").read_text()  # the card names the cache and shows how to generate through it
    assert "kv: method `kivi`" in card and 'load_kv_cache("safetensors", model)' in card
    onnx_card = (Path(done["export"]["outputs"]["onnx"]["path"]) / "README.md").read_text()
    assert "load_kv_cache" not in onnx_card and "no `kv_cache.json` here: ONNX Runtime" in onnx_card
    exported = load_causal_lm(str(st))
    cache = load_kv_cache(st, exported)
    out = exported.generate(torch.ones(1, 8, dtype=torch.long), past_key_values=cache, max_new_tokens=12,
                            do_sample=False, pad_token_id=0)
    assert out.shape == (1, 20) and cache.spec == json.loads((st / "kv_cache.json").read_text())


def test_a_run_without_kv_has_no_cache_figures_and_exports_no_cache_spec(tiny_run):
    root, run, report = tiny_run
    ev = json.loads((stage_dir(root, run, "evaluate") / "manifest.json").read_text())
    assert "kv_cache" not in ev["inputs"] and "kv" not in ev["config"]
    assert not any("kv" in m for m in ev["metrics"]["models"].values())
    ex = json.loads((stage_dir(root, run, "export") / "manifest.json").read_text())
    assert "kv_cache" not in ex["inputs"] and not any("kv_cache" in m for m in ex["metrics"].values())
    assert not list((stage_dir(root, run, "export")).rglob("kv_cache.json"))
    assert report["kv_cache"] is None and report["kv_evaluation"] == []
    assert "kv_cache.json" not in (root / run / "report.md").read_text()


def test_kv_stage_kvtuner_searches_per_layer_bits_and_writes_them(tiny_run, tiny_recipe):
    from llm_compress.config import parse_recipe
    from llm_compress.errors import InputError
    from llm_compress.kv import load_kv_cache
    from llm_compress.kv.kivi import KIVICache
    from llm_compress.kv.spec import average_bits
    from llm_compress.modeling import load_causal_lm
    from llm_compress.pipeline import preflight, run_local

    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["kv"] = {"enabled": True, "cache": {"method": "kvtuner", "budget": 3.0, "group_size": 16, "residual": 32}}
    with pytest.raises(InputError, match="calibration prompts \\(32 tokens.*fit in the residual window \\(32\\)"):
        preflight(parse_recipe(data))  # refused before any work
    data["kv"]["cache"]["residual"] = 16
    done = run_local(parse_recipe(data), root / "tiny-kvtuner", root)
    m, out = done["kv"]["metrics"], done["kv"]["outputs"]
    layers = load_causal_lm(done["quantize"]["outputs"]["model"]["path"]).config.num_hidden_layers
    assert m["method"] == "kivi" and m["kvtuner"]["avg_bits"] <= 3.0 and len(m["kvtuner_sensitivity"]) == layers
    assert m["kvtuner"]["strategy"] == "exact"
    assert Path(out["kvtuner_pareto"]["path"]).read_bytes()[:4] == b"\x89PNG"
    table = json.loads(Path(out["kvtuner_sensitivity"]["path"]).read_text())
    saved = json.loads(Path(out["kv_cache"]["path"]).read_text())
    # every configuration of the groups' pruned space measured
    assert len(table["trials"]) == saved["search"]["space"] == m["kvtuner"]["measured"] and table["objective"] == "kl"
    assert saved["method"] == "kivi" and len(saved["bits"]) == layers and average_bits(saved["bits"]) <= 3.0
    model = load_causal_lm(done["quantize"]["outputs"]["model"]["path"])
    cache = load_kv_cache(Path(out["kv_cache"]["path"]).parent, model)
    assert isinstance(cache, KIVICache) and [[la.k_bits, la.v_bits] for la in cache.layers] == saved["bits"]


def test_report_and_metrics_are_prefect_artifacts(tiny_run):
    import socket

    from prefect.artifacts import Artifact

    root, run, _ = tiny_run
    report = Artifact.get("report-tiny-a")
    assert report is not None and "## Evaluation" in report.data
    table = Artifact.get("metrics-tiny-a")
    assert table is not None and "quantize" in str(table.data)
    curves = Artifact.get("distill-curves-tiny-a")
    assert curves is not None and curves.type == "image" and str(curves.data).startswith("data:image/png;base64,")
    evals = Artifact.get("distill-eval-tiny-a")
    assert evals is not None and "eval_kd" in str(evals.data)
    exports = Artifact.get("exports-tiny-a")  # where the files are, not only file:// links the UI cannot open
    folder = stage_dir(root, run, "export") / "safetensors"
    assert exports is not None and f"`{folder.resolve()}`" in exports.data
    assert f"rsync -a {socket.gethostname()}:{folder.resolve()} ." in exports.data


def test_long_stages_show_their_progress_in_the_ui(tiny_run):
    """Each stage that ran has a progress artifact on its task run: 100 % with 'done' at the end; the training stages
    reported their steps on the way (tested on the reporter: tests/test_trainer.py)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    notes = {a.description for a in arts if a.data == 100}
    assert {f"{s}: done" for s in ("bootstrap", "distill", "quantize", "evaluate", "export")} <= notes, notes


def test_cached_teacher_top_k_and_on_policy_through_the_pipeline(tiny_run, tiny_recipe):
    """Cached top-k is computed once per (teacher, data, k, temperature) and reused by a run with another divergence."""
    from llm_compress.config import parse_recipe
    from llm_compress.pipeline import run_local

    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["distill"].update(teacher={"source": "cached_topk", "topk": 16}, steps=4, eval_every=4)
    data["quantize"]["enabled"] = False
    data["evaluate"]["enabled"] = False
    data["export"]["enabled"] = False
    first = run_local(parse_recipe(data), root / "tiny-topk-a", root)["distill"]["metrics"]
    assert first["teacher_signal"] == "cached_topk" and first["teacher_topk"] == 16
    assert first["teacher_topk_reused"] is False and first["teacher_topk_bytes"] > 0
    data["distill"]["divergence"] = "js"
    data["distill"]["on_policy"] = {"share": 0.5, "prompt_tokens": 16}
    second = run_local(parse_recipe(data), root / "tiny-topk-b", root)["distill"]["metrics"]
    assert second["teacher_topk_reused"] is True and 0 < second["on_policy_batches"] < 4
    assert second["eval_kd_after"] < second["eval_kd_before"]


def test_missing_data_file_fails_before_any_work(tmp_path):
    from llm_compress.config import parse_recipe
    from llm_compress.errors import InputError
    from llm_compress.pipeline import preflight

    recipe = parse_recipe({"data": {"source": "files", "train": [str(tmp_path / "gone.jsonl")],
                                    "eval": [str(tmp_path / "gone.jsonl")]}})
    with pytest.raises(InputError, match="data file.*not found.*gone.jsonl"):
        preflight(recipe)


def test_missing_calibration_file_fails_before_any_work(tmp_path):
    from llm_compress.config import parse_recipe
    from llm_compress.errors import InputError
    from llm_compress.pipeline import preflight

    recipe = parse_recipe({"quantize": {"scheme": {"method": "gptq",
                                                   "calibration": {"file": str(tmp_path / "c.txt")}}}})
    with pytest.raises(InputError, match=r"quantize\.scheme\.calibration\.file: not found: .*c\.txt"):
        preflight(recipe)


def test_gptq_calibrates_on_a_given_text_file(tiny_run, tiny_recipe, tmp_path):
    """calibration.file: text tokenized with the model's tokenizer into data.seq_len rows, instead of data's tokens."""
    from llm_compress.config import parse_recipe
    from llm_compress.pipeline import run_local

    root, run, _ = tiny_run
    corpus = stage_dir(root, run, "bootstrap") / "corpus"
    calib = tmp_path / "calib.jsonl"
    calib.write_text((corpus / "prose" / "eval.jsonl").read_text())
    data = tiny_recipe.model_dump(mode="json")
    data["quantize"]["scheme"] = {"method": "gptq", "setting": "W4A16",
                                  "calibration": {"samples": 4, "file": str(calib)}}
    data["export"]["formats"] = ["safetensors"]
    done = run_local(parse_recipe(data), root / "tiny-calib-file", root)
    q = done["quantize"]
    assert q["inputs"]["calib"]["ref"] == str(calib) and q["config"]["calib_seq_len"] == tiny_recipe.data.seq_len
    assert q["metrics"]["calibration_rows"] == 4
    assert done["export"]["metrics"]["safetensors"]["passed"]


def test_local_checkpoint_and_data_files_run_without_the_embedded_world(tiny_run, tmp_path):
    """The path real users take: a teacher checkpoint directory and JSONL files (here: the tiny run's)."""
    from llm_compress.config import parse_recipe
    from llm_compress.pipeline import enabled, run_local

    root, run, _ = tiny_run
    boot = stage_dir(root, run, "bootstrap")
    recipe = parse_recipe({
        "name": "local", "models": {"teacher": str(boot / "teacher")},
        "data": {"source": "files", "train": [str(boot / "corpus" / "prose" / "train.jsonl")],
                 "eval": [str(boot / "corpus" / "code" / "eval.jsonl")], "seq_len": 32},
        "distill": {"steps": 3, "batch_size": 4, "eval_every": 3, "warmup_steps": 1},
        "evaluate": {"max_eval_tokens": 256, "latency_new_tokens": 4, "latency_repeats": 1},
        "export": {"formats": ["safetensors"]}, "runtime": {"progress": False}})
    assert enabled(recipe)[0] == "data"  # no bootstrap
    done = run_local(recipe, tmp_path / "local", tmp_path)
    assert done["data"]["inputs"]["tokenizer"]["ref"] == str(boot / "teacher")
    assert set(done["evaluate"]["metrics"]["models"]) == {"teacher", "distill", "quantize"}
    assert done["export"]["metrics"]["safetensors"]["passed"] is True


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch):
    from llm_compress.errors import InputError
    from llm_compress.modeling import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"could not load 'no-org/no-model' from the hub \(HF_HUB_OFFLINE=1 is set\)"):
        load_tokenizer("no-org/no-model")


def test_select_stage_feeds_distillation(tiny_run, tiny_recipe):
    """DSIR in the chain: a prose target picks prose from the mixed embedded pool; data trains on the selection."""
    from llm_compress.config import parse_recipe
    from llm_compress.pipeline import run_local

    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["select"] = {"enabled": True, "raw": ["embedded"], "targets": [{"paths": ["embedded:prose"]}],
                      "dsir": {"k": 30, "min_length": 10, "processes": 1}}
    data["export"]["formats"] = ["safetensors"]
    done = run_local(parse_recipe(data), root / "tiny-select", root)
    assert done["bootstrap"].get("reused")  # the session's bootstrap, found by its content key
    sel = done["select"]["metrics"]
    assert sel["selected"] == 30 and sel["kl_reduction"] > 0
    rows = [json.loads(line) for line in open(done["select"]["outputs"]["selected"]["path"])]
    assert sum(r["source"].startswith("pydoc:") for r in rows) / len(rows) >= 0.9
    assert done["data"]["metrics"]["train_source"] == "select" and done["data"]["metrics"]["train_docs"] == 30
    assert done["data"]["inputs"]["selected"]["sha256"] == done["select"]["outputs"]["selected"]["sha256"]


def test_select_command_writes_selection_and_manifest(tiny_run, tmp_path, capsys):
    from llm_compress.flows.cli import main

    root, run, _ = tiny_run
    corpus = stage_dir(root, run, "bootstrap") / "corpus"
    out = tmp_path / "sel"
    raw = [str(corpus / d / "train.jsonl") for d in ("code", "docstrings", "prose")]
    args = ["select", "--raw", *raw, "--target", str(corpus / "prose" / "train.jsonl"), "--out", str(out),
            "-k", "40", "--min-length", "5", "--processes", "1"]
    assert main(args) == 0
    assert {"selected.jsonl", "weights.npy", "manifest.json"} <= {p.name for p in out.iterdir()}
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["kl_reduction"] > 0 and m["config"]["k"] == 40
    assert len((out / "selected.jsonl").read_text().splitlines()) == 40
    assert main(args[:-4] + ["-k", "0"]) == 2 and "--k" in capsys.readouterr().err
    assert main(["select", "--raw", str(tmp_path / "none.jsonl"), "--target", str(corpus / "code" / "eval.jsonl"),
                 "--out", str(tmp_path / "x"), "-k", "3"]) == 2
    assert "not found" in capsys.readouterr().err


def test_ostquant_w4a4kv4_through_the_pipeline(tiny_run, tiny_recipe):
    """OSTQuant in the chain: calibrated on the data stage's rows; evaluate and export run the model as quantized."""
    from llm_compress.config import parse_recipe
    from llm_compress.pipeline import run_local

    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["quantize"]["scheme"] = {"method": "ostquant", "setting": "W4A4KV4", "steps": 3, "batch_size": 2,
                                  "calibration": {"samples": 8}}
    data["export"]["formats"] = ["safetensors"]
    done = run_local(parse_recipe(data), root / "tiny-ost", root)
    q = done["quantize"]
    assert q["inputs"]["calib"]["sha256"] == done["data"]["outputs"]["train"]["sha256"]
    assert q["metrics"]["scheme"].startswith("W4A4KV4") and q["metrics"]["calibration_rows"] == 8
    assert 0 < q["metrics"]["qsur_mean_before"] <= 1 and 0 < q["metrics"]["qsur_mean_after"] <= 1
    rec = json.loads((Path(q["outputs"]["model"]["path"]) / "quantization.json").read_text())
    assert rec["online_hadamard"]["size"] == 128 and rec["a_bits"] == 4
    ev = done["evaluate"]["metrics"]["models"]
    assert ev["quantize"]["runtime"].startswith("online Hadamard") and "A4 KV4" in ev["quantize"]["runtime"]
    from llm_compress.modeling import load_causal_lm
    from llm_compress.quantize.transforms import get_online_hadamard

    back = load_causal_lm(q["outputs"]["model"]["path"])  # what evaluate and export loaded
    assert back._fakequant_handle.setting.a_bits == 4 and get_online_hadamard(back).shape == (128, 128)
    exp = done["export"]["metrics"]["safetensors"]
    assert exp["passed"] and exp["max_abs_diff"] < 1e-3
    card = (Path(done["export"]["outputs"]["safetensors"]["path"]) / "README.md").read_text()
    latency = card.split("## Latency", 1)[1].split("##", 1)[0]
    assert "Not reported" in latency and "ms per generated token" not in latency  # fake-quantized: no speed claim
    assert "load_causal_lm" in card and "setting `W4A4KV4`" in card


def _evaluate_only_variant(recipe, repeats: int):
    """The tiny recipe with its own evaluate key (latency repeats) and no export: only evaluate runs anew."""
    variant = recipe.model_copy(deep=True)
    variant.evaluate.latency_repeats = repeats
    variant.export.enabled = False
    return variant


def test_a_cached_stage_whose_files_changed_on_disk_is_recomputed(tiny_run, tiny_recipe):
    """A finished stage's files changed on disk by another write after it was published (same size, in place): the
    next run recomputes it (its task run Completed, not Reused) and reuses the untouched stages."""
    from llm_compress.flows.pipeline import compress

    root, _, _ = tiny_run
    recipe = _evaluate_only_variant(tiny_recipe, 2)
    first = compress(recipe=recipe, run_name="tiny-edited-a", artifacts_dir=str(root))
    assert {s["stage"]: s["state"] for s in first["stages"]}["evaluate"] == "ran"
    eval_json = stage_dir(root, "tiny-edited-a", "evaluate") / "eval.json"
    text = eval_json.read_text()
    i = next(i for i, c in enumerate(text) if c.isdigit())
    eval_json.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])  # in place, same size
    state = compress(recipe=recipe, run_name="tiny-edited-b", artifacts_dir=str(root), return_state=True)
    second = state.result()
    states = {s["stage"]: s["state"] for s in second["stages"]}
    assert states == {"bootstrap": "cached", "data": "cached", "distill": "cached", "quantize": "cached",
                      "evaluate": "ran"}
    ui, notes = task_run_states(flow_run_id=state.state_details.flow_run_id)
    assert ui == {"bootstrap": "Reused", "data": "Reused", "distill": "Reused", "quantize": "Reused",
                  "evaluate": "Completed"}
    assert notes["evaluate"] == "done" and notes["quantize"] == "reused"
    m = json.loads((stage_dir(root, "tiny-edited-b", "evaluate") / "manifest.json").read_text())
    assert "reused_from" not in m and m["outputs"]["eval"]["sha256"] == digest_path(m["outputs"]["eval"]["path"])
    third = compress(recipe=recipe, run_name="tiny-edited-c", artifacts_dir=str(root))  # untouched: reused
    assert [s["state"] for s in third["stages"]] == ["cached"] * 5
    m = json.loads((stage_dir(root, "tiny-edited-c", "evaluate") / "manifest.json").read_text())
    assert m["reused_from"] == str(stage_dir(root, "tiny-edited-b", "evaluate"))


def test_each_flow_run_without_a_run_name_writes_its_own_folder_and_report(tiny_run, tiny_recipe):
    from llm_compress.flows.cli import default_run_name
    from llm_compress.flows.pipeline import compress

    root, _, _ = tiny_run
    recipe = _evaluate_only_variant(tiny_recipe, 3)
    first = compress(recipe=recipe, artifacts_dir=str(root))
    second = compress(recipe=recipe, artifacts_dir=str(root))
    a, b = first["run_name"], second["run_name"]
    assert a != b and a.startswith(default_run_name(recipe) + "-") and b.startswith(default_run_name(recipe) + "-")
    for name, rep in ((a, first), (b, second)):
        assert json.loads((root / name / "report.json").read_text())["run_name"] == name == rep["run_name"]
        assert (root / name / "report.md").is_file() and rep["status"] == "completed"
    assert {s["stage"]: s["state"] for s in first["stages"]}["evaluate"] == "ran"
    assert [s["state"] for s in second["stages"]] == ["cached"] * 5  # the content-keyed cache is shared
    m = json.loads((stage_dir(root, b, "evaluate") / "manifest.json").read_text())
    assert m["reused_from"] == str(stage_dir(root, a, "evaluate"))


def _probe_stage(behaviour):
    """A stage after kv (folder probe) whose run is ``behaviour(attempt)`` (1, 2, ...); records its attempts."""
    from llm_compress.result import StageResult
    from llm_compress.stage import Stage

    class Probe(Stage):
        name = "probe"
        reads = ("unlearn",)
        attempts = 0

        def enabled(self, recipe):
            return True

        def inputs(self, recipe, up):
            return {"model": up.model}

        def run(self, ctx):
            type(self).attempts += 1
            behaviour(type(self).attempts)
            (ctx.out_dir / "probe.json").write_text("{}")
            return StageResult(outputs={"probe": "probe.json"})

    return Probe()


@pytest.mark.parametrize("error, attempts, completes", [
    (ConnectionError("the hub is away"), 2, True),  # transient: retried once (runtime.retries 1), then fine
    (FileNotFoundError("no such file"), 1, False),  # a missing file does not come back on its own
    (InputError("bad input"), 1, False),  # the project's errors fail at once
])
def test_a_stage_is_retried_after_a_transient_error_only(tiny_run, tiny_recipe, monkeypatch, error, attempts,
                                                          completes):
    import llm_compress.pipeline as pipeline
    from llm_compress.flows.pipeline import compress
    from llm_compress.config import parse_recipe

    def behaviour(attempt):
        if attempt == 1:
            raise error

    probe = _probe_stage(behaviour)
    stages = list(pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", tuple(stages[:7] + [probe] + stages[7:]))
    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    name = f"retry-{type(error).__name__}"
    data["runtime"].update(retries=1, retry_delay_s=0)
    data["unlearn"]["forget"] = name  # in the probe's key only: a fresh probe, every other stage cached
    recipe = parse_recipe(data)
    if completes:
        report = compress(recipe=recipe, run_name=name, artifacts_dir=str(root))
        assert report["status"] == "completed" and (root / name / "probe" / "probe.json").is_file()
    else:
        with pytest.raises(type(error)):
            compress(recipe=recipe, run_name=name, artifacts_dir=str(root))
    assert type(probe).attempts == attempts


def test_a_stage_over_its_timeout_fails_the_run_without_a_retry(tiny_run, tiny_recipe, monkeypatch):
    import llm_compress.pipeline as pipeline
    from llm_compress.flows.pipeline import compress
    from llm_compress.config import parse_recipe
    from llm_compress.errors import InputError

    probe = _probe_stage(lambda attempt: time.sleep(3))
    stages = list(pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", tuple(stages[:7] + [probe] + stages[7:]))
    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["runtime"].update(retries=2, retry_delay_s=0, timeouts={"probe": 0.5})
    data["unlearn"]["forget"] = "timeout"
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        compress(recipe=parse_recipe(data), run_name="timeout", artifacts_dir=str(root))
    assert type(probe).attempts == 1 and time.perf_counter() - t0 < 60
    data["runtime"]["timeouts"] = {"distil": 10}
    with pytest.raises(InputError, match=r"runtime.timeouts: unknown stage\(s\) \['distil'\]"):
        compress(recipe=parse_recipe(data), run_name="timeout", artifacts_dir=str(root))


_CONCURRENT = """
import json, sys
from pathlib import Path
from llm_compress.config import load_recipe, parse_recipe
from llm_compress.pipeline import run_local
data = load_recipe(sys.argv[1]).model_dump(mode="json")
data["export"] = {"formats": ["safetensors"]}
data["distill"]["steps"] = 4
done = run_local(parse_recipe(data), Path(sys.argv[2]) / sys.argv[3], Path(sys.argv[2]))
print(json.dumps({s: [bool(m.get("reused")), m["stage_dir"]] for s, m in done.items()}))
"""


def test_two_concurrent_runs_of_one_recipe_compute_each_stage_once(tmp_path):
    """Two processes run the same recipe at once into one artifacts folder (a served run and a CLI run): each stage
    is computed by one of them while the other waits on the stage key's lock and reuses it; both complete with
    intact manifests."""
    import subprocess
    import sys

    from tests.conftest import ROOT, TINY

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(TINY), str(tmp_path), name], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    a, b = results
    assert set(a) == set(b) == set(RAN)
    assert all({a[s][0], b[s][0]} == {True, False} for s in a), (a, b)  # one computed it, the other reused it
    for s in RAN:
        assert a[s][1] == b[s][1]  # both runs' stage is the one folder the computing run published
        m = json.loads((Path(a[s][1]) / "manifest.json").read_text())
        assert m["stage"] == s and m["status"] == "completed"
    assert not list(tmp_path.glob("*/.*tmp-*"))  # no half-published folder left behind


def test_a_gpu_stage_holds_a_slot_of_the_global_concurrency_limit(prefect_server):
    """runtime.gpu_slot: a stage on CUDA holds one slot of the named limit while it runs (so a second run waits);
    a CPU stage takes none; strict, so a missing limit is an error."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from llm_compress.flows.pipeline import gpu_slot

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-test", limit=1))

        def active() -> int:
            return client.read_global_concurrency_limit_by_name("gpu-test").active_slots

        logs = []
        with gpu_slot("gpu-test", "cpu", "distill", logs.append):
            assert active() == 0
        with gpu_slot("gpu-test", "cuda", "distill", logs.append):
            assert active() == 1
        assert active() == 0 and logs == ["distill: waiting for a slot of 'gpu-test'",
                                          "distill: holds a slot of 'gpu-test'"]


def test_a_missing_gpu_slot_limit_fails_the_run_before_any_work(prefect_server, tiny_recipe, tmp_path):
    from llm_compress.flows.pipeline import compress
    from llm_compress.config import parse_recipe
    from llm_compress.errors import InputError

    data = tiny_recipe.model_dump(mode="json")
    data["runtime"]["gpu_slot"] = "gpu:nowhere"
    with pytest.raises(InputError, match=r"no global concurrency limit 'gpu:nowhere'; create it first: prefect gcl "
                                         r"create gpu:nowhere --limit 1"):
        compress(recipe=parse_recipe(data), run_name="no-slot", artifacts_dir=str(tmp_path))
    assert not (tmp_path / "no-slot").exists()


async def _served_deployment_run(recipe_path: Path, artifacts: Path, run_name: str) -> str:
    """A deployment's flow run, created through the API as the UI's Run button does and executed in its own process
    as `compress serve` does; returns its final state."""
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    from llm_compress.flows.pipeline import compress

    dep = await compress.ato_deployment(name="side-by-side", parameters={
        "recipe_path": str(recipe_path), "run_name": run_name, "artifacts_dir": str(artifacts)})
    deployment_id = await dep.aapply()
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(deployment_id)
        await Runner().execute_flow_run(run.id)
        return (await client.read_flow_run(run.id)).state.type.value


def test_a_served_run_and_a_cli_run_of_one_recipe_at_once_both_complete_computing_each_stage_once(prefect_server,
                                                                                                   tmp_path):
    """A deployment run (created through the API, executed in its own process, as a served deployment's is) and a
    `compress run` process of the same recipe at once against one Prefect server: both flow runs complete and
    publish, and each stage ran in one of them only (the other waited on the stage key's lock, or found Prefect's
    cached record)."""
    import asyncio

    import yaml
    from prefect.settings import PREFECT_API_URL

    data = yaml.safe_load(TINY.read_text())
    data["export"], data["distill"]["steps"] = {"formats": ["safetensors"]}, 3
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    cli = subprocess.Popen([sys.executable, "-m", "llm_compress.flows.cli", "run", str(recipe), "--artifacts",
                            str(tmp_path), "--run-name", "ua"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    served = asyncio.run(_served_deployment_run(recipe, tmp_path, "ub"))
    out, _ = cli.communicate(timeout=600)
    assert cli.returncode == 0, out[-3000:]
    assert served == "COMPLETED"
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("ua", "ub")]
    assert all(r["status"] == "completed" and r["published"] for r in reports)
    states = [{s["stage"]: s["state"] for s in r["stages"]} for r in reports]
    assert set(states[0]) == set(states[1]) == set(RAN)
    assert all(sorted([states[0][s], states[1][s]]) == ["cached", "ran"] for s in RAN), states


def test_evaluate_scores_candidates_one_at_a_time_when_they_do_not_fit_together(tiny_run, tiny_recipe, monkeypatch):
    """A device too small for the teacher and every candidate at once: the teacher stays, each candidate is loaded,
    scored against it and dropped in turn, with the same figures as the one-pass evaluation."""
    import llm_compress.evaluate as evaluate
    from llm_compress.pipeline import run_local

    root, _, _ = tiny_run
    together = run_local(_evaluate_only_variant(tiny_recipe, 3), root / "tiny-eval-together", root)
    loaded = []
    real_load = evaluate.load_causal_lm
    monkeypatch.setattr(evaluate, "fits_together", lambda refs, device: False)
    monkeypatch.setattr(evaluate, "load_causal_lm", lambda ref, **kw: loaded.append(kw["what"]) or real_load(ref, **kw))
    alone = run_local(_evaluate_only_variant(tiny_recipe, 4), root / "tiny-eval-alone", root)
    assert loaded == ["teacher", "distill model", "quantize model"]  # one candidate loaded at a time, in order
    a, b = together["evaluate"]["metrics"]["models"], alone["evaluate"]["metrics"]["models"]
    for name in ("teacher", "distill", "quantize"):
        for k in ("ppl", "kl_to_teacher", "top1_agreement"):
            assert b[name][k] == pytest.approx(a[name][k], rel=1e-6, abs=1e-9)
        assert a[name]["placement"] == "all models on the device" and b[name]["placement"] == "one candidate at a time"
        assert a[name]["params"] == b[name]["params"] > 0


def test_the_recipe_runs_selection_shards_on_a_dask_cluster(tiny_run, tiny_recipe):
    """runtime.executor from the recipe, through the flow: the select stage's shards run on a local Dask cluster of
    2 workers (the stage's metrics say so), and the selection is the one local processes make."""
    import numpy as np

    from llm_compress.flows.pipeline import compress
    from llm_compress.config import parse_recipe

    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["select"] = {"enabled": True, "raw": ["embedded"], "targets": [{"paths": ["embedded:prose"]}],
                      "dsir": {"k": 30, "min_length": 10, "processes": 1, "shard_bytes": 50_000}}
    local = compress(recipe=parse_recipe(data), run_name="tiny-select-local", artifacts_dir=str(root), until="select")
    data["runtime"]["executor"] = {"kind": "dask", "workers": 2}
    data["select"]["dsir"]["shard_bytes"] = 50_001  # another key: computed afresh, not served from the first
    dask = compress(recipe=parse_recipe(data), run_name="tiny-select-dask", artifacts_dir=str(root), until="select")
    assert [s["stage"] for s in dask["stages"]] == ["bootstrap", "select"]
    m = json.loads((stage_dir(root, "tiny-select-dask", "select") / "manifest.json").read_text())["metrics"]
    assert m["executor"] == "dask" and m["processes"] == 2 and m["shards"] >= 2
    ids = [np.load(stage_dir(root, r, "select") / "selected_ids.npy")
           for r in ("tiny-select-local", "tiny-select-dask")]
    assert local["status"] == "completed" and np.array_equal(ids[0], ids[1])  # shard size changes no weight


def test_the_flow_runs_distillation_on_two_processes_and_the_report_says_so(tiny_run, tiny_recipe):
    """runtime.distributed from the recipe, through the flow: the distill stage's Prefect task launches torchrun
    with 2 CPU ranks and waits for them; report.json and report.md give each stage's processes and devices."""
    from llm_compress.flows.pipeline import compress
    from llm_compress.config import parse_recipe

    root, _, _ = tiny_run
    data = tiny_recipe.model_dump(mode="json")
    data["runtime"]["distributed"] = {"processes": 2}
    data["distill"]["steps"] = 12  # another key than tiny_run's distillation: computed afresh, by two ranks
    report = compress(recipe=parse_recipe(data), run_name="tiny-ddp", artifacts_dir=str(root), until="distill")
    stages = {s["stage"]: s for s in report["stages"]}
    assert report["status"] == "completed" and stages["distill"]["state"] == "ran"
    assert stages["distill"]["compute"]["processes"] == 2 and len(stages["distill"]["compute"]["devices"]) == 2
    assert stages["data"]["compute"]["processes"] == 1
    md = (root / "tiny-ddp" / "report.md").read_text()
    assert "| processes / devices |" in md
    assert next(line for line in md.splitlines() if line.startswith("| distill |")).split(" | ")[3] == "2 / 1 cpu"
    metrics = json.loads((stage_dir(root, "tiny-ddp", "distill") / "manifest.json").read_text())["metrics"]
    assert metrics["steps"] == 12 and metrics["eval_ppl_after"] < metrics["eval_ppl_before"]
