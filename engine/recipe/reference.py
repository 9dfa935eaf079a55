"""The recipe reference (docs/recipes.md), generated from the schema: every field with its type,
default, allowed values and help. ``python -m engine.recipe.reference > docs/recipes.md`` rewrites it
(``make docs``); a test keeps the file equal to what the schema says."""

from __future__ import annotations

import inspect
import sys
from typing import Any

from engine.recipe.schema import SECTIONS, field_specs

_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _type_name(annotation: Any) -> str:
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and getattr(origin, "__name__", "") == "Literal":
        return "choice"
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "null")


def _allowed(spec, section_cls) -> str:
    if spec.choices:
        return ", ".join(f"`{c}`" for c in spec.choices)
    info = section_cls.model_fields[spec.path.split(".", 1)[1]]
    bounds = []
    for m in info.metadata:
        for attr, sign in _BOUNDS.items():
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr)}")
    return ", ".join(bounds)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    specs = field_specs()
    out = ["# Recipe reference", "",
           "Every field a recipe YAML can set, generated from the schema that validates recipes (the same "
           "one gives the app's editor its fields). Recipes are data: they are read and validated, never "
           "executed. On the command line, `--set key=value` takes the short name (`lr`) or the full one "
           "(`train.lr`); a bad value is refused in one line naming the field, the value and what is allowed.",
           ""]
    for section, cls in SECTIONS.items():
        doc = inspect.getdoc(cls) or ""
        out += [f"## `{section}`", ""]
        if doc and doc != inspect.getdoc(cls.__mro__[1]):
            out += [doc, ""]
        out += ["| field | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        for s in (x for x in specs if x.path.split(".", 1)[0] == section):
            default = "(required)" if s.required else f"`{s.default!r}`" if s.default not in ("", None) else \
                ("`''`" if s.default == "" else "`null`")
            out.append(f"| `{s.path.split('.', 1)[1]}` | {_cell(_type_name(s.annotation))} | {_cell(default)} | "
                       f"{_cell(_allowed(s, cls))} | {_cell(s.help)} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
