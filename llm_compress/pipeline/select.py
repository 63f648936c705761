"""The select stage: DSIR data selection; the selection becomes the distillation data.
Algorithm: :mod:`llm_compress.dsir`.

``select.raw`` / ``select.targets`` entries are paths, or ``embedded[:domain]`` for the embedded corpus's training
splits. The raw pool is keyed by a digest memo (path, size, mtime, inode), so a multi-GB pool is not re-read to
compute the key on every run.
"""

from __future__ import annotations

import platform
from pathlib import Path

from llm_compress.dsir.config import SelectConfig
from llm_compress.errors import InputError
from llm_compress.stage import Context, Stage, Upstream


def _paths(ref: str, up: Upstream) -> list[str]:
    """Resolve a select.raw / select.targets entry: 'embedded[:domain]' names embedded training splits."""
    scheme, _, domain = ref.partition(":")
    if scheme != "embedded":
        return [ref]
    corpus = Path(up.out("bootstrap", "corpus"))
    domains = sorted(p.name for p in corpus.iterdir() if (p / "train.jsonl").is_file())
    if domain and domain not in domains:
        raise InputError(f"select: unknown embedded domain '{domain}'; the embedded corpus has {domains}")
    return [str(corpus / d / "train.jsonl") for d in ([domain] if domain else domains)]


class Select(Stage):
    name = "select"
    sections = {"select": SelectConfig}
    libraries = ("numpy", "regex", "pyarrow", "datasets")
    uses_runtime = False  # DSIR is seeded by select.dsir.seed and runs on CPU

    def check(self, recipe) -> None:
        missing = [r for r in recipe.select.references() if r.split(":")[0] != "embedded" and not Path(r).exists()]
        if missing:
            raise InputError(f"select: raw/target path(s) not found: {', '.join(missing)}")

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        sel = recipe.select
        inputs = {f"raw{i}": p for i, p in enumerate(p for ref in sel.raw for p in _paths(ref, up))}
        for t, spec in enumerate(sel.targets):
            paths = [p for ref in spec.paths for p in _paths(ref, up)]
            inputs.update({f"target{t}.{j}": p for j, p in enumerate(paths)})
        return inputs

    def run(self, ctx: Context):
        from llm_compress.dsir import TargetSpec, run_selection

        sel, i = ctx.recipe.select, ctx.inputs
        raw = [v for k, v in i.items() if k.startswith("raw")]
        targets = [TargetSpec(paths=[v for k, v in i.items() if k.startswith(f"target{t}.")],
                              proportion=spec.proportion, name=spec.name or f"target{t}")
                   for t, spec in enumerate(sel.targets)]
        # Per-shard results live beside the runs, keyed by shard content + settings: an interrupted
        # selection resumes, and other runs over the same pool reuse the featurized shards.
        from llm_compress.dsir.executors import make_executor

        cache = ctx.cache_dir("dsir")
        cache.mkdir(parents=True, exist_ok=True)  # workers are checked to see it
        executor = make_executor(ctx.recipe.runtime.executor, [*raw, *(p for t in targets for p in t.paths), cache])
        try:
            result = run_selection(sel.dsir, raw, targets, ctx.out_dir, cache_dir=cache,
                                   progress=ctx.recipe.runtime.progress, executor=executor)
            hosts = executor.hosts if executor is not None else [platform.node()]
            result.compute = {"processes": result.metrics["processes"], "devices": [f"{h}:cpu" for h in hosts]}
            return result
        finally:
            if executor is not None:
                executor.close()


STAGE = Select()
