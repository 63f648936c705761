"""Shared fixtures. Prefect runs against a temporary local server with its own home folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# Before anything imports prefect: a private PREFECT_HOME so tests never touch ~/.prefect, and the
# temporary local server on (with time for its first database migration).
_HOME = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_recipe():
    from llm_compress.config import load_recipe

    return load_recipe(TINY)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """One artifacts folder for the session, so pipeline tests share cached stages."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def tiny_world(tiny_recipe, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny recipe's bootstrap and data stages (embedded corpus, tokenizer and teacher; token files), run once per
    session through the runner without an orchestrator: (its artifacts root, stage -> manifest). A test that runs
    more of the tiny recipe into this root reuses them from the runner's cache. Its own root, not ``artifacts``:
    the Prefect pipeline tests check that their first run computes every stage."""
    from llm_compress.pipeline import make_call, run_call
    from llm_compress.runner import digest_memo_dir
    from llm_compress.stage import Env

    root, done = tmp_path_factory.mktemp("tiny-world"), {}
    with one_torch_thread():
        for stage in ("bootstrap", "data"):
            call = make_call(tiny_recipe, stage, done, Env.resolve(tiny_recipe), digest_memo_dir(root))
            done[stage] = run_call(tiny_recipe, call, root / "world", root)
    return root, done


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server for the session, stopped while pytest's output is still open."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_run(prefect_server, tiny_recipe, artifacts):
    """The tiny recipe run once end to end through the Prefect flow: (artifacts, run name, report)."""
    from llm_compress.flows.pipeline import compress

    report = compress(recipe=tiny_recipe, run_name="tiny-a", artifacts_dir=str(artifacts))
    return artifacts, "tiny-a", report


@contextlib.contextmanager
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run ~10-100x slower with 2 intra-op threads (spinning) than with 1
    (the tiny world's bootstrap: 18 s with 2, 6 s with 1, on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_test_process():
    """Every test in this process on one intra-op thread: the suite's models are tiny, and on 2 busy cores one
    training test took 21 s with torch's 2 threads and 3.7 s with 1 (another 8 s and 0.2 s). Subprocesses (torchrun
    ranks, the CLI) keep their own setting; a flow run in-process sets runtime.threads itself."""
    with one_torch_thread():
        yield


def pytest_collection_modifyitems(config, items):
    """Every test that needs the Prefect test server (directly, or through ``tiny_run``) is slow: the server takes
    ~10 s to start and such tests run flows end to end. ``pytest -m "not slow"`` leaves them out."""
    for item in items:
        if "prefect_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
