"""OpenAI chat with tools through ``falcon.testing`` and a scripted broker: the
request the agents get, parsed calls in the message and in ``delta.tool_calls``
chunks as OpenAI streams them, ``finish_reason: "tool_calls"``, and a block that is
not a call kept as content with the reason."""

from __future__ import annotations

import json
from typing import Any

import falcon.testing
import pytest

from paddler.client import Dispatched, Done, Tokens, ToolCalls, ToolCallText
from paddler.http import openai
from paddler.http.common import HttpDeps
from paddler.protocol.messages import Usage
from paddler.protocol.tool_calls import ToolCall, ToolCallOutcome
from tests.unit.fake_broker import FakeClient, FakeLink

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
BLOCK = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
CALL = ToolCall("call_abc", "get_weather", {"city": "Oslo"})


@pytest.fixture
def fake() -> FakeClient:
    client = FakeClient({"model": {"LocalToAgent": "/m.gguf"}})
    return client


@pytest.fixture
def app(fake: FakeClient) -> falcon.testing.TestClient:
    deps = HttpDeps(link=FakeLink(fake))  # type: ignore[arg-type]
    return falcon.testing.TestClient(openai.create_app(deps))


def _script(outcome: ToolCallOutcome, before: str = "") -> list[Any]:
    events: list[Any] = [Dispatched("agent-x", "a1", 0)]
    if before:
        events.append(Tokens([before]))
    events += [
        ToolCallText([BLOCK[:20], BLOCK[20:]]),
        ToolCalls(outcome),
        Done(Usage(prompt_tokens=4, content_tokens=2, tool_call_tokens=20)),
    ]
    return events


def _events(text: str) -> list[Any]:
    return [json.loads(block[6:]) for block in text.split("\n\n") if block.startswith("data: {")]


def test_the_agents_get_the_tools_the_choice_and_parse_tool_calls(app, fake) -> None:
    fake.script += [_script(ToolCallOutcome("parsed", [CALL], text=BLOCK))] * 2
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {**CHAT, "tool_choice": choice, "parallel_tool_calls": False}
    assert app.simulate_post("/v1/chat/completions", json=body).status_code == 200
    assert app.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    forced, auto = fake.submitted
    assert forced["tools"] == TOOLS and forced["parse_tool_calls"] is True
    assert forced["tool_choice"] == choice and forced["parallel_tool_calls"] is False
    assert auto["tool_choice"] == "auto" and auto["parallel_tool_calls"] is True


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "x y"}}]}, "tools[0].function.name"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_impossible_tool_requests_are_400_naming_the_field(app, fake, body, param) -> None:
    result = app.simulate_post("/v1/chat/completions", json={**CHAT, **body})
    assert result.status_code == 400, result.text
    assert result.json["error"]["param"] == param
    assert fake.submitted == []


def test_a_parsed_call_is_in_the_message_with_finish_reason_tool_calls(app, fake) -> None:
    fake.script.append(_script(ToolCallOutcome("parsed", [CALL], text=BLOCK)))
    result = app.simulate_post("/v1/chat/completions", json=CHAT).json
    (choice,) = result["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_abc",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        }
    ]
    assert result["usage"]["completion_tokens"] == 22


def test_streamed_calls_come_as_openai_streams_them(app, fake) -> None:
    second = ToolCall("call_def", "get_weather", {"city": "Lima"})
    fake.script.append(_script(ToolCallOutcome("parsed", [CALL, second], text=BLOCK), "Sure. "))
    text = app.simulate_post("/v1/chat/completions", json={**CHAT, "stream": True}).text
    deltas = [e["choices"][0]["delta"] for e in _events(text)]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"content": "Sure. "}
    assert deltas[2:6] == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_def",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Lima"}'}}]},
    ]
    assert _events(text)[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert text.endswith("data: [DONE]\n\n")


def test_a_block_that_is_not_a_call_stays_content_with_its_reason(app, fake) -> None:
    failed = ToolCallOutcome("validation_failed", errors=["'launch' is not one"], text=BLOCK)
    fake.script += [_script(failed, "Hm. "), _script(failed, "Hm. ")]
    message = app.simulate_post("/v1/chat/completions", json=CHAT).json["choices"][0]
    assert message["finish_reason"] == "stop"
    assert message["message"]["content"] == "Hm. " + BLOCK
    assert "tool_calls" not in message["message"]
    assert message["message"]["tool_call_errors"] == [
        {"outcome": "validation_failed", "errors": ["'launch' is not one"], "text": BLOCK}
    ]
    text = app.simulate_post("/v1/chat/completions", json={**CHAT, "stream": True}).text
    content = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in _events(text) if e["choices"]
    )
    assert content == "Hm. " + BLOCK


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"prediction": {"type": "content"}}, "prediction"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ],
)
def test_openai_fields_this_server_does_not_honour_are_refused(app, fake, path, body, param):
    result = app.simulate_post(path, json={**({} if "prompt" in body else CHAT), **body})
    assert result.status_code == 400, result.text
    assert result.json["error"]["param"] == param
    assert fake.submitted == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/responses", {"input": "x"}),
        ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    ],
)
def test_an_answer_read_at_its_end_has_its_text_in_a_few_frames(app, fake, path, body) -> None:
    done = [Dispatched("agent-x", "a1", 0), Tokens(["ok"]), Done(Usage(content_tokens=1))]
    fake.script += [list(done), list(done)]
    assert app.simulate_post(path, json=body).status_code == 200
    assert app.simulate_post(path, json={**body, "stream": True}).status_code == 200
    whole, streamed = fake.submitted
    assert whole["text_interval_ms"] == 100
    assert streamed["text_interval_ms"] == 0  # each token as it comes
