"""bench/gpu_check.py at CPU size (--tiny): the whole chain, its JSON figures and the results section it rewrites."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

HEADING = "## GPU check (bench/gpu_check.sh)"
FORMATS = {"safetensors", "compressed-tensors", "onnx-int4", "bnb-nf4"}


def _run(art: Path, out: Path, results: Path) -> subprocess.CompletedProcess:
    # one intra-op thread: tiny matmuls on this shared 2-core machine run far slower with two (tests/conftest.py)
    cmd = [sys.executable, "bench/gpu_check.py", "--tiny", "--threads", "1", "--artifacts", str(art), "--out",
           str(out), "--results", str(results)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def _sections(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("## GPU check")]


@pytest.mark.slow
def test_tiny_gpu_check_reports_every_figure_and_keeps_one_section(tmp_path):
    art, out, results = tmp_path / "art", tmp_path / "g.json", tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Earlier\n\nkept\n")
    _run(art, out, results)
    r = json.loads(out.read_text())
    assert r["status"] == "completed" and not r["errors"] and r["tiny"] is True
    assert r["device"] == "cpu" and r["torch"] and r["transformers"]
    assert r["params"]["teacher"] > r["params"]["student"] > 0
    for phase in ("pretrain", "distill"):
        t = r["throughput"][phase]
        assert t["tokens_per_s"] > 0 and t["tokens_per_s_steady"] > 0, (phase, t)
    assert set(r["quality"]) == {"teacher", "student", "gptq", "ostquant"}
    for name, q in r["quality"].items():
        assert math.isfinite(q["ppl"]) and q["ppl"] > 1, (name, q)
    assert set(r["exports"]["gptq"]) == FORMATS and set(r["exports"]["ostquant"]) == {"safetensors"}
    for variant, formats in r["exports"].items():
        for fmt, e in formats.items():
            assert e["passed"] is True and e["bytes"] > 0 and e["top1_agreement"] >= 0, (variant, fmt, e)
            assert e["provider"], (variant, fmt)
    assert r["exports"]["gptq"]["onnx-int4"]["provider"] == "CPUExecutionProvider"
    ost = r["quantize"]["ostquant"]
    assert ost["method"] == "ostquant" and ost["scheme"].startswith("W4A4KV4")
    assert "A4 KV4" in r["quality"]["ostquant"]["runtime"]
    stages = {(s["variant"], s["stage"]): s for s in r["stages"]}
    for stage in ("bootstrap", "data", "distill"):  # the OSTQuant variant reuses the GPTQ run's upstream stages
        assert stages[("gptq", stage)]["state"] == "ran" and stages[("ostquant", stage)]["state"] == "cached"
    assert all(s["duration_s"] is not None and s["wall_s"] > 0 for s in r["stages"] if s["state"] == "ran")
    assert all(s["peak_gpu_gib"] is None for s in r["stages"])  # on the CPU

    text = results.read_text()
    assert _sections(text) == [HEADING] and "## Earlier\n\nkept" in text
    section = text[text.index(HEADING):]
    assert "| variant | stage |" in section and "| gptq | export | ran |" in section and "onnx-int4" in section

    _run(art, out, results)  # every stage from the cache: same figures, still one section
    r2 = json.loads(out.read_text())
    assert {s["state"] for s in r2["stages"]} == {"cached"}
    assert r2["quality"] == r["quality"] and r2["throughput"] == r["throughput"]
    text = results.read_text()
    assert _sections(text) == [HEADING] and text.startswith("# Results\n\n## Earlier\n\nkept\n")


def test_write_section_replaces_up_to_the_next_heading_or_appends(tmp_path):
    from bench.gpu_check import write_section

    path = tmp_path / "R.md"
    write_section(path, f"{HEADING}\n\nfirst\n")
    assert path.read_text() == f"{HEADING}\n\nfirst\n"
    path.write_text(f"# R\n\n## A\n\na\n\n{HEADING}\n\nold\n\n### sub\n\nold too\n\n## B\n\nb\n")
    write_section(path, f"{HEADING}\n\nnew\n")
    assert path.read_text() == f"# R\n\n## A\n\na\n\n{HEADING}\n\nnew\n\n## B\n\nb\n"
    path.write_text("# R\n\n## A\n\na\n")
    write_section(path, f"{HEADING}\n\nnew\n")
    assert path.read_text() == f"# R\n\n## A\n\na\n\n{HEADING}\n\nnew\n"
