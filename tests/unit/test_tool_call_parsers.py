"""Tool-call parsing per model family, on answers as the models write them
(``fixtures/tool_call_outputs.json``): the format is found from the template, the
answer streamed in any cut separates into the same content and blocks, each block
parses to the calls; broken, unknown and invalid calls are reported as such."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from paddler.agent.tool_calls import (
    CONTENT,
    DEEPSEEK_CALLS_BEGIN,
    TOOL_CALL,
    ToolCallSplitter,
    forced_grammar,
    parse_block,
    template_messages,
    tool_format,
)
from paddler.protocol.grammar_limits import gbnf_problem

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "tool_call_outputs.json").read_text())
CASES = [
    (family, case) for family, cases in FIXTURES.items() if family != "_about" for case in cases
]

# what each family's template shows the model (excerpts of the templates' own text)
TEMPLATE_MARKS = {
    "hermes": '<tool_call>\n{"name": <function-name>, "arguments": <args>}\n</tool_call>',
    "llama3": '{%- if builtin_tools is defined %}<|python_tag|>{% endif %}"parameters"',
    "mistral": "{{- '[TOOL_CALLS]' }}{{- tool_call.function.name + '[ARGS]' }}",
    "deepseek": "{{'" + DEEPSEEK_CALLS_BEGIN + "'}}```json\n",
    "granite": "{{- '<|tool_call|>' + message['content'] }}",
}


def _tools(calls: list[list[Any]]) -> list[dict[str, Any]]:
    names = {name for name, _ in calls}
    return [{"type": "function", "function": {"name": name}} for name in sorted(names)]


def _split(family: str, text: str, cuts: list[int]) -> tuple[str, list[str], str]:
    splitter = ToolCallSplitter(tool_format(TEMPLATE_MARKS[family]))
    content, tool_text = [], []
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    segments = [s for piece in pieces for s in splitter.push(piece)] + splitter.finish()
    for kind, part in segments:
        (content if kind == CONTENT else tool_text).append(part)
        assert kind in (CONTENT, TOOL_CALL)
    return "".join(content), splitter.finished, "".join(tool_text)


@pytest.mark.parametrize(("family", "case"), CASES, ids=[c["model"] for _, c in CASES])
def test_a_real_answer_splits_and_parses_in_any_cut(family: str, case: dict[str, Any]) -> None:
    fmt = tool_format(TEMPLATE_MARKS[family])
    assert fmt.name == family
    text = case["text"]
    rng = random.Random(7)
    cut_sets = [[], list(range(1, len(text)))] + [
        sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, 6))) for _ in range(20)
    ]
    for cuts in cut_sets:
        content, blocks, tool_text = _split(family, text, cuts)
        assert content == case["content"]
        assert content + tool_text == text
        assert "".join(blocks) == tool_text
    tools = _tools(case["calls"])
    calls = []
    for block in blocks:
        outcome = parse_block(fmt, block, tools)
        assert outcome.outcome == "parsed", outcome
        calls += [[call.name, call.arguments] for call in outcome.calls]
        for call in outcome.calls:
            assert len(call.id) == (9 if family == "mistral" else 29) and call.id.isascii()
    assert calls == case["calls"]


@pytest.mark.parametrize(
    ("family", "text", "outcome", "error"),
    [
        (
            "hermes",
            '<tool_call>\n{"name": "f", "arguments": {"x": 1</tool_call>',
            "parse_failed",
            "JSON",
        ),
        ("hermes", "<tool_call>\nf(x=1)\n</tool_call>", "unrecognized_format", "JSON object"),
        ("hermes", '<tool_call>{"arguments": {}}</tool_call>', "unrecognized_format", "'name'"),
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
            "parse_failed",
            "object",
        ),
        ("llama3", '{"name": "f", "parameters": {"x": "one"}}', "validation_failed", "'one'"),
        ("mistral", "[TOOL_CALLS]oops", "unrecognized_format", "[ARGS]"),
        ("granite", '<|tool_call|>{"name": "f"}', "unrecognized_format", "array"),
        (
            "hermes",
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
            "validation_failed",
            "'g' is not",
        ),
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": ' + "[" * 200 + "]" * 200 + "}</tool_call>",
            "parse_failed",
            "deeper",
        ),
    ],
)
def test_what_is_not_a_valid_call_is_reported(family, text, outcome, error) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
            },
        }
    ]
    reported = parse_block(tool_format(TEMPLATE_MARKS[family]), text, tools)
    assert reported.outcome == outcome, reported
    assert error in " ".join(reported.errors)
    assert reported.text == text and reported.calls == []


def test_content_that_only_mentions_a_marker_start_is_content() -> None:
    splitter = ToolCallSplitter(tool_format(TEMPLATE_MARKS["hermes"]))
    segments = splitter.push(" a <tool") + splitter.push("box> b <") + splitter.finish()
    assert "".join(t for _, t in segments) == " a <toolbox> b <"
    assert {k for k, _ in segments} == {CONTENT} and splitter.finished == []
    llama = ToolCallSplitter(tool_format(TEMPLATE_MARKS["llama3"]))
    segments = llama.push("  Sure: {not a call}") + llama.finish()
    assert segments == [(CONTENT, "  Sure: {not a call}")]


def test_a_template_with_no_known_marker_is_taken_as_hermes() -> None:
    assert tool_format("{{ messages }}").name == "hermes"
    assert tool_format(None).name == "hermes"


def test_arguments_become_objects_only_for_templates_that_write_them_as_json() -> None:
    history = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "content": "2", "tool_call_id": "c"},
    ]
    as_object = template_messages("{{ tool_call.arguments | tojson }}", history)
    assert as_object[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert history[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # not changed
    as_text = template_messages("{{ tool['function']['arguments'] }}", history)
    assert as_text[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'


@pytest.mark.parametrize("family", list(TEMPLATE_MARKS))
def test_the_forced_grammar_of_every_format_is_within_limits(family) -> None:
    tools = [
        {"type": "function", "function": {"name": f"t{i}", "parameters": {"type": "object"}}}
        for i in range(3)
    ]
    fmt = tool_format(TEMPLATE_MARKS[family])
    for only, parallel in ((None, True), ("t1", False)):
        grammar = forced_grammar(fmt, tools, only, parallel)
        assert gbnf_problem(grammar) is None
        assert ("t0" in grammar) == (only is None)
