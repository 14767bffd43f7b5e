"""The pass-option reference of ``docs/recipes.md``, generated from the pass configs' pydantic fields.

Every option of a built-in pass config carries ``Field(description=...)``; this module renders
them as Markdown tables (one per pass, one per shared option group) and rewrites the section of
``docs/recipes.md`` between :data:`BEGIN` and :data:`END`::

    python -m optimum_lowrank.reference docs/recipes.md           # rewrite the section
    python -m optimum_lowrank.reference --check docs/recipes.md   # exit 1 if it is out of date

``optimum-lowrank passes`` prints the same descriptions (:func:`annotation_text`, :func:`default_text`).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from optimum_lowrank.api import PassConfig

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.plugins import PassRegistry

__all__ = ["BEGIN", "END", "annotation_text", "default_text", "options_reference", "update_section"]

BEGIN = "<!-- BEGIN GENERATED: pass options; regenerate with `python -m optimum_lowrank.reference docs/recipes.md` -->"
END = "<!-- END GENERATED: pass options -->"

#: Plugins whose passes the reference documents (third-party passes document themselves).
BUILT_IN = "optimum_lowrank."


def annotation_text(annotation: Any) -> str:
    """A field's type as a reader writes it in YAML: ``int``, ``float or null``, ``"svd" | "asvd"``, ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kept = [annotation_text(a) for a in args if a is not type(None)]
        return " or ".join(kept) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        return f"list of {annotation_text(args[0])}" if args else "list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"{{...}} ({annotation.__name__})"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def default_text(field: Any) -> str:
    """``required`` or the default in YAML spelling (``null``, ``true``, ``[]``)."""
    if field.is_required():
        return "required"
    value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(model: type[BaseModel], names: list[str]) -> list[str]:
    lines = ["| option | type | default | description |", "| --- | --- | --- | --- |"]
    for name in names:
        field = model.model_fields[name]
        lines.append(f"| `{name}` | {_cell(annotation_text(field.annotation))} | `{default_text(field)}` | {_cell(field.description or '')} |")
    return lines


def _groups(config: type[BaseModel]) -> list[type[BaseModel]]:
    """The option groups ``config`` inherits, most specific first (not PassConfig, not the config itself)."""
    return [base for base in config.__mro__[1:]
            if isinstance(base, type) and issubclass(base, BaseModel) and base not in (PassConfig, BaseModel)
            and "__annotations__" in base.__dict__ and any(n in base.model_fields for n in base.__dict__["__annotations__"])]


def _own(model: type[BaseModel]) -> list[str]:
    return [n for n in model.__dict__.get("__annotations__", {}) if n in model.model_fields and n != "targets"]


def options_reference(registry: PassRegistry | None = None) -> str:
    """Markdown: a table of options per built-in pass, then one per shared option group and for ``refine:``."""
    from optimum_lowrank.passes.embedding.refine import RefineConfig
    from optimum_lowrank.plugins import get_registry

    registry = registry or get_registry()
    parts = ["Every pass takes `targets` (required): module names as globs (`encoder.layer.*.intermediate.dense`) or",
             "regular expressions prefixed `re:`; see Targets above. The other options, from the code",
             "(`optimum-lowrank passes` prints the same):", ""]
    groups: dict[type[BaseModel], list[str]] = {}
    for name, entry in registry.entries():
        if not entry.plugin.startswith(BUILT_IN):
            continue
        cls = entry.pass_class
        config = cls.config_class
        parts += [f"### `{name}`", "", f"{cls.summary}." if cls.summary else "", ""]
        own = _own(config)
        if own:
            parts += _table(config, own) + [""]
        shared = _groups(config)
        for group in shared:
            groups.setdefault(group, []).append(name)
        if shared:
            parts += ["Also the shared options of " + ", ".join(f"`{g.__name__}`" for g in shared) + " (below).", ""]
    parts += ["### Shared option groups", ""]
    for group, users in groups.items():
        parts += [f"#### `{group.__name__}` ({', '.join(f'`{u}`' for u in users)})", "", *_table(group, _own(group)), ""]
    parts += ["#### `refine:` (`RefineConfig`, the embedding passes' output-aware refinement)", "",
              *_table(RefineConfig, _own(RefineConfig)), ""]
    return "\n".join(line for line in parts).strip() + "\n"


def update_section(text: str, generated: str) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by ``generated``.

    Raises
    ------
    ValueError
        If either marker is missing, or they are out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers missing or out of order: put {BEGIN!r} and {END!r} around the generated section")
    return text[: start + len(BEGIN)] + "\n\n" + generated + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimum_lowrank.reference", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the Markdown file holding the markers (docs/recipes.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date, without writing")
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    updated = update_section(text, options_reference())
    if args.check:
        if updated != text:
            print(f"{args.path} is out of date: run python -m optimum_lowrank.reference {args.path}", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
