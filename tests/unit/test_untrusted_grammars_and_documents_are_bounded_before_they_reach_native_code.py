"""Grammar limits, JSON depth and msgpack depth: what is refused, at which field, and
that measuring never recurses nor backtracks."""

from __future__ import annotations

import json
import time

import msgpack
import pytest

from paddler.errors import InvalidRequest, ProtocolError
from paddler.protocol.codec import unpack_body
from paddler.protocol.grammar_limits import (
    MAX_GRAMMAR_BYTES,
    MAX_GRAMMAR_DEPTH,
    MAX_GRAMMAR_RULES,
    gbnf_problem,
    json_schema_problem,
)
from paddler.protocol.nesting import MAX_JSON_DEPTH, json_depth_exceeds, value_depth_exceeds
from paddler.protocol.requests import validate_request

DEEP_GRAMMAR = "root ::= " + "(" * 60_000 + '"a"' + ")" * 60_000


def _nested(depth: int) -> str:
    return "root ::= " + "(" * depth + '"a"' + ")" * depth


def _refusal(grammar: dict) -> tuple[str, str]:
    with pytest.raises(InvalidRequest) as caught:
        validate_request({"raw_prompt": "x", "grammar": grammar})
    return caught.value.field, caught.value.message


# ------------------------------------------------------------------------ GBNF


def test_the_grammar_that_crashed_an_agent_is_refused_naming_the_grammar() -> None:
    field, message = _refusal({"type": "gbnf", "grammar": DEEP_GRAMMAR})
    assert field == "grammar.grammar"
    assert message == f"is longer than {MAX_GRAMMAR_BYTES} bytes"


def test_groups_nested_past_the_limit_are_refused_and_at_the_limit_pass() -> None:
    assert gbnf_problem(_nested(MAX_GRAMMAR_DEPTH)) is None
    field, message = _refusal({"type": "gbnf", "grammar": _nested(MAX_GRAMMAR_DEPTH + 1)})
    assert (field, message) == ("grammar.grammar", "nests groups deeper than 64 levels")
    # groups left open count: the parser recursed into them before it failed
    assert gbnf_problem("root ::= " + "(" * (MAX_GRAMMAR_DEPTH + 1) + '"a"') is not None


def test_parentheses_in_strings_classes_and_comments_are_not_groups() -> None:
    many = "(" * 500
    grammar = (
        f'root ::= "{many}" [{many}] "\\"{many}" [\\]{many}] # {many}\n'
        f'other ::= "a" # ) ) ) {many}\n'
    )
    assert gbnf_problem(grammar) is None
    assert validate_request({"raw_prompt": "x", "grammar": {"type": "gbnf", "grammar": grammar}})


def test_syntax_errors_are_left_to_llama_cpp() -> None:
    for grammar in ("root ::= (", "root ::= )))", 'root ::= "unterminated', "root ::= [a-"):
        assert gbnf_problem(grammar) is None, grammar


def test_too_many_rules_and_too_much_repetition_are_refused() -> None:
    rules = "".join(f"r{i} ::= r{i + 1}\n" for i in range(MAX_GRAMMAR_RULES + 1))
    assert "rules" in (gbnf_problem(rules) or "")
    assert "rules" in (gbnf_problem("root ::= " + '"a"? ' * (MAX_GRAMMAR_RULES + 1)) or "")
    assert "repeats" in (gbnf_problem('root ::= "a"{0,1000000}') or "")
    assert "repeats" in (gbnf_problem('root ::= "a"{99999999999999999999}') or "")
    assert "repeats" in (gbnf_problem('root ::= ("a"{0,1999} ) ' * 40) or "")
    assert gbnf_problem('root ::= "a"{0,1999} [0-9]{3,} "b"{2}') is None


def test_measuring_the_worst_grammars_is_cheap() -> None:
    size = MAX_GRAMMAR_BYTES - 16
    worst = [
        "root ::= " + '"a" ' * (size // 4),
        "root ::= " + "[a] " * (size // 4),
        "root ::= " + ")" * size,
        "root ::= " + "(" * 1000 + ")" * (size - 1000),
        'root ::= "' + '\\"' * (size // 2),
        "#" * size,
    ]
    for grammar in worst:
        started = time.perf_counter()
        gbnf_problem(grammar)
        assert time.perf_counter() - started < 0.1


# ------------------------------------------------------------------ JSON Schema


def test_a_json_schema_too_deep_or_too_long_is_refused_naming_the_schema() -> None:
    deep = "[" * (MAX_GRAMMAR_DEPTH + 1) + "]" * (MAX_GRAMMAR_DEPTH + 1)
    assert _refusal({"type": "json_schema", "schema": deep}) == (
        "grammar.schema",
        "nests deeper than 64 levels",
    )
    long = json.dumps({"type": "string", "description": "x" * MAX_GRAMMAR_BYTES})
    assert _refusal({"type": "json_schema", "schema": long})[0] == "grammar.schema"
    shallow = "[" * MAX_GRAMMAR_DEPTH + "]" * MAX_GRAMMAR_DEPTH
    assert json_schema_problem(shallow) is None


def test_patterns_re2_cannot_run_are_refused_and_others_pass() -> None:
    for pattern in ("(a)\\1", "(?=a)b", "(?<!a)b"):
        schema = json.dumps({"type": "string", "pattern": pattern})
        field, message = _refusal({"type": "json_schema", "schema": schema})
        assert field == "grammar.schema" and "linear-time" in message
    keyed = json.dumps({"type": "object", "patternProperties": {"(?=x)": {}}})
    assert "linear-time" in (json_schema_problem(keyed) or "")
    fine = {
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "pattern": "^(a+)+$"},  # a property named pattern
            "code": {"const": {"pattern": "(?=data, not a pattern)"}},
        },
        "patternProperties": {"^x-[a-z]+$": {"type": "integer"}},
    }
    assert json_schema_problem(json.dumps(fine)) is None
    named_like_keywords = {
        "type": "object",
        "properties": {"enum": {"type": "string", "pattern": "(?=x)"}},
    }
    assert "linear-time" in (json_schema_problem(json.dumps(named_like_keywords)) or "")
    both = {"patternProperties": {"^a": {}}, "unevaluatedProperties": False}
    assert "unevaluatedProperties" in (json_schema_problem(json.dumps(both)) or "")


def test_a_schema_that_is_not_json_is_left_to_the_agent() -> None:
    assert json_schema_problem("{not json") is None


# ------------------------------------------------------------------------ depth


@pytest.mark.parametrize("depth", [1, 64, 127, 128, 129, 1000, 100_000])
def test_json_depth_is_measured_exactly_without_recursion(depth: int) -> None:
    arrays = "[" * depth + "]" * depth
    objects = '{"a":' * (depth - 1) + "[]" + "}" * (depth - 1)
    expected = depth > MAX_JSON_DEPTH
    assert json_depth_exceeds(arrays) is expected
    assert json_depth_exceeds(objects.encode()) is expected
    if depth <= 500:
        assert value_depth_exceeds(json.loads(arrays)) is expected
    nested: list = []
    for _ in range(depth - 1):
        nested = [nested]
    assert value_depth_exceeds(nested) is expected


def test_brackets_in_strings_and_escapes_do_not_count() -> None:
    inside = json.dumps(["[" * 1000, '\\"[[[[', {"k[[[": "{{{{" * 500}, [[]]])
    assert not json_depth_exceeds(inside, 3)
    assert json_depth_exceeds(inside, 2)


def test_a_10_mib_body_is_measured_quickly() -> None:
    body = json.dumps([["x" * 10, {"a": [1, "]"]}] for _ in range(300_000)]).encode()
    started = time.perf_counter()
    assert not json_depth_exceeds(body)
    assert time.perf_counter() - started < 1.0


def test_a_msgpack_frame_deeper_than_the_limit_is_a_protocol_error() -> None:
    def nested(depth: int) -> bytes:
        return b"\x91" * (depth - 1) + b"\x90"  # arrays of one array, an empty one inside

    assert unpack_body(nested(MAX_JSON_DEPTH)) is not None
    for depth in (MAX_JSON_DEPTH + 1, 1000, 100_000):
        with pytest.raises(ProtocolError):
            unpack_body(nested(depth))
    deep_map = b"\x81\xa1k" * (MAX_JSON_DEPTH + 1) + b"\xc0"
    with pytest.raises(ProtocolError, match="nested deeper than 128 levels"):
        unpack_body(deep_map)
    # a wide, shallow body with many container bytes in its strings is fine
    wide = msgpack.packb({"text": "\u00e9" * 5000, "list": [[1]] * 1000})
    assert unpack_body(wide)["list"][0] == [1]


# -------------------------------------------------------- the agent's output check


def test_the_output_check_of_an_evil_pattern_is_linear() -> None:
    from paddler.agent.llama.sampling import schema_problem

    evil = {"type": "string", "pattern": "^(a+)+$"}
    by_key = {
        "type": "object",
        "patternProperties": {"^(a+)+$": {"type": "integer"}},
        "additionalProperties": False,
    }
    started = time.perf_counter()
    assert "does not match" in (schema_problem(evil, json.dumps("a" * 10_000 + "b")) or "")
    assert schema_problem(evil, json.dumps("a" * 10_000)) is None
    assert "regexes" in (schema_problem(by_key, json.dumps({"a" * 10_000 + "b": 1})) or "")
    assert "integer" in (schema_problem(by_key, json.dumps({"a" * 10_000: "x"})) or "")
    assert time.perf_counter() - started < 0.5


def test_the_output_check_refuses_what_it_cannot_check_without_raising() -> None:
    from paddler.agent.llama.sampling import schema_problem

    assert "deeper than 128" in (schema_problem({"type": "array"}, "[" * 5000 + "]" * 5000) or "")
    unresolvable = schema_problem({"$ref": "http://example.invalid/schema"}, "1")
    assert unresolvable is not None and "could not be checked" in unresolvable
