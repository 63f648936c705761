"""Every recipe field a stage reads while it runs is in its cache key.

A stage's key holds its config (``Stage.config``: its sections, its ``reads``, seed and device, and what it adds),
so a field the stage reads but does not key would be served stale from the cache when it changes (``models.dtype``
in the KV and export stages was). Here every field read is recorded: each pydantic model of the recipe is watched by
its path (``kv.cache.bits``), and reads are attributed to the stage whose ``run`` is on the stack (what ``inputs``
reads only chooses the stage's inputs, which the key holds by digest). Each read must be covered by the stage's keyed
config (the field or a section above it) or be one of the operational fields (``llm_compress.schema.OPERATIONAL``),
which change how a stage runs, never what it makes.
"""

from __future__ import annotations

import contextlib

import pytest
from pydantic import BaseModel

from llm_compress.config import parse_recipe
from llm_compress.schema import OPERATIONAL


class Reads:
    """Records ``path -> value is a model`` for every field read of the recipe's models, per active stage."""

    def __init__(self, recipe: BaseModel):
        self.paths: dict[int, str] = {}  # id of each model of the recipe -> its dotted path
        self.models: list[BaseModel] = []
        self.by_stage: dict[str, set[str]] = {}
        self.active: list[str] = []
        self._walk(recipe, "")

    def _walk(self, model: BaseModel, path: str) -> None:
        self.paths[id(model)] = path
        self.models.append(model)
        for name in type(model).model_fields:
            value = model.__dict__[name]
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            if isinstance(value, BaseModel):
                self._walk(value, f"{path}.{name}".lstrip("."))
            for key, item in items:  # a model inside a dict or list (export.checks, select.targets)
                if isinstance(item, BaseModel):
                    self._walk(item, f"{path}.{name}".lstrip("."))

    def _seen(self, model: BaseModel, name: str, value) -> None:
        path = self.paths.get(id(model))
        if path is not None and self.active and not isinstance(value, BaseModel):  # leaves only
            self.by_stage.setdefault(self.active[-1], set()).add(f"{path}.{name}".lstrip("."))

    @contextlib.contextmanager
    def watching(self, monkeypatch):
        reads = self
        for cls in {type(m) for m in self.models}:
            original = cls.__getattribute__

            def getattribute(obj, name, _original=original):
                value = _original(obj, name)
                if name in type(obj).model_fields:
                    reads._seen(obj, name, value)
                return value

            monkeypatch.setattr(cls, "__getattribute__", getattribute)
        original_dump = BaseModel.model_dump

        def dump(obj, *args, **kwargs):  # a whole sub-tree handed on as a dict is a read of all of it
            path = reads.paths.get(id(obj))
            if path is not None and reads.active:
                reads.by_stage.setdefault(reads.active[-1], set()).add(f"{path or '<recipe>'}.*")
            return original_dump(obj, *args, **kwargs)

        monkeypatch.setattr(BaseModel, "model_dump", dump)
        yield self

    def attribute(self, stage, method: str, monkeypatch) -> None:
        """Reads made inside ``stage.<method>`` count as the stage's."""
        original = getattr(type(stage), method)

        def wrapped(obj, *args, _original=original, _name=stage.name, **kwargs):
            self.active.append(_name)
            try:
                return _original(obj, *args, **kwargs)
            finally:
                self.active.pop()

        monkeypatch.setattr(type(stage), method, wrapped)


def _keyed_paths(config: dict, prefix: str = "") -> tuple[set[str], set[str]]:
    """The dotted paths of a stage's keyed config: (its values, its sub-mappings). {'kv': {'eval_rows': 4}} ->
    ({'kv.eval_rows'}, {'kv'}): a partial mapping keys its values, not every field of the section it names."""
    leaves, nodes = set(), set()
    for k, v in config.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            nodes.add(path)
            sub_leaves, sub_nodes = _keyed_paths(v, path + ".")
            leaves, nodes = leaves | sub_leaves, nodes | sub_nodes
        else:
            leaves.add(path)
    return leaves, nodes


def uncovered(read: set[str], config: dict) -> list[str]:
    """The reads that neither the keyed config nor the operational fields cover. A read is a field (covered by its
    own value, or by a value above it: a list, a mapping, a whole section dumped into the config), or a
    ``<path>.*``, a model dumped whole (covered by the mapping at its path)."""
    leaves, nodes = _keyed_paths(config)
    leaves |= set(OPERATIONAL)

    def covered(p: str) -> bool:
        if p.endswith(".*"):
            return p[:-2] in nodes or covered(p[:-2])
        return any(p == k or p.startswith(k + ".") for k in leaves)

    return sorted(p for p in read if not covered(p))


def test_uncovered_names_a_read_outside_the_key_and_accepts_one_inside_it():
    config = {"kv": {"cache": {"bits": [4, 4]}, "eval_rows": 4}, "models.dtype": "float32",
              "runtime": {"seed": 0, "device": "cpu"}}
    assert uncovered({"kv.cache.bits", "models.dtype", "runtime.seed", "runtime.progress"}, config) == []
    assert uncovered({"kv.cache.*", "runtime.*"}, config) == []
    assert uncovered({"kv.prefill", "models.trust_remote_code", "runtime.seed", "unlearn.*"}, config) == [
        "kv.prefill", "models.trust_remote_code", "unlearn.*"]


@pytest.mark.slow
def test_every_stage_keys_every_field_it_reads(tiny_recipe, tmp_path, monkeypatch, one_thread):
    import llm_compress.pipeline as pipeline

    data = tiny_recipe.model_dump(mode="json")
    data["select"] = {"enabled": True, "raw": ["embedded"], "targets": [{"paths": ["embedded:prose"]}],
                      "dsir": {"k": 30, "min_length": 10, "processes": 1}}
    data["unlearn"] = {"enabled": True, "method": {"method": "gradient_ascent", "steps": 2}, "retain_rows": 8}
    data["kv"] = {"enabled": True, "cache": {"method": "kivi", "bits": [4, 4], "group_size": 16, "residual": 16}}
    data["export"] = {"formats": ["safetensors"]}
    recipe = parse_recipe(data)
    assert pipeline.enabled(recipe) == [s.name for s in pipeline.STAGES]  # every registered stage runs

    reads = Reads(recipe)
    for stage in pipeline.STAGES:
        reads.attribute(stage, "run", monkeypatch)
    with reads.watching(monkeypatch):
        done = pipeline.run_local(recipe, tmp_path / "run", tmp_path)

    problems = {s: uncovered(reads.by_stage.get(s, set()), done[s]["config"]) for s in done}
    assert all(reads.by_stage.get(s) for s in ("distill", "kv", "export")), reads.by_stage  # the recorder sees reads
    assert not any(problems.values()), "stages read recipe fields their keys do not hold (add them to the " \
        f"stage's reads): { {s: p for s, p in problems.items() if p} }"
