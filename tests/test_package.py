"""One importable package: everything lives under ``llm_compress``, so the project installs beside any other that
ships a top-level ``stages`` or ``flows`` package (the names this project used to install into site-packages)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OLD_NAMES = {"stages", "flows"}


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_code_imports_the_old_top_level_packages():
    files = [p for d in ("llm_compress", "tests", "bench", "docs") for p in (ROOT / d).rglob("*.py")]
    offenders = {str(p.relative_to(ROOT)): sorted(_top_level_imports(p) & OLD_NAMES) for p in files}
    assert not {k: v for k, v in offenders.items() if v}
    assert not (ROOT / "stages").exists() and not (ROOT / "flows").exists()


def test_pyproject_installs_one_package_and_the_compress_command():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["llm_compress*"]
    assert project["project"]["scripts"] == {"compress": "llm_compress.flows.cli:main"}
    installed = {e.name: e.value for e in entry_points(group="console_scripts") if e.name == "compress"}
    assert installed == {"compress": "llm_compress.flows.cli:main"}


@pytest.mark.slow
def test_the_cli_and_the_loading_lines_work_beside_another_projects_stages_package(tmp_path):
    """Another project's ``stages`` and ``flows`` come first on the path and refuse to be imported: validating a
    recipe, loading the flow and the README's loading line still work."""
    for name in OLD_NAMES:
        (tmp_path / "other" / name).mkdir(parents=True)
        (tmp_path / "other" / name / "__init__.py").write_text(
            f"raise ImportError('this is another project\\'s {name} package')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "other"), str(ROOT)])}
    validate = subprocess.run([sys.executable, "-m", "llm_compress.flows.cli", "validate", "configs/demo.yaml"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0 and "valid recipe" in validate.stdout, validate.stdout + validate.stderr
    lines = ("from llm_compress.kv import load_kv_cache\n"
        "from llm_compress.flows.pipeline import compress\n"
        "from llm_compress.modeling import load_causal_lm\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('stages').origin.startswith(%r)\n" % str(tmp_path / "other"))
    loading = subprocess.run([sys.executable, "-c", lines], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert loading.returncode == 0, loading.stderr
