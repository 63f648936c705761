"""The recipe reference, generated from the schema: ``python -m llm_compress.reference > docs/recipe-reference.md``.

Every key is read from :class:`llm_compress.config.Recipe` at run time (its pydantic fields, walked recursively),
never from config classes named here, so the page follows the schema wherever its models are defined. A field
holding one of several methods (a discriminated union such as ``kv.cache``, keyed on ``method``) is listed once per
method, with that method's own fields. ``tests/test_docs.py`` fails when the page differs from this output, and
uses :func:`resolves` to check that every recipe key the docs name exists.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

COMMAND = "python -m llm_compress.reference > docs/recipe-reference.md"


def _strip(ann: Any) -> Any:
    """``Annotated[X, ...]`` -> X (pydantic keeps titles and tags there; the reference shows the type)."""
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    return ann


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType)


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _members(ann: Any) -> list[Any]:
    """The alternatives of a union (Annotated stripped), or ``[ann]``."""
    ann = _strip(ann)
    return [_strip(a) for a in get_args(ann)] if _is_union(ann) else [ann]


def _discriminated(field: FieldInfo) -> tuple[str, list[type[BaseModel]]] | None:
    """(key, member models) when ``field`` holds one of several models told apart by a literal key ("method")."""
    models = [m for m in _members(field.annotation) if _is_model(m)]
    if len(models) < 2:
        return None
    key = field.discriminator if isinstance(field.discriminator, str) else None
    if key is None:  # a callable discriminator: the field every member fixes to one literal value
        common = set.intersection(*(set(m.model_fields) for m in models))
        key = next((k for k in sorted(common) if all(len(_choices(m.model_fields[k].annotation)) == 1
                                                      for m in models)), None)
    return (key, models) if key else None


def _choices(ann: Any) -> tuple:
    ann = _strip(ann)
    return get_args(ann) if get_origin(ann) is Literal else ()


def tag(model: type[BaseModel], key: str) -> str:
    """The value of the literal ``key`` that names ``model`` in its union (e.g. 'kivi')."""
    return str(_choices(model.model_fields[key].annotation)[0])


# ----------------------------------------------------------------------------------------------------------------
# rendering of one field


def _type(ann: Any) -> str:
    ann = _strip(ann)
    if ann is type(None):
        return "null"
    if choices := _choices(ann):
        return "one of " + ", ".join(f"`{c}`" for c in choices) if len(choices) > 1 else f"`{choices[0]}`"
    if _is_union(ann):
        parts = [_type(a) for a in get_args(ann) if a is not type(None)]
        nullable = type(None) in get_args(ann)
        return " or ".join(parts) + (" or null" if nullable else "")
    if get_origin(ann) is list:
        return f"list of {_type(get_args(ann)[0])}"
    if get_origin(ann) is dict:
        k, v = get_args(ann)
        return f"mapping of {_type(k)} to {_type(v)}"
    if _is_model(ann):
        return "section"
    return getattr(ann, "__name__", str(ann))


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}


def _bounds(field: FieldInfo) -> str:
    """The field's numeric limits as the validator applies them: '>= 1, <= 10'."""
    found = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return ", ".join(found)


def _value(v: Any) -> str:
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    if isinstance(v, str):
        return v if v else '""'
    return json.dumps(v, separators=(", ", ": "))


def _default(field: FieldInfo, union: tuple[str, list] | None) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if union and isinstance(value, BaseModel):
        return f"`{tag(type(value), union[0])}`"
    if isinstance(value, BaseModel):
        return ""
    return f"`{_value(value)}`"


def _text(s: str | None) -> str:
    return " ".join((s or "").split()).replace("``", "`")  # one paragraph; reST's double backquotes as Markdown


def _doc(model: type) -> str:
    return _text(inspect.cleandoc(model.__doc__)) if model.__doc__ else ""


def _cell(s: str) -> str:
    return s.replace("|", "\\|")  # GitHub tables read \| as a literal bar, also inside code spans


# ----------------------------------------------------------------------------------------------------------------
# the walk


@dataclass
class Row:
    key: str
    type: str
    default: str
    description: str


@dataclass
class Union_:
    key: str  # dotted key of the field holding the method
    tag_key: str  # the literal key that picks the method ("method", "name")
    description: str
    default: str
    members: list[tuple[str, str, list]]  # (tag value, the model's docstring, its rows and nested unions)


def _model_of(ann: Any) -> tuple[type[BaseModel], str] | None:
    """A section the walk goes into: a model, an optional model, a list of models ('[]') or a mapping of models
    ('<key>'), with the suffix its dotted keys take."""
    ann = _strip(ann)
    models = [m for m in _members(ann) if _is_model(m)]
    if len(models) == 1 and all(m is type(None) or m is models[0] for m in _members(ann)):
        return models[0], ""
    if get_origin(ann) is list and _is_model(_strip(get_args(ann)[0])):
        return _strip(get_args(ann)[0]), "[]"
    if get_origin(ann) is dict and _is_model(_strip(get_args(ann)[1])):
        return _strip(get_args(ann)[1]), ".<key>"
    return None


def walk(model: type[BaseModel], prefix: str, skip: str | None = None) -> list:
    """Rows of ``model``'s fields under ``prefix`` (nested sections flattened into dotted keys), and one
    :class:`Union_` per field that holds one of several methods, in field order. ``skip``: the union's tag field."""
    out: list = []
    for name, field in model.model_fields.items():
        if name == skip:
            continue
        key = f"{prefix}{name}"
        union = _discriminated(field)
        if union:
            tag_key, models = union
            members = [(tag(m, tag_key), _doc(m), walk(m, f"{key}.", skip=tag_key)) for m in models]
            out.append(Union_(key, tag_key, _text(field.description), _default(field, union), members))
            continue
        nested = _model_of(field.annotation)
        if nested and not nested[1]:
            out.extend(walk(nested[0], f"{key}."))
            continue
        bounds = _bounds(field)
        out.append(Row(key, _type(field.annotation) + (f", {bounds}" if bounds else ""), _default(field, None),
                       _text(field.description)))
        if nested:  # a list or mapping of sections: the field, then its items' keys
            out.extend(walk(nested[0], f"{key}{nested[1]}."))
    return out


def _table(rows: list[Row]) -> list[str]:
    if not rows:
        return []
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{_cell(r.key)}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.description)} |" for r in rows]
    return lines + [""]


def _render(items: list, level: int) -> list[str]:
    """The section's keys as one table, then each union as a heading with one sub-heading (and table) per method."""
    lines = _table([i for i in items if isinstance(i, Row)])
    hashes = "#" * level
    for u in (i for i in items if isinstance(i, Union_)):
        tags = ", ".join(f"`{t}`" for t, _, _ in u.members)
        lines += [f"{hashes} `{u.key}`", "",
                  f"One of {tags}, chosen by `{u.key}.{u.tag_key}` (default {u.default})."
                  + (f" {u.description}" if u.description else ""), ""]
        for t, doc, sub in u.members:
            lines += [f"{hashes}# `{u.key}.{u.tag_key}: {t}`", ""]
            if doc:
                lines += [doc, ""]
            lines += _render(sub, level + 2) if sub else ["No parameters.", ""]
    return lines


def reference() -> str:
    """The whole page, Markdown."""
    from llm_compress.config import Recipe

    lines = ["# Recipe reference", "",
             f"<!-- Generated from the schema by `{COMMAND}`; do not edit by hand. -->", "",
             "Every key a recipe may set, with its type, default and meaning, as `compress validate` checks them. "
             "Unknown keys and values outside a field's choices or limits are refused before any work. Keys are "
             "dotted paths, as `--set` takes them (`--set distill.steps=500`). A key that holds one of several "
             "methods lists each method's own fields; the method is picked by its `method` (or `name`) key, and "
             "a method's name alone takes its defaults (`divergence: skew_kl`).", ""]
    top = [f for f in walk(Recipe, "") if isinstance(f, Row) and "." not in f.key]
    lines += ["## Top level", ""] + _table(top)
    for name, field in Recipe.model_fields.items():
        nested = _model_of(field.annotation)
        if not nested:
            continue
        lines += [f"## `{name}`", ""]
        doc = _text(field.description) or _doc(nested[0])
        if doc:
            lines += [doc, ""]
        lines += _render(walk(nested[0], f"{name}."), 3)
    return "\n".join(lines).rstrip("\n") + "\n"


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` (e.g. 'kv.cache.residual', 'gates.stage_ppl_ratio.quantize') names a key of the recipe
    schema: any method's fields count under a union, any key under a mapping (one of its choices if it has them)."""
    from llm_compress.config import Recipe

    current: list[Any] = [Recipe]
    for part in dotted.split("."):
        nxt = []
        for ann in current:
            for m in _members(ann):
                if _is_model(m) and part in m.model_fields:
                    nxt.append(m.model_fields[part].annotation)
                elif get_origin(m) is dict and (not _choices(get_args(m)[0]) or part in _choices(get_args(m)[0])):
                    nxt.append(get_args(m)[1])
                elif get_origin(m) is list and _model_of(m):
                    item = _model_of(m)[0]
                    if part in item.model_fields:
                        nxt.append(item.model_fields[part].annotation)
        if not nxt:
            return False
        current = nxt
    return True


if __name__ == "__main__":
    sys.stdout.write(reference())
