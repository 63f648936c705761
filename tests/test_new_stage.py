"""Adding a stage takes its module and one registry line, nothing else.

A copy of the package gets ``tests/fixtures/prune.py`` (a real magnitude-pruning stage: its own recipe section and
config model, its rules, a run that loads, prunes and saves a model) as ``llm_compress/pipeline/prune.py``, and the
line ``"prune",`` in the registry between unlearn and quantize. A fresh Python process imports that copy (no
monkeypatching) and runs the tiny recipe through it, in the artifacts root where this package already ran the
tiny world: the recipe has a ``prune`` section, gates may name it, the stage runs between distill and quantize in a
folder of its own, quantize takes its model, and no other stage's key or folder changed.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
from typing import get_args
import llm_compress
from llm_compress.config import parse_recipe, load_recipe
from llm_compress.errors import RecipeError
from llm_compress.pipeline import StageName, enabled, make_call, run_local
from llm_compress.stage import Env

root, tiny = sys.argv[1], sys.argv[2]
plain = load_recipe(tiny)
env = Env(device="cpu")
data = plain.model_dump(mode="json")
data["prune"] = {"enabled": True, "sparsity": 0.5}
data["gates"] = {"stage_ppl_ratio": {"prune": 50.0}}
recipe = parse_recipe(data)
try:
    parse_recipe({**data, "prune": {"enabled": True, "sparsity": 1.5}})
    refused = None
except RecipeError as e:
    refused = str(e)
from pathlib import Path
done = run_local(recipe, Path(root) / "with-prune", Path(root))
print(json.dumps({
    "package": llm_compress.__file__,
    "stage_names": list(get_args(StageName)),
    "order": enabled(recipe),
    "refused": refused,
    "done": {s: {k: m.get(k) for k in ("reused", "stage_dir", "inputs", "metrics", "cache_key")}
             for s, m in done.items()},
}))
"""


def _copy_with_prune(dst: Path) -> Path:
    """The package copied to ``dst``, plus the prune module and its registry line; returns the registry file."""
    shutil.copytree(ROOT / "llm_compress", dst / "llm_compress", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "fixtures" / "prune.py", dst / "llm_compress" / "pipeline" / "prune.py")
    registry = dst / "llm_compress" / "pipeline" / "__init__.py"
    text = registry.read_text()
    assert text.count('    "unlearn",\n') == 1
    registry.write_text(text.replace('    "unlearn",\n', '    "unlearn",\n    "prune",\n'))
    return registry


@pytest.mark.slow
def test_a_new_stage_is_its_module_and_one_registry_line(tiny_world, tiny_recipe, tmp_path):
    from llm_compress.config import Recipe
    from llm_compress.pipeline import STAGES, make_call
    from llm_compress.stage import Env

    registry = _copy_with_prune(tmp_path / "src")
    changed = [d for d in difflib.unified_diff((ROOT / "llm_compress/pipeline/__init__.py").read_text().splitlines(),
                                               registry.read_text().splitlines(), lineterm="", n=0)
               if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    assert changed == ['+    "prune",'] and "prune" not in Recipe.model_fields

    root, world = tiny_world
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root), str(ROOT / "configs" / "tiny.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["package"].startswith(str(tmp_path / "src"))  # the copy ran, not this checkout

    # the registry line is all the pipeline needed: a section, a stage name, an order, a gate key
    assert r["stage_names"] == [s.name for s in STAGES[:5]] + ["prune"] + [s.name for s in STAGES[5:]]
    assert r["order"] == ["bootstrap", "data", "distill", "prune", "quantize", "evaluate", "export"]
    assert "prune.sparsity" in r["refused"]
    done = r["done"]
    assert done["prune"]["stage_dir"] == str(root / "with-prune" / "prune") and not done["prune"]["reused"]
    assert abs(done["prune"]["metrics"]["sparsity"] - 0.5) < 0.01
    assert done["quantize"]["inputs"]["model"]["ref"] == str(root / "with-prune" / "prune" / "model")
    assert "prune" in done["evaluate"]["metrics"]["models"]  # evaluate scores every model the run made
    # the stages this package ran before are found by key from the copy: bootstrap and data (tiny_world) ...
    assert done["bootstrap"]["reused"] and done["data"]["reused"]
    assert {s: done[s]["cache_key"] for s in ("bootstrap", "data")} == {s: world[s]["cache_key"] for s in world}
    # ... and distill's key is this package's own (the stages before prune are untouched by it)
    here = make_call(tiny_recipe, "distill", world, Env(device="cpu"))
    assert done["distill"]["cache_key"] == here.key
    assert {Path(m["stage_dir"]).name for m in done.values()} == set(r["order"])  # folders named by stage only
