"""Anthropic's Messages API (``POST /v1/messages``) through ``falcon.testing`` and a
scripted broker: the conversation request a body becomes, fields refused with a 400
that names them, the answer's content blocks in the order the model wrote them,
Anthropic's stream events, its error envelope with honest statuses, and its
``x-api-key`` header."""

from __future__ import annotations

import json
from typing import Any

import falcon.testing
import pytest

from paddler.client import Dispatched, Done, Failed, Reasoning, Tokens, ToolCalls, ToolCallText
from paddler.http import openai
from paddler.http.api_keys import ApiKeys
from paddler.http.common import HttpDeps
from paddler.protocol.messages import Usage
from paddler.protocol.tool_calls import ToolCall, ToolCallOutcome
from tests.unit.fake_broker import FakeClient, FakeLink, FakeStream, SilentStream

KEY = "anthropic-key-1"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
BODY: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Weather in Oslo?"}],
}
CALL = ToolCall("call_1", "get_weather", {"city": "Oslo"})
BLOCK = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
USAGE = Usage(prompt_tokens=10, cached_prompt_tokens=4, content_tokens=3, tool_call_tokens=9)


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient({"model": {"LocalToAgent": "/models/tiny.gguf"}})


@pytest.fixture
def link(fake: FakeClient) -> FakeLink:
    return FakeLink(fake)


@pytest.fixture
def app(link: FakeLink) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(openai.create_app(HttpDeps(link=link)))  # type: ignore[arg-type]


@pytest.fixture
def keyed(fake: FakeClient) -> falcon.testing.TestClient:
    deps = HttpDeps(link=FakeLink(fake), api_keys=ApiKeys.of([KEY]))  # type: ignore[arg-type]
    return falcon.testing.TestClient(openai.create_app(deps))


def _answer(*events: Any, usage: Usage = USAGE) -> list[Any]:
    return [Dispatched("agent-x", "a1", 0), *events, Done(usage)]


def _submitted(app: Any, fake: FakeClient, **fields: Any) -> dict[str, Any]:
    fake.script.append(_answer(Tokens(["ok"])))
    result = app.simulate_post("/v1/messages", json={**BODY, **fields})
    assert result.status_code == 200, result.text
    return fake.submitted[-1]


def _sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of every event of an Anthropic stream."""
    events = []
    for frame in text.split("\n\n"):
        if not frame:
            continue
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:]  # the name is the data's type
        events.append((name_line[7:], data))
    return events


# ---------------------------------------------------------------------- requests


def test_a_conversation_with_tool_use_and_results_maps_to_the_chat_template_s_messages(
    app, fake
) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "a map."},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "They want weather.", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
                {
                    "type": "tool_use",
                    "id": "call_2",
                    "name": "get_weather",
                    "input": {"city": "Lima"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "-3 C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "data"}],
                    "is_error": True,
                },
                {"type": "text", "text": "And"},
                {"type": "text", "text": "tomorrow?"},
            ],
        },
    ]
    system = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]
    request = _submitted(app, fake, system=system, messages=messages)
    assert request["conversation_history"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Look:\n\na map."},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'},
                },
            ],
            "reasoning_content": "They want weather.",
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Error: no\n\ndata"},
        {"role": "user", "content": "And\n\ntomorrow?"},
    ]
    # a system string and a string content go as they are
    plain = _submitted(app, fake, system="Be brief.")
    assert plain["conversation_history"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
    ]


def test_sampling_fields_thinking_and_output_format_reach_the_broker(app, fake) -> None:
    request = _submitted(
        app,
        fake,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        stop_sequences=["\n\nHuman:", "END"],
        metadata={"user_id": "u-1"},
        cache_control={"type": "ephemeral", "ttl": "5m"},
    )
    assert request["max_tokens"] == 64
    assert (request["temperature"], request["top_p"], request["top_k"]) == (0.5, 0.9, 40)
    assert request["stop"] == ["\n\nHuman:", "END"]
    assert request["enable_thinking"] is False  # Anthropic's models think only when asked
    assert request["tools"] == [] and request["parse_tool_calls"] is False
    assert _submitted(app, fake, thinking={"type": "adaptive"})["enable_thinking"] is True
    enabled = {"type": "enabled", "budget_tokens": 64}  # max_tokens keeps it
    assert _submitted(app, fake, thinking=enabled)["enable_thinking"] is True
    assert _submitted(app, fake, thinking=enabled)["reasoning_budget"] is None
    budget = _submitted(app, fake, thinking={"type": "enabled", "budget_tokens": 16})
    assert (budget["enable_thinking"], budget["reasoning_budget"]) == (True, 16)
    assert _submitted(app, fake, thinking={"type": "disabled"})["enable_thinking"] is False
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    formatted = _submitted(
        app, fake, output_config={"format": {"type": "json_schema", "schema": schema}}
    )
    assert formatted["grammar"] == {
        "type": "json_schema",
        "schema": json.dumps(schema, separators=(",", ":")),
    }


@pytest.mark.parametrize(
    ("tool_choice", "expected_choice", "parallel"),
    [
        (None, "auto", True),
        ({"type": "auto"}, "auto", True),
        ({"type": "any"}, "required", True),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        (
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            {"type": "function", "function": {"name": "get_weather"}},
            False,
        ),
    ],
)
def test_tools_and_tool_choice_become_the_native_ones(
    app, fake, tool_choice, expected_choice, parallel
) -> None:
    fields: dict[str, Any] = {"tools": [{**WEATHER, "cache_control": {"type": "ephemeral"}}]}
    if tool_choice is not None:
        fields["tool_choice"] = tool_choice
    request = _submitted(app, fake, **fields)
    assert request["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "description": "The weather in a city",
            },
        }
    ]
    assert request["parse_tool_calls"] is True
    assert request["tool_choice"] == expected_choice
    assert request["parallel_tool_calls"] is parallel


def test_tool_choice_none_hides_the_tools(app, fake) -> None:
    request = _submitted(app, fake, tools=[WEATHER], tool_choice={"type": "none"})
    assert request["tools"] == [] and request["parse_tool_calls"] is False


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"service_tier": "auto"}, "service_tier"),
        ({"container": "c-1"}, "container"),
        ({"system": [{"type": "image", "source": {}}]}, "system[0].type"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"name": "x y", "input_schema": {}}]}, "tools[0].name"),
        ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
        ({"tools": [{**WEATHER, "input_examples": []}]}, "tools[0].input_examples"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "maybe"}}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            },
            "tool_choice.disable_parallel_tool_use",
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {"type": "any"},
                "output_config": {"format": {"type": "json_schema", "schema": {}}},
            },
            "tool_choice",
        ),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({"output_config": {"effort": "high"}}, "output_config.effort"),
        ({"metadata": {"user_id": "u", "tier": 1}}, "metadata.tier"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "messages[1].role",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "redacted_thinking", "data": ""}]}
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "c", "name": "n", "input": {}}],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "c"}]},
                    {"role": "user", "content": "x"},
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            },
            "messages[0].content[0].source.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "c",
                                "content": [{"type": "image", "source": {}}],
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].content[0].type",
        ),
    ],
)
def test_what_is_not_honoured_is_a_400_naming_the_field(app, fake, fields, field) -> None:
    body = {**BODY, **fields}
    body = {name: value for name, value in body.items() if value is not None}
    result = app.simulate_post("/v1/messages", json=body)
    assert result.status_code == 400, result.text
    assert result.json["type"] == "error"
    assert result.json["error"]["type"] == "invalid_request_error"
    assert result.json["error"]["message"].startswith(f"{field}: "), result.json
    assert fake.submitted == []


def test_a_body_that_is_not_json_or_too_large_answers_in_anthropic_s_envelope(app, link) -> None:
    malformed = app.simulate_post("/v1/messages", body="{not json")
    assert malformed.status_code == 400
    assert malformed.json["error"]["type"] == "invalid_request_error"
    small = falcon.testing.TestClient(
        openai.create_app(HttpDeps(link=link, max_body_bytes=100))  # type: ignore[arg-type]
    )
    large = small.simulate_post("/v1/messages", json={**BODY, "system": "x" * 200})
    assert large.status_code == 413
    assert large.json["error"]["type"] == "request_too_large"


# ---------------------------------------------------------------------- answers


def test_the_message_has_the_blocks_in_the_order_the_model_wrote_them(app, fake) -> None:
    fake.script.append(
        _answer(
            Reasoning(["Need ", "weather."]),
            Tokens(["Let me ", "check."]),
            ToolCallText([BLOCK[:10], BLOCK[10:]]),
            ToolCalls(ToolCallOutcome("parsed", [CALL], text=BLOCK)),
        )
    )
    result = app.simulate_post(
        "/v1/messages", json={**BODY, "tools": [WEATHER], "thinking": {"type": "adaptive"}}
    )
    assert result.status_code == 200
    message = result.json
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == (
        "message",
        "assistant",
        "claude-x",
    )
    assert message["content"] == [
        {"type": "thinking", "thinking": "Need weather.", "signature": ""},
        {"type": "text", "text": "Let me check.", "citations": None},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["stop_sequence"] is None
    assert message["usage"] == {
        "input_tokens": 6,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
        "output_tokens": 12,
    }
    assert "tool_call_errors" not in message


@pytest.mark.parametrize(
    ("usage", "reason"),
    [
        (Usage(prompt_tokens=3, content_tokens=64), "max_tokens"),
        (Usage(prompt_tokens=3, content_tokens=5), "end_turn"),
    ],
)
def test_the_stop_reason_says_whether_max_tokens_ended_the_answer(app, fake, usage, reason) -> None:
    fake.script.append(_answer(Tokens(["a"]), usage=usage))
    message = app.simulate_post("/v1/messages", json={**BODY, "stop_sequences": ["Z"]}).json
    assert message["stop_reason"] == reason
    assert message["stop_sequence"] is None
    assert message["model"] == "claude-x"


def test_an_answer_a_stop_sequence_ended_says_which(app, fake) -> None:
    done = Done(Usage(prompt_tokens=3, content_tokens=5), stop_sequence="END")
    events = [Dispatched("agent-x", "a1", 0), Tokens(["a"]), done]
    fake.script += [list(events), list(events)]
    body = {**BODY, "stop_sequences": ["Z", "END"]}
    message = app.simulate_post("/v1/messages", json=body).json
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")
    streamed = app.simulate_post("/v1/messages", json={**body, "stream": True}).text
    assert '"delta":{"stop_reason":"stop_sequence","stop_sequence":"END"}' in streamed.replace(
        " ", ""
    )


def test_a_request_without_a_model_is_answered_with_the_served_one(app, fake) -> None:
    fake.script.append(_answer(Tokens(["a"])))
    body = {name: value for name, value in BODY.items() if name != "model"}
    assert app.simulate_post("/v1/messages", json=body).json["model"] == "tiny.gguf"


def test_a_tool_call_block_that_does_not_parse_stays_text_with_its_reason(app, fake) -> None:
    failed = ToolCallOutcome("validation_failed", errors=["'city' is required"], text=BLOCK)
    fake.script += [_answer(Tokens(["Hm. "]), ToolCallText([BLOCK]), ToolCalls(failed))] * 2
    body = {**BODY, "tools": [WEATHER]}
    message = app.simulate_post("/v1/messages", json=body).json
    assert message["content"] == [{"type": "text", "text": "Hm. " + BLOCK, "citations": None}]
    assert message["stop_reason"] == "end_turn"
    assert message["tool_call_errors"] == [
        {"outcome": "validation_failed", "errors": ["'city' is required"], "text": BLOCK}
    ]
    streamed = _sse(app.simulate_post("/v1/messages", json={**body, "stream": True}).text)
    text = "".join(d["delta"]["text"] for n, d in streamed if n == "content_block_delta")
    assert text == "Hm. " + BLOCK


def test_a_stream_sends_anthropic_s_events_in_order(app, fake) -> None:
    second = ToolCall("call_2", "get_weather", {"city": "Lima"})
    fake.script.append(
        _answer(
            Reasoning(["Need weather."]),
            Tokens(["Let me ", "", "check."]),
            ToolCallText([BLOCK]),
            ToolCalls(ToolCallOutcome("parsed", [CALL, second], text=BLOCK)),
        )
    )
    body = {**BODY, "tools": [WEATHER], "thinking": {"type": "adaptive"}, "stream": True}
    result = app.simulate_post("/v1/messages", json=body)
    assert result.status_code == 200
    assert result.headers["content-type"] == "text/event-stream"
    events = _sse(result.text)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["model"] == "claude-x"
    assert (start["content"], start["stop_reason"]) == ([], None)
    blocks = [d for n, d in events if n == "content_block_start"]
    assert [b["index"] for b in blocks] == [0, 1, 2, 3]
    assert [b["content_block"] for b in blocks] == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": "", "citations": None},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
    ]
    deltas = [(d["index"], d["delta"]) for n, d in events if n == "content_block_delta"]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "Need weather."}),
        (1, {"type": "text_delta", "text": "Let me "}),
        (1, {"type": "text_delta", "text": "check."}),
        (2, {"type": "input_json_delta", "partial_json": '{"city": "Oslo"}'}),
        (3, {"type": "input_json_delta", "partial_json": '{"city": "Lima"}'}),
    ]
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1, 2, 3]
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 6,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 4,
            "output_tokens": 12,
        },
    }


def test_thinking_displayed_as_omitted_keeps_its_block_without_its_text(app, fake) -> None:
    fake.script += [_answer(Reasoning(["secret"]), Tokens(["Hi"]))] * 2
    thinking = {"type": "adaptive", "display": "omitted"}
    message = app.simulate_post("/v1/messages", json={**BODY, "thinking": thinking}).json
    assert message["content"][0] == {"type": "thinking", "thinking": "", "signature": ""}
    body = {**BODY, "thinking": thinking, "stream": True}
    streamed = app.simulate_post("/v1/messages", json=body).text
    assert "secret" not in streamed
    assert [n for n, _ in _sse(streamed)][2:4] == ["content_block_start", "content_block_stop"]


def test_an_error_after_streaming_began_is_an_error_event(app, fake) -> None:
    fake.script.append(
        [Dispatched("agent-x", "a1", 0), Tokens(["a"]), Failed(502, "AgentLost", "agent gone")]
    )
    result = app.simulate_post("/v1/messages", json={**BODY, "stream": True})
    assert result.status_code == 200
    events = _sse(result.text)
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "agent gone"}},
    )
    assert "message_stop" not in [name for name, _ in events]
    assert fake.streams[0].cancelled


def test_a_broker_that_stops_answering_mid_stream_is_an_overloaded_error_event(app, fake) -> None:
    async def submit(request: dict[str, Any]) -> FakeStream:
        return SilentStream([Dispatched("agent-x", "a1", 0), Tokens(["a"])])

    fake.submit = submit  # type: ignore[method-assign]
    events = _sse(app.simulate_post("/v1/messages", json={**BODY, "stream": True}).text)
    assert events[-1][1]["error"]["type"] == "overloaded_error"


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("failed", "status", "kind", "retry_after"),
    [
        (Failed(503, "BufferOverflow", "Buffered requests overflow"), 503, "overloaded_error", "1"),
        (Failed(504, "BufferedRequestTimeout", "waited too long"), 504, "timeout_error", None),
        (Failed(400, "PromptTooLong", "too long"), 400, "invalid_request_error", None),
        (Failed(400, "ChatTemplateError", "template failed"), 400, "invalid_request_error", None),
        (Failed(502, "AgentLost", "agent gone"), 502, "api_error", None),
    ],
)
def test_a_failure_before_the_first_token_has_its_status_in_anthropic_s_envelope(
    app, fake, stream, failed, status, kind, retry_after
) -> None:
    fake.script.append([Dispatched("agent-x", "a1", 0), failed])
    result = app.simulate_post("/v1/messages", json={**BODY, "stream": stream})
    assert result.status_code == status
    assert result.headers["content-type"].startswith("application/json")
    assert result.json == {
        "type": "error",
        "error": {"type": kind, "message": failed.description},
    }
    assert result.headers.get("Retry-After") == retry_after


def test_an_unreachable_broker_is_an_overloaded_503(app, fake, link) -> None:
    fake.unreachable = True
    result = app.simulate_post("/v1/messages", json=BODY)
    assert result.status_code == 503
    assert result.headers["Retry-After"] == "1"
    assert result.json["error"]["type"] == "overloaded_error"
    assert link.resets == 1


def test_unknown_paths_and_methods_under_messages_answer_in_anthropic_s_envelope(app) -> None:
    missing = app.simulate_post("/v1/messages/batches", json=BODY)
    assert missing.status_code == 404
    assert missing.json["error"]["type"] == "not_found_error"
    wrong = app.simulate_get("/v1/messages")
    assert wrong.status_code == 405
    assert wrong.json["type"] == "error"
    # the OpenAI routes keep OpenAI's envelope
    other = app.simulate_post("/v1/nothing", json={})
    assert set(other.json["error"]) == {"message", "type", "param", "code"}


# --------------------------------------------------------------------- API keys


def test_the_key_may_come_as_x_api_key_or_as_a_bearer_token(keyed, fake) -> None:
    fake.script += [_answer(Tokens(["a"]))] * 2
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        result = keyed.simulate_post("/v1/messages", json=BODY, headers=headers)
        assert result.status_code == 200, result.text
    # a wrong header with a right one still serves: every presented key is compared
    both = {"x-api-key": "wrong", "Authorization": f"Bearer {KEY}"}
    fake.script.append(_answer(Tokens(["a"])))
    assert keyed.simulate_post("/v1/messages", json=BODY, headers=both).status_code == 200


def test_a_missing_or_wrong_key_is_a_401_authentication_error(keyed, fake) -> None:
    missing = keyed.simulate_post("/v1/messages", json=BODY)
    assert missing.status_code == 401
    assert missing.json["type"] == "error"
    assert missing.json["error"]["type"] == "authentication_error"
    assert "x-api-key" in missing.json["error"]["message"]
    wrong = keyed.simulate_post("/v1/messages", json=BODY, headers={"x-api-key": "sk-wrong"})
    assert wrong.status_code == 401
    assert wrong.json == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid API key"},
    }
    assert "sk-wrong" not in wrong.text
    assert fake.submitted == []


def test_x_api_key_opens_only_the_messages_and_models_routes(keyed) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    result = keyed.simulate_post("/v1/chat/completions", json=chat, headers={"x-api-key": KEY})
    assert result.status_code == 401
    assert result.json["error"]["code"] == "invalid_api_key"  # OpenAI's envelope there
    # Anthropic's SDKs list and retrieve models with the same header
    for path in ("/v1/models", "/v1/models/tiny.gguf"):
        for headers in ({"x-api-key": KEY}, {"x-api-key": KEY, "anthropic-version": "2023-06-01"}):
            assert keyed.simulate_get(path, headers=headers).status_code == 200
        wrong = keyed.simulate_get(path, headers={"x-api-key": "wrong"})
        assert wrong.status_code == 401


def test_the_openapi_document_describes_the_route_and_its_errors(keyed) -> None:
    document = keyed.simulate_get("/openapi.json").json
    operation = document["paths"]["/v1/messages"]["post"]
    assert operation["security"] == [{"bearer": []}, {"x-api-key": []}]
    assert document["components"]["securitySchemes"]["x-api-key"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "An API key of this service in the header x-api-key: <key>",
    }
    error_ref = operation["responses"]["default"]["content"]["application/json"]["schema"]
    assert error_ref["$ref"].endswith("/AnthropicErrorBody")
    body_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = document["components"]["schemas"][body_ref.rsplit("/", 1)[-1]]
    assert body["required"] == ["max_tokens", "messages"]
    assert {"system", "tools", "tool_choice", "stop_sequences", "thinking"} <= set(
        body["properties"]
    )
    count = document["paths"]["/v1/messages/count_tokens"]["post"]
    count_ref = count["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    counted = document["components"]["schemas"][count_ref.rsplit("/", 1)[-1]]
    assert counted["required"] == ["messages"]
    assert {"system", "tools", "tool_choice", "thinking"} <= set(counted["properties"])
    assert not set(counted["properties"]) & {"max_tokens", "stream", "temperature", "metadata"}


# ---------------------------------------------------------------------- count_tokens


def test_count_tokens_asks_an_agent_to_count_the_conversation(app, fake) -> None:
    fake.script.append(_answer(usage=Usage(prompt_tokens=37)))
    body = {key: value for key, value in BODY.items() if key != "max_tokens"}
    body.update(system="Be brief.", tools=[WEATHER])
    result = app.simulate_post("/v1/messages/count_tokens", json=body)
    assert result.status_code == 200, result.text
    assert result.json == {"input_tokens": 37}
    request = fake.submitted[-1]
    assert request["count_only"] is True
    assert request["conversation_history"][0] == {"role": "system", "content": "Be brief."}
    assert request["tools"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize(
    "field", ["max_tokens", "stream", "temperature", "top_p", "top_k", "stop_sequences"]
)
def test_count_tokens_refuses_what_only_generation_uses(app, fake, field) -> None:
    values = {"max_tokens": 8, "stream": False, "temperature": 0.5, "top_p": 0.5, "top_k": 4}
    body = {
        "messages": BODY["messages"],
        field: values.get(field, ["x"]),
    }
    result = app.simulate_post("/v1/messages/count_tokens", json=body)
    assert result.status_code == 400, result.text
    assert result.json["type"] == "error"
    assert result.json["error"]["message"].startswith(f"{field}: "), result.json
    assert fake.submitted == []


def test_count_tokens_without_messages_is_a_400_in_anthropic_s_envelope(app, fake) -> None:
    result = app.simulate_post("/v1/messages/count_tokens", json={"model": "m"})
    assert result.status_code == 400, result.text
    assert result.json["error"]["type"] == "invalid_request_error"
    assert result.json["error"]["message"].startswith("messages"), result.json
    assert fake.submitted == []


def test_count_tokens_wants_the_key(keyed, fake) -> None:
    body = {"messages": BODY["messages"]}
    assert keyed.simulate_post("/v1/messages/count_tokens", json=body).status_code == 401
    fake.script.append(_answer(usage=Usage(prompt_tokens=5)))
    result = keyed.simulate_post("/v1/messages/count_tokens", json=body, headers={"x-api-key": KEY})
    assert result.status_code == 200, result.text
    assert result.json == {"input_tokens": 5}
