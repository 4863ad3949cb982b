"""Tool calls on the tiny model: a template in each family's format shows the tools;
a forced ``tool_choice`` makes the random model write a valid call in that format
(the grammar comes from the tools' schemas), which streams as tool-call text, parses
to the call and counts as tool-call tokens; a grammar makes it write content around
a call, or a call that does not fit the tools, reported as such."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import RecordingSink, run, state_for

from paddler.agent.tool_calls import DEEPSEEK_CALLS_BEGIN, tool_format
from paddler.protocol.codec import pack_token_ids
from paddler.protocol.requests import CONTINUATION, validate_request

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                    "metric": {"type": "boolean"},
                },
                "required": ["city", "metric"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]

_TOOLS_SHOWN = (
    "{% if tools %}Tools: {% for t in tools %}{{ t.function.name }} {% endfor %}{% endif %}"
)
TEMPLATES = {
    "hermes": _TOOLS_SHOWN
    + "Call with <tool_call></tool_call>.\n"
    + "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: ",
    "llama3": _TOOLS_SHOWN
    + 'Answer {"name": ..., "parameters": ...} or <|python_tag|>.\n'
    + "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: ",
    "mistral": _TOOLS_SHOWN
    + "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}[TOOL_CALLS]? ",
    "deepseek": _TOOLS_SHOWN
    + DEEPSEEK_CALLS_BEGIN
    + "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: ",
    "deepseek-r1": _TOOLS_SHOWN
    + DEEPSEEK_CALLS_BEGIN
    + "```json\n{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: ",
    "granite": _TOOLS_SHOWN
    + "<|tool_call|>{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}A: ",
}


def _engine(make_engine: Any, tiny_model: Any, template: str) -> Any:
    engine = make_engine(slots=2)
    engine.apply_state(
        {
            **state_for(tiny_model),
            "use_chat_template_override": True,
            "chat_template_override": {"content": template},
        }
    )
    assert engine.status().ready
    return engine


def _request(**fields: Any) -> dict[str, Any]:
    return {
        "conversation_history": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": TOOLS,
        "parse_tool_calls": True,
        "max_tokens": 200,
        **fields,
    }


def _of(sink: RecordingSink, request_id: int, kind: str) -> list[Any]:
    return [v for _, k, rid, v in sink.events if k == kind and rid == request_id]


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_a_named_tool_choice_makes_a_valid_call_in_the_template_s_format(
    make_engine, tiny_model, family
) -> None:
    assert tool_format(TEMPLATES[family]).name == family.removesuffix("-r1")
    engine = _engine(make_engine, tiny_model, TEMPLATES[family])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    sink = run(engine, {1: _request(tool_choice=choice, parallel_tool_calls=False)})
    kind, usage = sink.ends()[1]
    assert kind == "done", usage
    (outcome,) = _of(sink, 1, "tool_calls")
    assert outcome["outcome"] == "parsed", outcome
    (call,) = outcome["calls"]
    assert call["name"] == "get_weather"
    assert call["arguments"]["city"] in ("Paris", "Oslo", "Lima")
    assert isinstance(call["arguments"]["metric"], bool)
    assert len(call["id"]) == (9 if family == "mistral" else 29)
    text = "".join("".join(v) for v in _of(sink, 1, "tool_call"))
    assert text == outcome["text"]
    assert sink.text().get(1, "").strip() == ""
    assert usage["tool_call_tokens"] > 0 and usage["content_tokens"] <= 1


def test_required_calls_one_of_the_tools(make_engine, tiny_model) -> None:
    engine = _engine(make_engine, tiny_model, TEMPLATES["hermes"])
    sink = run(
        engine, {n: _request(tool_choice="required", seed=n, temperature=1.0) for n in (1, 2)}
    )
    for request_id in (1, 2):
        (outcome,) = _of(sink, request_id, "tool_calls")
        assert outcome["outcome"] == "parsed"
        for call in outcome["calls"]:
            assert call["name"] in ("get_weather", "get_time")


def test_content_and_a_call_stream_apart(make_engine, tiny_model) -> None:
    engine = _engine(make_engine, tiny_model, TEMPLATES["hermes"])
    call = '{"name": "get_time", "arguments": {"zone": "CET"}}'
    grammar = {
        "type": "gbnf",
        "grammar": f"root ::= {json.dumps('Let me see. <tool_call>' + call + '</tool_call>')}",
    }
    sink = run(engine, {1: _request(grammar=grammar)})
    assert sink.text()[1] == "Let me see. "
    text = "".join("".join(v) for v in _of(sink, 1, "tool_call"))
    assert text == f"<tool_call>{call}</tool_call>"
    (outcome,) = _of(sink, 1, "tool_calls")
    assert [(c["name"], c["arguments"]) for c in outcome["calls"]] == [
        ("get_time", {"zone": "CET"})
    ]
    usage = sink.ends()[1][1]
    assert usage["content_tokens"] > 0 and usage["tool_call_tokens"] > 0


@pytest.mark.parametrize(
    ("call", "outcome", "error"),
    [
        ('{"name": "get_time", "arguments": {"zone": "EST"}}', "validation_failed", "EST"),
        ('{"name": "launch", "arguments": {}}', "validation_failed", "'launch' is not one"),
        ('{"name": "get_time", "arguments": {"zone": ', "parse_failed", "not valid JSON"),
        ("get_time(zone=CET)", "unrecognized_format", "JSON object"),
    ],
)
def test_a_call_that_does_not_fit_is_reported_not_dropped(
    make_engine, tiny_model, call, outcome, error
) -> None:
    engine = _engine(make_engine, tiny_model, TEMPLATES["hermes"])
    block = f"<tool_call>{call}</tool_call>"
    sink = run(
        engine, {1: _request(grammar={"type": "gbnf", "grammar": f"root ::= {json.dumps(block)}"})}
    )
    (reported,) = _of(sink, 1, "tool_calls")
    assert reported["outcome"] == outcome and reported["calls"] == []
    assert error in " ".join(reported["errors"])
    assert reported["text"] == block


def test_without_parse_tool_calls_the_text_streams_and_nothing_is_parsed(
    make_engine, tiny_model
) -> None:
    engine = _engine(make_engine, tiny_model, TEMPLATES["hermes"])
    choice = {"type": "function", "function": {"name": "get_time"}}
    sink = run(engine, {1: _request(tool_choice=choice, parse_tool_calls=False)})
    assert _of(sink, 1, "tool_calls") == []
    assert "".join("".join(v) for v in _of(sink, 1, "tool_call")).startswith("<tool_call>")


def test_tool_choice_none_shows_no_tools_and_parses_nothing(make_engine, tiny_model) -> None:
    engine = _engine(make_engine, tiny_model, TEMPLATES["hermes"])
    grammar = {"type": "gbnf", "grammar": 'root ::= "<tool_call>{}</tool_call>"'}
    sink = run(engine, {1: _request(tool_choice="none", grammar=grammar)})
    assert sink.text()[1] == "<tool_call>{}</tool_call>"
    assert _of(sink, 1, "tool_calls") == [] and _of(sink, 1, "tool_call") == []
    assert "tool_call_tokens" not in sink.ends()[1][1]


def test_a_call_continued_elsewhere_is_parsed_once(make_engine, tiny_model) -> None:
    engine = _engine(make_engine, tiny_model, TEMPLATES["hermes"])
    other = _engine(make_engine, tiny_model, TEMPLATES["hermes"])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    request = _request(tool_choice=choice, parallel_tool_calls=False)
    reference = run(engine, {1: request})
    (whole,) = _of(reference, 1, "tool_calls")
    frames = reference.frames[1]
    assert len(frames) > 2
    for cut in (1, len(frames) // 2, len(frames) - 1):
        continued = validate_request(request)
        token_ids = [t for _, ids in frames[:cut] for t in ids]
        continued[CONTINUATION] = {"token_ids": pack_token_ids(token_ids)}
        sink = RecordingSink(other)
        other.admit(7, continued)
        while other.active_count():
            other.step(sink)
        (outcome,) = _of(sink, 7, "tool_calls")
        assert [(c["name"], c["arguments"]) for c in outcome["calls"]] == [
            (c["name"], c["arguments"]) for c in whole["calls"]
        ]
        sent = "".join(text for text, _ in frames[:cut])
        rest = "".join("".join(v) for v in _of(sink, 7, "tool_call"))
        assert sent + rest == whole["text"]
        assert sink.ends()[7][1]["tool_call_tokens"] == reference.ends()[1][1]["tool_call_tokens"]
