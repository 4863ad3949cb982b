"""Shapes declared once: the base of every request, body and record schema.

A shape is a pydantic v2 model (or a dataclass validated by pydantic). Its field
annotations are the only statement of a field's type and bounds; error texts,
OpenAPI documents and defaults derive from them. Validation happens once, at the
edge where data enters (an HTTP body, a frame from the network); the result
travels as a trusted record.

Errors keep paddler's format: a field path (``conversation_history[0].content``)
and a sentence a person can act on. ``Says`` attaches that sentence to a field
(``Annotated[int, Field(ge=1), Says("must be an integer from 1 to 10")]``);
without one, a sentence is derived from pydantic's error type. A field marked
``whole`` reports every error below it at its own path (``stop`` rather than
``stop[3]``). Unions are discriminated by a callable with ``Tag`` names that
start with ``~``, so that tags never show in a path.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Tag, ValidationError

from paddler.errors import PaddlerError

RANGE_ERRORS = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "too_short",
        "too_long",
        "string_too_short",
        "string_too_long",
    }
)
"""Error types of a value of the right type outside its bounds."""

_PYDANTIC_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dataclass_type": "must be an object",
    "invalid_key": "keys must be strings",
}


@dataclass(frozen=True, slots=True)
class Says:
    """The sentence for errors at a field: ``message``, or ``out_of_range`` for a
    value of the right type outside its bounds. ``whole``: errors anywhere below
    the field are reported at the field."""

    message: str
    out_of_range: str | None = None
    whole: bool = False
    too_long: str | None = None
    """For a list or string longer than allowed, if not ``out_of_range``."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> Any:
        """The sentence documents the field: it becomes the schema's description."""
        schema = handler(core_schema)
        if isinstance(schema, dict) and "$ref" not in schema:
            schema.setdefault("description", f"Value: {self.message}.")
        return schema

    def sentence(self, error_type: str) -> str:
        if self.too_long is not None and error_type in ("too_long", "string_too_long"):
            return self.too_long
        if self.out_of_range is not None and error_type in RANGE_ERRORS:
            return self.out_of_range
        return self.message


class Shape(BaseModel):
    """Base of request and body schemas: strict types (``true`` is not ``1``), no
    unknown fields, no NaN or infinity.

    ``SAYS`` is the sentence for an object of the wrong type; with ``WHOLE`` every
    error inside the object is reported at the object, with ``KEYS_AT_OBJECT`` a
    missing or unknown key is. ``ROOT`` names the object itself when it is the
    top of a document (``request``, ``desired_state``)."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
    )

    SAYS: ClassVar[str] = "must be an object"
    WHOLE: ClassVar[bool] = False
    KEYS_AT_OBJECT: ClassVar[bool] = False
    ROOT: ClassVar[str] = "body"


def schema_without(*names: str) -> ConfigDict:
    """The ``model_config`` of a ``Shape`` subclass whose JSON schema leaves out
    ``names``: fields of its base that it refuses before validating (with a 400 that
    names them), so its OpenAPI schema does not offer them."""

    def drop(schema: dict[str, Any]) -> None:
        properties = schema.get("properties", {})
        for name in names:
            properties.pop(name, None)
        if "required" in schema:
            schema["required"] = [name for name in schema["required"] if name not in names]

    return ConfigDict(**Shape.model_config, json_schema_extra=drop)


def member_tag(name: str) -> Tag:
    """A ``Tag`` of a discriminated union member; it starts with ``~`` so that it
    never shows in an error path."""
    if not name.startswith("~"):
        raise ValueError(f"a union tag must start with '~', got {name!r}")
    return Tag(name)


# --------------------------------------------------------------------- error paths


@dataclass(frozen=True, slots=True)
class _Node:
    says: Says | None = None
    model: type[Shape] | None = None
    low: Any = None
    high: Any = None
    choices: tuple[Any, ...] = ()


def _unwrap(annotation: Any) -> Iterator[tuple[Any, list[Any]]]:
    """The concrete types behind an annotation, each with its ``Annotated`` metadata."""
    metadata: list[Any] = []
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        metadata.extend(extra)
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        for arg in get_args(annotation):
            for inner, inner_metadata in _unwrap(arg):
                yield inner, metadata + inner_metadata
        return
    yield annotation, metadata


def _field_types(shape: Any) -> Iterator[tuple[str, Any, list[Any]]]:
    """``(key, annotation, metadata)`` of every field of a model or a dataclass."""
    if isinstance(shape, type) and issubclass(shape, BaseModel):
        for name, info in shape.model_fields.items():
            yield info.alias or name, info.annotation, list(info.metadata)
    elif hasattr(shape, "__dataclass_fields__"):
        hints = typing.get_type_hints(shape, include_extras=True)
        for name in shape.__dataclass_fields__:
            yield name, hints[name], []


def _walk(annotation: Any, prefix: tuple[str, ...], table: dict[tuple[str, ...], _Node]) -> None:
    for concrete, metadata in _unwrap(annotation):
        says = next((m for m in metadata if isinstance(m, Says)), None)
        low = next((b for m in metadata for b in _bound(m, "ge", "gt")), None)
        high = next((b for m in metadata for b in _bound(m, "le", "lt")), None)
        origin = get_origin(concrete)
        choices = get_args(concrete) if origin is Literal else ()
        if prefix not in table and (says or low is not None or high is not None or choices):
            table[prefix] = _Node(says=says, low=low, high=high, choices=choices)
        if origin is list or origin is tuple:
            for arg in get_args(concrete)[:1]:
                _walk(arg, (*prefix, "[]"), table)
        elif isinstance(concrete, type) and issubclass(concrete, Shape):
            node = table.get(prefix)
            table[prefix] = _Node(says=node.says if node else None, model=concrete)
            for key, field_annotation, field_metadata in _field_types(concrete):
                if field_metadata:
                    field_annotation = Annotated[(field_annotation, *field_metadata)]
                _walk(field_annotation, (*prefix, key), table)


def _bound(metadata: Any, *names: str) -> Iterator[Any]:
    for name in names:
        value = getattr(metadata, name, None)
        if value is not None:
            yield value


_TABLES: dict[Any, dict[tuple[str, ...], _Node]] = {}


def _table(shape: Any) -> dict[tuple[str, ...], _Node]:
    table = _TABLES.get(shape)
    if table is None:
        table = {}
        _walk(shape, (), table)
        _TABLES[shape] = table
    return table


def path_text(parts: list[str | int], root: str) -> str:
    """``conversation_history[0].content`` from ``["conversation_history", 0, "content"]``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or root


def _sentence(error: Any, node: _Node | None) -> str:
    kind = error["type"]
    if node is not None and node.says is not None:
        return node.says.sentence(kind)
    if node is not None and node.model is not None and kind.endswith("_type"):
        return node.model.SAYS
    if kind in RANGE_ERRORS and node is not None and node.low is not None and node.high is not None:
        return f"must be from {node.low} to {node.high}"
    if kind in _PYDANTIC_MESSAGES:
        return _PYDANTIC_MESSAGES[kind]
    if kind == "literal_error" and node is not None and node.choices:
        return f"must be one of {', '.join(str(c) for c in node.choices)}"
    return str(error["msg"])


def _is_key(table: dict[tuple[str, ...], _Node], pattern: tuple[str, ...]) -> bool:
    """Whether the next part of a path under ``pattern`` is an object's key (one the
    shape does not declare: unknown, or an extra of an object that takes extras)."""
    node = table.get(pattern)
    return node is not None and node.model is not None


def first_problem(shape: Any, exc: ValidationError, root: str) -> tuple[str, str]:
    """``(field path, sentence)`` of the first error of ``exc`` against ``shape``."""
    error = exc.errors(include_url=False)[0]
    kind = error["type"]
    custom = (
        kind not in _PYDANTIC_MESSAGES
        and kind not in RANGE_ERRORS
        and kind
        not in (
            "literal_error",
            "union_tag_not_found",
            "union_tag_invalid",
        )
    )
    table = _table(shape)
    parts: list[str | int] = []
    pattern: tuple[str, ...] = ()
    loc = error["loc"]
    for part in loc:
        if isinstance(part, int):
            parts.append(part)
            pattern = (*pattern, "[]")
        elif not part.startswith("~") and ((*pattern, part) in table or _is_key(table, pattern)):
            # anything else names the member of a union pydantic tried
            parts.append(part)
            pattern = (*pattern, part)
    # the outermost field or object that reports everything below it
    for depth in range(len(pattern)):
        node = table.get(pattern[:depth])
        if node is None:
            continue
        if node.says is not None and node.says.whole:
            return path_text(parts[:depth], root), node.says.message
        if node.model is not None and node.model.WHOLE and depth < len(pattern):
            return path_text(parts[:depth], root), node.model.SAYS
    if kind in ("missing", "extra_forbidden") and pattern:
        parent = table.get(pattern[:-1])
        if parent is not None and parent.model is not None and parent.model.KEYS_AT_OBJECT:
            return path_text(parts[:-1], root), parent.model.SAYS
    node = table.get(pattern)
    if custom:
        return path_text(parts, root), str(error["msg"])
    if kind == "extra_forbidden":
        return path_text(parts, root), "unknown field"
    return path_text(parts, root), _sentence(error, node)


S = TypeVar("S", bound=Shape)


class ShapeError(PaddlerError):
    """What ``check`` raises by default: a field path and a sentence."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check(
    shape: type[S],
    value: Any,
    error: Callable[[str, str], Exception] = ShapeError,
    context: dict[str, Any] | None = None,
) -> S:
    """``value`` validated as ``shape``; ``error(field, sentence)`` raised if it is not.
    ``context`` reaches validators that take one (pydantic's validation context)."""
    if not isinstance(value, dict):
        raise error(shape.ROOT, shape.SAYS)
    try:
        return shape.model_validate(value, context=context)
    except ValidationError as exc:
        field, message = first_problem(shape, exc, shape.ROOT)
        raise error(field, message) from None


__all__ = [
    "Says",
    "Shape",
    "ShapeError",
    "check",
    "first_problem",
    "member_tag",
    "path_text",
]
