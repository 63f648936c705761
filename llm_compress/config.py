"""The recipe: the frame every run has, and the sections the registered stages declare.

A recipe is YAML validated by :class:`Recipe`. The frame is ``name``, ``description``, ``models``, ``data`` and
``runtime`` (:mod:`llm_compress.schema`); every other section belongs to a stage, which declares it next to itself
(``Stage.sections``, :mod:`llm_compress.pipeline`), so :class:`Recipe` is assembled from the registry: adding a stage
adds its sections here without editing this file. Rules that tie sections together are the stages' own
(``Stage.rules``), run by :class:`Recipe` after each section validated on its own.

Unknown fields are rejected (``extra="forbid"``), choices are ``Literal``s, and :func:`load_recipe` turns any
validation failure into a :class:`~llm_compress.errors.RecipeError` that names the field and the allowed values,
before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from llm_compress.errors import RecipeError
from llm_compress.pipeline import STAGES
from llm_compress.schema import DataConfig, ModelsConfig, RuntimeConfig, Strict, check_run_name


class _Frame(Strict):
    """What every recipe is, whatever stages are registered: its name check, the stages' cross-section rules."""

    model_stages: ClassVar[tuple[str, ...]] = ()  # the registered stages that make a model, in run order

    @field_validator("name", check_fields=False)
    @classmethod
    def _name(cls, v: str) -> str:
        check_run_name(v)
        return v

    @model_validator(mode="after")
    def _rules(self):
        for stage in STAGES:
            stage.rules(self)  # a ValueError names the rule's fields; pydantic reports it at the recipe's root
        return self

    @property
    def uses_embedded(self) -> bool:
        """Whether any part of the run reads the embedded world (so the bootstrap stage runs)."""
        sel = self.select.enabled and any(r.split(":")[0] == "embedded" for r in self.select.references())
        return self.models.teacher == "embedded" or self.data.source == "embedded" or sel


def _assemble() -> type[Strict]:
    """The Recipe model: the frame's fields, then each registered stage's sections in run order, then runtime."""
    fields: dict[str, Any] = {
        "name": (str, Field("recipe", description="Recipe name; the default run name starts with it.")),
        "description": (str, ""),
        "models": (ModelsConfig, Field(default_factory=ModelsConfig)),
        "data": (DataConfig, Field(default_factory=DataConfig)),
    }
    for stage in STAGES:
        for section, model in stage.sections.items():
            if section in fields:
                raise TypeError(f"stage '{stage.name}' declares section '{section}', which is already defined")
            fields[section] = (model, Field(default_factory=model))
    fields["runtime"] = (RuntimeConfig, Field(default_factory=RuntimeConfig))
    recipe = create_model("Recipe", __base__=_Frame, __module__=__name__,
                          __doc__="A whole pipeline run. Every section is optional; defaults make the embedded demo.",
                          **fields)
    recipe.model_stages = tuple(s.name for s in STAGES if s.makes_model)  # what gates.stage_ppl_ratio may name
    return recipe


Recipe = _assemble()


# --------------------------------------------------------------------------------------------
# loading


def default_run_name(recipe: "Recipe") -> str:
    """<recipe name>-<first 8 hex of the recipe's hash>: the run folder when none is given."""
    from llm_compress.io import stable_hash

    return f"{recipe.name}-{stable_hash(recipe.model_dump(mode='json'))[:8]}"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else ""
            msg = f"unknown field{(' in ' + parent) if parent else ''}; allowed: {', '.join(_fields_at(parent))}"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {loc or '<recipe>'}: {msg}{shown}")
    return "\n".join(lines)


def _fields_at(dotted: str) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in filter(None, dotted.split(".")):
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to the raw recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise RecipeError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: invalid recipe:\n{_format_errors(e)}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe; any problem is a RecipeError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data or {}, overrides or [])
    return parse_recipe(data, str(path))
