"""What a grammar may ask of llama.cpp: bounds checked before a grammar reaches it.

llama.cpp's GBNF parser recurses once per nested group, and its left-recursion
check once per rule along a chain of leftmost rule references; neither has a
limit, so a grammar of 60,000 nested parentheses overflows the engine thread's
stack (SIGSEGV) and takes the agent down. Bounded repetitions (``x{0,1999}``) are
expanded into rules, so a few kilobytes of them cost gigabytes. The HTTP layer, the
broker (``validate_request``) and the agent (before ``llama_sampler_init_grammar``)
all check a grammar with the functions here; each answers ``None`` for a grammar
within the limits, else a sentence. They only refuse what is unsafe: syntax errors
are left to llama.cpp's own answer.

The limits, measured with llama-cpp-python 0.3.36 on x86-64 (a subprocess per try;
llama.cpp spends about 440 bytes of stack per nested group and 70 to 260 per rule in
a leftmost chain):

- nested groups: the parser crashed between 18,000 and 20,000 levels on an 8 MiB
  stack (the main thread's, and a thread's by default on glibc with the usual
  ``ulimit -s``: the agent's engine thread), between 2,000 and 2,400 on 1 MiB,
  between 500 and 600 on 256 KiB. ``MAX_GRAMMAR_DEPTH = 64`` needs about 28 KiB.
- rules in a chain: 40,000 chained rules passed on 8 MiB (80,000 crashed); on
  256 KiB 1,000 passed and 2,000 crashed. 64 KiB of text can chain 30,000 rules
  through nested groups (that needed between 2 and 4 MiB). ``MAX_GRAMMAR_RULES =
  2048`` (rules, groups and repetition operators together; a 4 KiB JSON Schema with
  70 properties converts to about 400) needs at most about 0.5 MiB.
- repetition: 5,000 times ``"a"{0,1999}`` (60 KB) took 8.8 s and 2.3 GB to load, 100
  times (200,000 items) 0.09 s and 45 MB. ``MAX_GRAMMAR_REPETITIONS = 65_536``
  repeated items in all: about a third of that.
- ``MAX_GRAMMAR_BYTES = 64 KiB`` of grammar text (GBNF or JSON Schema); a JSON
  Schema nests at most ``MAX_GRAMMAR_DEPTH`` levels (llama-cpp-python's converter
  recurses per level, and its output grows with the square of the depth).

JSON Schema ``pattern`` and ``patternProperties`` are matched with RE2 (linear time:
no backtracking on model output). A pattern RE2 cannot compile (backreferences,
lookaround) is refused, never handed to Python's ``re``.
"""

from __future__ import annotations

import functools
import json
import re
from itertools import accumulate
from typing import Any

import re2

from paddler.protocol.nesting import json_depth_exceeds

MAX_GRAMMAR_BYTES = 64 * 1024
MAX_GRAMMAR_DEPTH = 64
MAX_GRAMMAR_RULES = 2048
MAX_GRAMMAR_REPETITIONS = 65_536
MAX_PATTERNS = 1024
"""Patterns in one JSON Schema (each compiles to an RE2 program of its own)."""

# strings, character classes and comments: nothing inside them is structure. The
# possessive loops and the optional end keep one match linear, even unterminated.
_OPAQUE = re.compile(
    r'"(?:[^"\\]++|\\[\s\S])*+"?'  # "a string", escapes included
    r"|\[(?:[^\]\\]++|\\[\s\S])*+\]?"  # [a character class]
    r"|#[^\r\n]*+"  # a comment
)
_NOT_PARENS = re.compile(r"[^()]++")
_PAREN_STEP = bytes.maketrans(b"()", b"\x01\xff")  # ) is -1 as a signed byte
_BOUNDED = re.compile(r"\{\s*+(\d++)\s*+(?:,\s*+(\d*+)\s*+)?\}")
_REPEAT_DIGITS = 9
"""A count longer than this is past any limit (and ``int()`` stays cheap)."""


def _too_long(text: str) -> str | None:
    # a character is at most 4 bytes of UTF-8: short text needs no encoding
    if len(text) > MAX_GRAMMAR_BYTES // 4 and (
        len(text) > MAX_GRAMMAR_BYTES
        or len(text.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES
    ):
        return f"is longer than {MAX_GRAMMAR_BYTES} bytes"
    return None


def _group_depth(structure: str) -> int:
    """The deepest nesting of groups in GBNF whose strings, classes and comments
    are blanked. Past a stray ``)`` the parser stops with a syntax error, so the
    running count may go below zero: it only has to bound what the parser reaches."""
    parens = _NOT_PARENS.sub("", structure)
    opened = parens.count("(")
    if opened <= MAX_GRAMMAR_DEPTH:  # the common case: a glance
        return opened
    steps = memoryview(parens.encode("ascii").translate(_PAREN_STEP)).cast("b")
    return max(accumulate(steps))


def gbnf_problem(text: str) -> str | None:
    """Why llama.cpp must not be given the GBNF ``text``, or ``None``."""
    problem = _too_long(text)
    if problem:
        return problem
    structure = _OPAQUE.sub(" ", text)
    symbols = sum(structure.count(s) for s in ("::=", "(", "*", "+", "?", "{"))
    if symbols > MAX_GRAMMAR_RULES:
        return f"has more than {MAX_GRAMMAR_RULES} rules, groups and repetitions"
    if _group_depth(structure) > MAX_GRAMMAR_DEPTH:
        return f"nests groups deeper than {MAX_GRAMMAR_DEPTH} levels"
    repeated = 0
    for match in _BOUNDED.finditer(structure):  # at most MAX_GRAMMAR_RULES of them
        low, high = match.group(1), match.group(2)
        count = high or low
        if len(count) > _REPEAT_DIGITS:
            repeated = MAX_GRAMMAR_REPETITIONS + 1
        else:
            repeated += int(count)
        if repeated > MAX_GRAMMAR_REPETITIONS:
            return f"repeats more than {MAX_GRAMMAR_REPETITIONS} items in all"
    return None


def json_schema_text_problem(text: str) -> str | None:
    """Why a JSON Schema given as text must not be parsed and converted, or ``None``
    (text that is not JSON is left to the agent, which says so)."""
    problem = _too_long(text)
    if problem:
        return problem
    if json_depth_exceeds(text, MAX_GRAMMAR_DEPTH):
        return f"nests deeper than {MAX_GRAMMAR_DEPTH} levels"
    return None


@functools.lru_cache(maxsize=256)
def linear_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2 (linear-time matching); ``re2.error`` if RE2
    cannot express it. Compiled programs are kept for the patterns seen last."""
    options = re2.Options()
    options.log_errors = False  # the error comes back as an exception, not on stderr
    return re2.compile(pattern, options)


# values of these keywords are data, not schemas: a "pattern" key in them is no pattern
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
# these map names to schemas: a property named "enum" or "pattern" is no keyword
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def _patterns(schema: Any) -> tuple[list[str], bool, bool]:
    """Every ``pattern`` and ``patternProperties`` key of a decoded JSON Schema,
    whether there were ``patternProperties`` and whether it says
    ``unevaluatedProperties``; found with an explicit stack."""
    found: list[str] = []
    by_pattern = unevaluated = False
    pending = [schema]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key in _DATA_KEYWORDS:
                    continue
                if key == "pattern" and isinstance(item, str):
                    found.append(item)
                elif key == "patternProperties" and isinstance(item, dict) and item:
                    found.extend(k for k in item if isinstance(k, str))
                    by_pattern = True
                elif key == "unevaluatedProperties":
                    unevaluated = True
                if key in _SCHEMA_MAPS and isinstance(item, dict):
                    pending.extend(item.values())
                else:
                    pending.append(item)
    return found, by_pattern, unevaluated


def schema_patterns_problem(schema: Any) -> str | None:
    """Why the patterns of a decoded JSON Schema cannot be matched in linear time,
    or ``None``. (jsonschema finds the properties ``unevaluatedProperties`` speaks of
    with Python's ``re`` where there are ``patternProperties``: the two together are
    refused.)"""
    patterns, by_pattern, unevaluated = _patterns(schema)
    if len(patterns) > MAX_PATTERNS:
        return f"has more than {MAX_PATTERNS} patterns"
    if by_pattern and unevaluated:
        return "uses unevaluatedProperties together with patternProperties (not supported)"
    for pattern in patterns:
        try:
            linear_pattern(pattern)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            return (
                f"has the pattern {pattern[:80]!r}, which a linear-time matcher cannot "
                f"run ({reason}); backreferences and lookaround are not supported"
            )
    return None


def json_schema_problem(text: str) -> str | None:
    """Everything the protocol checks of a JSON Schema given as text: its size, its
    depth and, if it is JSON, its patterns. ``None`` if it may go on."""
    problem = json_schema_text_problem(text)
    if problem:
        return problem
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        return None  # not JSON: the agent answers GrammarSyntaxError
    return schema_patterns_problem(schema)


__all__ = [
    "MAX_GRAMMAR_BYTES",
    "MAX_GRAMMAR_DEPTH",
    "MAX_GRAMMAR_REPETITIONS",
    "MAX_GRAMMAR_RULES",
    "MAX_PATTERNS",
    "gbnf_problem",
    "json_schema_problem",
    "json_schema_text_problem",
    "linear_pattern",
    "schema_patterns_problem",
]
