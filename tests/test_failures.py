"""The last two bad inputs that printed tracebacks: a model folder whose safetensors file is truncated or corrupt,
and a disk that fills while a stage writes. Each is one line naming the file or the folder and the cause, and what
finished before stays as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm_compress.errors import DiskFullError, InputError
from tests.conftest import ROOT

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' Rust writer


@pytest.fixture
def teacher(tiny_world, tmp_path) -> Path:
    """A copy of the tiny world's teacher folder (config.json, model.safetensors, tokenizer), free to damage."""
    _, done = tiny_world
    return Path(shutil.copytree(done["bootstrap"]["outputs"]["teacher"]["path"], tmp_path / "teacher"))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _recipe(tmp_path: Path, teacher: Path) -> Path:
    """The tiny recipe on a local teacher folder and a JSONL file (no embedded world, so no bootstrap stage)."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"the river ran past the mill number {i}."}) + "\n"
                            for i in range(400)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: local\nmodels: {{teacher: {teacher}}}\n"
                      f"data: {{source: files, train: [{text}], eval: [{text}], seq_len: 32}}\n"
                      "distill: {steps: 2, batch_size: 2}\nruntime: {progress: false}\n")
    return recipe


def test_a_truncated_teacher_is_one_named_line_before_any_work(teacher, tmp_path, capsys):
    from llm_compress.flows.cli import main

    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    _truncate(weights, size - 1000)  # a copy cut short: the header is whole, the last tensor is not
    recipe = _recipe(tmp_path, teacher)
    for cmd in (["validate", str(recipe)], ["run", str(recipe), "--artifacts", str(tmp_path / "art")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err]
        assert err.startswith(f"error: models.teacher: truncated or corrupt safetensors file {weights}: "), err
        assert f"the file holds {size - 1000 - 8 - int.from_bytes(weights.read_bytes()[:8], 'little')}" in err
    assert not (tmp_path / "art").exists()  # run's preflight failed before anything was written


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through ``edit(header)``, keeping its tensor data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _grow_first_tensor(header: dict) -> None:  # a shape twice as large in the same bytes: offsets no longer fit
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] *= 2


@pytest.mark.parametrize("damage, reason", [
    (lambda p: _truncate(p, p.stat().st_size // 2), "bytes of tensor data, the file holds"),
    (lambda p: _truncate(p, 100), "the header length reads"),
    (lambda p: _truncate(p, 3), "3 bytes, shorter than the 8-byte header length"),
    (lambda p: p.write_bytes((20).to_bytes(8, "little") + b"not a json header..."), "not a safetensors header"),
    (lambda p: _rewrite_header(p, _grow_first_tensor), ""),  # only the safetensors loader sees this one
], ids=["data-cut", "header-cut", "length-cut", "header-not-json", "shape-past-offsets"])
def test_loading_a_truncated_or_corrupt_model_names_the_file_and_the_cause(teacher, damage, reason):
    from llm_compress.modeling import load_causal_lm

    damage(teacher / "model.safetensors")
    with pytest.raises(InputError, match="truncated or corrupt safetensors file") as e:
        load_causal_lm(str(teacher), what="models.teacher")
    msg = str(e.value)
    assert str(teacher) in msg and reason in msg and "\n" not in msg, msg


def _publish(root: Path, stage: str, key: str, fn):
    from llm_compress.runner import execute
    from llm_compress.stage import Call

    call = Call(stage=stage, config={}, inputs={}, key=key * 64)
    return execute(call, run_dir=root / "run", artifacts_root=root, seed=0, fn=fn)


def _chained_enospc() -> Exception:
    """A library's own error raised from the OS's (torch.save's writer)."""
    e = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    e.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return e


@pytest.mark.parametrize("full", [
    lambda: __import__("safetensors").SafetensorError(FULL),  # what save_pretrained's safetensors writer raises
    lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors"),
    _chained_enospc,
], ids=["safetensors", "oserror", "chained"])
def test_a_full_disk_while_a_stage_writes_is_one_named_line_and_leaves_what_finished(tmp_path, full):
    from llm_compress.result import StageResult
    from llm_compress.runner import cache_index_path, lookup

    def data(out: Path) -> StageResult:
        (out / "train.bin").write_bytes(b"tokens")
        return StageResult(outputs={"train": "train.bin"})

    def quantize(out: Path) -> StageResult:
        (out / "model").mkdir()
        (out / "model" / "model.safetensors").write_bytes(b"\0" * 4096)  # half written when the disk filled
        raise full()

    done = _publish(tmp_path, "data", "a", data)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(DiskFullError) as e:
        _publish(tmp_path, "quantize", "b", quantize)
    msg = str(e.value)
    assert msg.startswith(f"quantize: no space left on device while writing {tmp_path / 'run' / 'quantize'} "), msg
    assert "\n" not in msg and ("No space left on device" in msg or "file write failed" in msg), msg
    # the half-written temporary folder is gone, the finished stage and its index entry are as they were
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert [p.name for p in (tmp_path / "run").iterdir()] == [Path(done["stage_dir"]).name]
    assert lookup(tmp_path, "a" * 64)["outputs"] == done["outputs"]
    assert not cache_index_path(tmp_path, "b" * 64).exists()


def test_other_errors_of_a_stage_are_not_taken_for_a_full_disk(tmp_path):
    def broken(out: Path):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(OSError) as e:
        _publish(tmp_path, "quantize", "c", broken)
    assert e.value.errno == errno.EIO and not isinstance(e.value, DiskFullError)


@pytest.mark.parametrize("exc, retried", [
    (DiskFullError("quantize: no space left on device while writing ..."), False),  # what the runner raises
    (OSError(errno.ENOSPC, "No space left on device"), False),  # written outside a stage's folder
    (OSError(errno.EIO, "Input/output error"), True),
    (ConnectionError("the hub is away"), True),
])
def test_a_full_disk_is_not_retried(exc, retried):
    """A retry would run the whole stage again onto the same full disk: the flow's retry condition says no."""
    from llm_compress.flows.pipeline import transient

    assert transient(None, None, SimpleNamespace(data=exc)) is retried


_FILL_DISK = """
import sys
import llm_compress.data
from safetensors import SafetensorError

def save_file(tensors, path):  # the data stage's token file: half written when the disk fills
    open(path, "wb").write(b"\\0" * 4096)
    raise SafetensorError(sys.argv[1])

llm_compress.data.save_file = save_file
from llm_compress.flows.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # the CLI in a subprocess starts its own Prefect server
def test_the_cli_prints_a_full_disk_as_one_line_and_keeps_the_traceback_in_the_run_log(teacher, tmp_path):
    art = tmp_path / "art"
    out = subprocess.run([sys.executable, "-c", _FILL_DISK, FULL, "run", str(_recipe(tmp_path, teacher)),
                          "--run-name", "full", "--artifacts", str(art)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    console = out.stdout + out.stderr
    assert out.returncode == 2, console
    assert f"error: data: no space left on device while writing {art / 'full' / 'data'} " in out.stderr, console
    assert "Traceback" not in console, console
    assert "Traceback" in (art / "full" / "run.log").read_text()
    assert not [p for p in (art / "full").iterdir() if p.name.startswith(".data.")]  # no half-written folder
