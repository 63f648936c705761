"""Data-parallel distillation on CPU processes (gloo, launched by the stage with torchrun): the same result as one
process, a killed run resumed with another world size, a second node joining, a rank's error, the recipe checks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from llm_compress.config import load_recipe, parse_recipe
from llm_compress.errors import InputError, RecipeError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tiny_world) -> dict:
    """The tiny recipe's teacher, tokenizer and token files (the session's bootstrap and data stages)."""
    _, done = tiny_world
    out = lambda stage, name: done[stage]["outputs"][name]["path"]  # noqa: E731
    return {"teacher_ref": out("bootstrap", "teacher"), "tokenizer_ref": out("bootstrap", "tokenizer"),
            "train_path": out("data", "train"), "eval_path": out("data", "eval")}


def _recipe(processes: int = 1, nodes: int = 1, port: int | None = None, strategy: str = "ddp", **distill):
    r = load_recipe(ROOT / "configs" / "tiny.yaml").model_dump(mode="json")
    r["distill"].update({"checkpoint_every": 0, "eval_every": 5, **distill})
    r["runtime"]["distributed"] = {"processes": processes, "nodes": nodes, "strategy": strategy,
                                   **({"master_addr": "127.0.0.1", "master_port": port} if port else {})}
    return parse_recipe(r)


def _run(data: dict, out: Path, recipe, cache: Path | None = None, checkpoint: Path | None = None):
    from llm_compress.distill import apply as distill

    out.mkdir(parents=True)
    return distill.run(recipe.distill, recipe.models, recipe.runtime, student_ref="derive", out_dir=out,
                       teacher_cache_dir=cache or out.parent / f"{out.name}-topk", checkpoint_dir=checkpoint,
                       **{k: (Path(v) if k.endswith("_path") else v) for k, v in data.items()})


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _same_training(a: Path, b: Path, atol: float = 1e-4) -> None:
    """Two runs' logged losses and held-out figures, and their final weights, agree within float tolerance."""
    ha, hb = _history(a), _history(b)
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    for ra, rb in zip(ha, hb):
        for k in ("loss", "kd", "ce", "eval_ce", "eval_kd"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    wa, wb = (load_file(str(p / "model" / "model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < atol


# the fused lm_head loss (run inside DDP's forward / FSDP's root, outside the student's own forward) over 2 accumulated
# micro-batches: the paths a data-parallel wrapper can get wrong
FUSED = dict(chunk="always", grad_accum=2)
CACHED = {"teacher": {"source": "cached_topk"}, **FUSED}  # the teacher's top-k, computed once (by the ranks)
ONLINE = {"teacher": {"source": "online"}, **FUSED}  # the teacher run on every batch (sharded too under FSDP)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    """The reference: the tiny distillation with a cached top-k teacher, in this process."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert _run(data, out, _recipe(**CACHED)).metrics["loss_path"] == "fused"
    return out


@pytest.mark.slow  # torchrun
def test_ddp_on_two_processes_trains_like_one_on_the_same_global_batch(data, one_process, tmp_path):
    """World size 2 (each rank 4 of the 8 rows of every batch, gradients averaged by DDP) gives one process's losses,
    held-out figures and weights; the teacher top-k made by two ranks is the same file; the result says 2 processes;
    rank 0's progress reaches the reporter installed around the stage (the flow's)."""
    from llm_compress.progress import reporting

    seen = []
    with reporting(lambda fraction, note: seen.append((fraction, note))):
        res = _run(data, tmp_path / "two", _recipe(processes=2, **CACHED))
    assert res.compute["strategy"] == "ddp" and res.compute["processes"] == 2 and len(res.compute["devices"]) == 2
    assert seen and seen[-1][0] == 1.0 and "step 10/10" in seen[-1][1]
    _same_training(one_process, tmp_path / "two")
    assert all(d.endswith(":cpu") for d in res.compute["devices"])
    assert res.metrics["loss_path"] == "fused" and res.metrics["teacher_signal"] == "cached_topk"
    assert (tmp_path / "two-topk" / "train.safetensors").read_bytes() == \
        (one_process.parent / "run-topk" / "train.safetensors").read_bytes()
    assert not list((tmp_path / "two-topk").glob("*.part*")) and not (tmp_path / "two" / ".ranks").exists()


@pytest.mark.slow  # torchrun
def test_fsdp_on_two_processes_with_a_sharded_online_teacher_trains_like_one(data, tmp_path):
    """FSDP: the student and the online teacher sharded over 2 ranks (gradients reduce-scattered over the shards, the
    root gathered for the fused lm_head): one process's losses, held-out figures and weights."""
    _run(data, tmp_path / "one", _recipe(**ONLINE))
    res = _run(data, tmp_path / "two", _recipe(processes=2, strategy="fsdp", **ONLINE))
    assert res.compute["strategy"] == "fsdp" and res.metrics["loss_path"] == "fused"
    _same_training(tmp_path / "one", tmp_path / "two")


def _descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc: ranks run in sessions of their own, not in pid's group)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(p)
    return out


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("killed, resumed", [("fsdp", (1, "ddp")), ("ddp", (2, "fsdp"))])
def test_a_killed_two_process_run_leaves_no_rank_and_resumes_with_any_world_size(data, tmp_path, killed, resumed):
    """SIGKILL the stage's process of a 2-process run after its first checkpoint: its launcher and both ranks stop
    too (none trains on, writing checkpoints), and a run with another world size or strategy resumes from the
    checkpoint (whole weights and optimiser state, whoever wrote it), ending where an uninterrupted run ends."""
    kw = dict(steps=40, checkpoint_every=5, eval_every=20, **CACHED)
    ckpt = tmp_path / "ckpt"
    args = {**data, "ckpt": str(ckpt), "out": str(tmp_path / "killed"), "kw": kw, "strategy": killed}
    script = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, {root!r}); "
        "from tests.test_distributed import _recipe, _run; a = json.loads(sys.argv[1]); "
        "_run({{k: a[k] for k in ('teacher_ref', 'tokenizer_ref', 'train_path', 'eval_path')}}, Path(a['out']), "
        "_recipe(processes=2, strategy=a['strategy'], **a['kw']), checkpoint=Path(a['ckpt']))").format(root=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "state.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the 2-process run ended before a checkpoint"
            time.sleep(0.05)
        below = _descendants(proc.pid)
        assert len(below) >= 3  # torchrun and its two ranks
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while _alive(below):
        assert time.monotonic() < deadline, f"left running after the stage was killed: {_alive(below)}"
        time.sleep(0.2)
    killed_at = json.loads((ckpt / "state.json").read_text())["step"]
    assert 0 < killed_at < kw["steps"]
    processes, strategy = resumed
    res = _run(data, tmp_path / "resumed", _recipe(processes=processes, strategy=strategy, **kw),
               cache=tmp_path / "killed-topk", checkpoint=ckpt)
    assert res.metrics["resumed_from_step"] == killed_at and res.compute["processes"] == processes
    _run(data, tmp_path / "straight", _recipe(**kw))
    _same_training(tmp_path / "straight", tmp_path / "resumed", atol=2e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun
def test_a_second_node_joins_with_torchrun_and_gets_the_spec_from_rank_0(data, one_process, tmp_path, monkeypatch):
    """nodes: 2 (one process each, on this machine): the stage is node 0; node 1 is the README's torchrun line with
    no spec. Together they train like one process."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two "nodes" share these 2 cores: 2 threads each would spin
    port = _free_port()
    node1 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
                              "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                              "--module", "llm_compress.worker", "--device", "cpu"], cwd=ROOT)
    try:
        res = _run(data, tmp_path / "two-nodes", _recipe(processes=1, nodes=2, port=port, **CACHED))
        assert node1.wait(timeout=60) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
    assert res.compute["processes"] == 2
    _same_training(one_process, tmp_path / "two-nodes")


@pytest.mark.slow  # torchrun
def test_a_failing_rank_fails_the_stage_with_its_own_error(data, tmp_path):
    """Tokens outside the vocabulary are found by the ranks after loading; the stage raises their InputError (not
    a bare exit code), and nothing is published."""
    ids = load_file(data["train_path"])["ids"].clone()
    ids[0, 0] = 10_000  # the tiny vocabulary has 512 entries
    bad = tmp_path / "train.safetensors"
    save_file({"ids": ids}, str(bad))
    with pytest.raises(InputError, match="exceed the model's vocabulary"):
        _run({**data, "train_path": str(bad)}, tmp_path / "bad", _recipe(processes=2))
    assert not (tmp_path / "bad" / "model").exists()


def test_the_recipe_refuses_what_cannot_be_split():
    with pytest.raises(RecipeError, match="multiple of the runtime.distributed processes"):
        _recipe(processes=3)
    with pytest.raises(RecipeError, match="on_policy"):
        _recipe(processes=2, strategy="fsdp", on_policy={"share": 0.5, "prompt_tokens": 8},
                teacher={"source": "online"})
    with pytest.raises(RecipeError, match="sinkhorn"):
        _recipe(processes=2, divergence="sinkhorn", teacher={"source": "online"})
    with pytest.raises(RecipeError, match="master_addr"):
        r = load_recipe(ROOT / "configs" / "tiny.yaml").model_dump(mode="json")
        r["runtime"]["distributed"] = {"nodes": 2}
        parse_recipe(r)


def test_the_launcher_command_line():
    from llm_compress.distributed import torchrun_args

    one = torchrun_args(_recipe(processes=2).runtime, Path("/x/spec.json"), "cpu")
    assert one[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node" in one
    assert one[-4:] == ["llm_compress.worker", "/x/spec.json", "--device", "cpu"] and one[-5] == "--module"
    two = torchrun_args(_recipe(processes=2, nodes=2, port=29400).runtime, Path("s"), "cuda")
    assert two[3:13] == ["--nnodes", "2", "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", "29400",
                         "--nproc_per_node", "2"]


def _quantize(data: dict, out: Path, processes: int, method: str = "gptq"):
    from llm_compress.quantize.apply import run

    r = load_recipe(ROOT / "configs" / "tiny.yaml").model_dump(mode="json")
    r["quantize"]["scheme"] = {"method": method, "setting": "W4A16", "group_size": 32, "calibration": {"samples": 48}}
    r["runtime"]["distributed"] = {"processes": processes}
    recipe = parse_recipe(r)
    out.mkdir(parents=True)
    return run(recipe.quantize, recipe.models, recipe.runtime, model_dir=Path(data["teacher_ref"]), out_dir=out,
               calib_path=Path(data["train_path"]))


@pytest.mark.slow  # torchrun
def test_gptq_calibrates_on_two_processes_like_one(data, tmp_path):
    """GPTQ with 2 ranks: each runs half the calibration batches, the Hessians are summed over the ranks before every
    solve, so the codes are one process's (up to the order of float sums) and the result says 2 processes."""
    from llm_compress.quantize.codes import load_codes

    one = _quantize(data, tmp_path / "one", 1)
    two = _quantize(data, tmp_path / "two", 2)
    assert two.compute["processes"] == 2 and one.compute is None
    assert two.metrics["calibration_rows"] == one.metrics["calibration_rows"] == 48
    assert two.metrics["mean_rel_error"] == pytest.approx(one.metrics["mean_rel_error"], rel=1e-3)
    a, b = (load_codes(p / "model").layers for p in (tmp_path / "one", tmp_path / "two"))
    assert a.keys() == b.keys() and a
    same = sum(int((a[k].codes == b[k].codes).sum()) for k in a) / sum(a[k].codes.numel() for k in a)
    assert same > 0.999, same
