"""Strict reading of recipe text and scalars: a YAML loader without aliases or duplicate keys,
bounded nesting and numbers, and the scalar rules every recipe section shares.

No project imports: the errors are plain ``ValueError`` (the recipe turns them into
:class:`~optimum_lowrank.errors.RecipeError`).
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, model_validator

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "StrictScalars", "StrictYAMLError", "check_scalars", "excerpt", "load_yaml"]

#: Deepest nesting of mappings and lists a recipe may have.
MAX_DEPTH = 32
#: Most digits an integer in a recipe may have.
MAX_INT_DIGITS = 30
#: Longest excerpt of an input value an error message shows (characters).
EXCERPT_CHARS = 80


class StrictYAMLError(ValueError):
    """Recipe text uses an alias, a duplicate key, too deep a nesting or too long a number."""


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, without building the whole repr of a huge container."""
    if isinstance(value, (dict, list, tuple, set)) and len(value) > 8:
        value = _shrink(value)
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _shrink(value: Any, depth: int = 0) -> Any:
    if depth > 3:
        return Ellipsis
    if isinstance(value, dict):
        return {k: _shrink(v, depth + 1) for k, v in list(value.items())[:8]}
    if isinstance(value, (list, tuple, set)):
        return [_shrink(v, depth + 1) for v in list(value)[:8]]
    return value


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (no expansion bombs), duplicate keys, nesting
    deeper than :data:`MAX_DEPTH` and integers longer than :data:`MAX_INT_DIGITS` digits."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise StrictYAMLError(f"YAML aliases (*{event.anchor}) are not allowed in a recipe (line {event.start_mark.line + 1}); write the value out")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise StrictYAMLError(f"the recipe nests deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                raise StrictYAMLError(f"a mapping key must be a plain value (line {line})") from None
            if first is not None:
                raise StrictYAMLError(f"duplicate key {excerpt(key)} (lines {first} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise StrictYAMLError(f"an integer of {digits} digits (line {node.start_mark.line + 1}); at most {MAX_INT_DIGITS}")
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
# YAML 1.1 reads ``1e-4`` (no dot) as a string; a recipe means a number.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """Parse recipe text with the strict loader.

    Raises
    ------
    StrictYAMLError
        An alias, a duplicate key, nesting deeper than :data:`MAX_DEPTH`, an integer
        of more than :data:`MAX_INT_DIGITS` digits.
    yaml.YAMLError
        Malformed YAML.
    """
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _accepted(annotation: Any) -> set[Any]:
    """The plain types (and Literal values) an annotation accepts, flattened through unions and Optional."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_accepted(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {("literal", type(v)) for v in typing.get_args(annotation)}
    if origin is typing.Annotated:
        return _accepted(typing.get_args(annotation)[0])
    if origin is not None:
        return {origin}
    return {annotation}


def _item_annotation(annotation: Any) -> Any | None:
    """The element annotation of ``tuple[X, ...]`` / ``list[X]`` inside ``annotation``, if one."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _item_annotation(arg)
            if found is not None:
                return found
        return None
    if origin in (tuple, list, set, frozenset):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return args[0] if len(set(map(repr, args))) == 1 else None
    return None


def check_scalar(annotation: Any, value: Any, where: str) -> None:
    """Refuse what pydantic's lax mode would coerce: a boolean for a number, a string for a number,
    a non-finite float. ``where`` names the field in the message.

    Raises
    ------
    ValueError
        The message names the field and what it takes.
    """
    accepted = _accepted(annotation)
    if Any in accepted or object in accepted:
        return
    literal_types = {t for kind, t in (a for a in accepted if isinstance(a, tuple))}
    plain = {a for a in accepted if not isinstance(a, tuple)}
    numeric = bool(plain & {int, float}) or bool(literal_types & {int, float})
    if isinstance(value, bool):
        if bool not in plain and bool not in literal_types and (numeric or str in plain or str in literal_types):
            raise ValueError(f"{where}: {'a number' if numeric else 'a string'}, not {str(value).lower()}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: a finite number, got {value!r}")
    if isinstance(value, str) and numeric and str not in plain and str not in literal_types:
        raise ValueError(f"{where}: a number, got the string {excerpt(value)}")
    if isinstance(value, (list, tuple)):
        item = _item_annotation(annotation)
        if item is not None:
            for index, element in enumerate(value):
                check_scalar(item, element, f"{where}[{index}]")


def check_scalars(model: Any, data: Any) -> None:
    """Apply :func:`check_scalar` to each field of a pydantic ``model`` class given in ``data`` (a mapping).

    Raises
    ------
    ValueError
        For the first offending field.
    """
    if not isinstance(data, dict):
        return
    fields = getattr(model, "model_fields", {})
    for name, value in data.items():
        field = fields.get(name) if isinstance(name, str) else None
        if field is not None:
            check_scalar(field.annotation, value, name)


class StrictScalars(BaseModel):
    """Base that applies :func:`check_scalars` to its input before pydantic's (lax) validation:
    booleans are not numbers, strings are not numbers, floats are finite."""

    @model_validator(mode="before")
    @classmethod
    def _strict_scalars(cls, data: Any) -> Any:
        check_scalars(cls, data)
        return data
