"""How deep untrusted JSON text and decoded values nest, measured without recursion.

Python's JSON parser, pydantic, Jinja2 and jsonschema all recurse once per level of
a document: 100,000 levels of ``[`` make a ``RecursionError`` (or worse, in native
code) far from where the document came in. Every document from the network is
measured here first, in linear time and constant stack, and refused past
``MAX_JSON_DEPTH``.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Any

MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays and objects in a body, a WebSocket message or a frame.
Real requests nest a few levels (a conversation's message parts, a tool's JSON
Schema: rarely past 20); CPython's recursion limit (1,000) sits far above."""

_ESCAPE = re.compile(rb"\\[\s\S]")
_STRING = re.compile(rb'"[^"]*"?')
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_CONTAINERS = frozenset({list, tuple, dict})


def json_depth_exceeds(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests arrays and objects deeper than ``limit``. Brackets
    inside strings do not count. Text that is not JSON gets an answer too (the
    parser refuses it after): only nesting that a parser would reach matters."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= limit:  # the common case: a glance
        return False
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)  # escapes live in strings; \" would end one early
    # quotes alternate open and close: removing two adjacent ones removes a string
    # without brackets, or joins two strings across text without brackets
    structure = _STRING.sub(b"", raw.translate(None, _NOT_STRUCTURE).replace(b'""', b""))
    if structure.count(b"[") + structure.count(b"{") <= limit:
        return False
    # closers are -1 as signed bytes; an opener past the limit is the answer
    steps = memoryview(structure.translate(_STEP)).cast("b")
    return max(accumulate(steps)) > limit


def value_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a decoded value (lists, tuples, dicts and scalars, as JSON and msgpack
    decode them) nests containers deeper than ``limit``; walks level by level, never
    recursing."""
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            items = container.values() if type(container) is dict else container
            below.extend([item for item in items if type(item) in _CONTAINERS])
        level = below
    return False


def too_deep_message(limit: int = MAX_JSON_DEPTH) -> str:
    return f"nested deeper than {limit} levels"


__all__ = ["MAX_JSON_DEPTH", "json_depth_exceeds", "too_deep_message", "value_depth_exceeds"]
