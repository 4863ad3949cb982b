"""OpenAI's Responses API through ``falcon.testing`` and a scripted broker: the request
the agents get from a body and its input items, the response object, the streamed
event sequence with its sequence numbers, function calls and their outputs continued
with ``previous_response_id``, the stored responses (GET, DELETE, 404s), and every
field this server does not honour refused with a 400 naming it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import falcon.testing
import pytest

from paddler.client import (
    Dispatched,
    Done,
    Failed,
    Logprobs,
    Reasoning,
    Tokens,
    ToolCalls,
    ToolCallText,
)
from paddler.errors import RequestFailed
from paddler.http import openai
from paddler.http.asgi import DISCONNECTED
from paddler.http.common import HttpDeps
from paddler.protocol.messages import Usage
from paddler.protocol.tool_calls import ToolCall, ToolCallOutcome
from tests.unit.fake_broker import HANG, FakeClient, FakeLink

TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CALL = ToolCall("call_abc", "get_weather", {"city": "Oslo"})
BLOCK = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient({"model": {"LocalToAgent": "/models/tiny.gguf"}})


@pytest.fixture
def app(fake: FakeClient) -> falcon.testing.TestClient:
    deps = HttpDeps(link=FakeLink(fake))  # type: ignore[arg-type]
    return falcon.testing.TestClient(openai.create_app(deps))


def _answer(*events: Any, usage: Usage | None = None) -> list[Any]:
    return [
        Dispatched("agent-x", "a1", 0),
        *events,
        Done(usage or Usage(prompt_tokens=5, content_tokens=2)),
    ]


def _called(*calls: ToolCall) -> list[Any]:
    return _answer(
        ToolCallText([BLOCK]),
        ToolCalls(ToolCallOutcome("parsed", list(calls), text=BLOCK)),
        usage=Usage(prompt_tokens=5, tool_call_tokens=20),
    )


def _events(text: str) -> list[dict[str, Any]]:
    """The events of a streamed response; each one's ``event:`` line names its type."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[len("data: ") :])
        assert event["type"] == name[len("event: ") :]
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _post(app: falcon.testing.TestClient, **body: Any) -> falcon.testing.Result:
    return app.simulate_post("/v1/responses", json={"model": "m", **body})


# ------------------------------------------------------------------- the request


def test_a_body_becomes_the_conversation_request_a_chat_completion_would_be(app, fake) -> None:
    fake.script.append(_answer(Tokens(["{}"])))
    result = _post(
        app,
        input="Hi",
        instructions="Be brief.",
        max_output_tokens=7,
        temperature=1.5,
        top_p=0.5,
        reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        user="u-1",
        safety_identifier="s",
        prompt_cache_key="k",
        service_tier="flex",
        truncation="disabled",
        background=False,
        max_tool_calls=3,
        stream_options={"include_obfuscation": False},
    )
    assert result.status_code == 200, result.text
    (request,) = fake.submitted
    assert request["conversation_history"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert (request["max_tokens"], request["temperature"], request["top_p"]) == (7, 1.5, 0.5)
    assert request["enable_thinking"] is False
    assert request["grammar"] == {"type": "json_schema", "schema": '{"type":"object"}'}
    assert (request["logprobs"], request["top_logprobs"]) == (True, 2)
    assert request["tools"] == [] and request["parse_tool_calls"] is False
    response = result.json
    assert response["text"]["format"] == {
        "type": "json_schema",
        "name": "s",
        "schema": {"type": "object"},
    }
    assert response["service_tier"] == "default"  # every request is served alike


def test_tools_and_tool_choice_are_the_chat_ones(app, fake) -> None:
    fake.script += [_called(CALL), _answer(Tokens(["x"]))]
    body = {"input": "Weather?", "tools": [TOOL], "parallel_tool_calls": False}
    named = {"type": "function", "name": "get_weather"}
    assert _post(app, **body, tool_choice=named).status_code == 200
    assert _post(app, **body, tool_choice="none").status_code == 200
    forced, hidden = fake.submitted
    assert forced["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": TOOL["parameters"],
            },
        }
    ]
    assert forced["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert forced["parse_tool_calls"] is True and forced["parallel_tool_calls"] is False
    assert hidden["tools"] == []  # none hides them, as in chat


def test_input_items_become_the_messages_the_template_sees(app, fake) -> None:
    fake.script.append(_answer(Tokens(["ok"])))
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi "},
                                                        {"type": "input_text", "text": "there"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "They want weather."}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Oslo"}', "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather",
         "arguments": '{"city": "Lima"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "12 C"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "25 C"}]},
    ]  # fmt: skip
    assert _post(app, input=items, tools=[TOOL]).status_code == 200
    (request,) = fake.submitted
    calls = [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "c2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}},
    ]  # fmt: skip
    assert request["conversation_history"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Hi there"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "reasoning_content": "They want weather.",
            "tool_calls": calls,
        },
        {"role": "tool", "content": "12 C", "tool_call_id": "c1", "name": "get_weather"},
        {"role": "tool", "content": "25 C", "tool_call_id": "c2", "name": "get_weather"},
    ]


# ---------------------------------------------------------------- the response


def test_a_response_has_its_reasoning_its_message_and_usage(app, fake) -> None:
    fake.script.append(
        _answer(
            Reasoning(["Hm", "."]),
            Tokens(["Hel", "lo"]),
            usage=Usage(
                prompt_tokens=9, cached_prompt_tokens=4, content_tokens=2, reasoning_tokens=2
            ),
        )
    )
    result = _post(app, input="Hi", metadata={"k": "v"})
    assert result.status_code == 200, result.text
    response = result.json
    assert response["id"].startswith("resp_") and len(response["id"]) == 37
    assert (response["object"], response["status"], response["model"]) == (
        "response",
        "completed",
        "m",
    )
    reasoning, message = response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Hm."}]
    assert message["id"].startswith("msg_")
    assert {k: message[k] for k in ("type", "role", "status")} == {
        "type": "message",
        "role": "assistant",
        "status": "completed",
    }
    assert message["content"] == [
        {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}
    ]
    assert response["usage"] == {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 13,
    }
    assert response["metadata"] == {"k": "v"} and response["incomplete_details"] is None
    assert response["store"] is True and response["error"] is None


def test_a_response_cut_at_max_output_tokens_is_incomplete(app, fake) -> None:
    fake.script += [_answer(Tokens(["a", "b"])), _answer(Tokens(["a", "b"]))]
    response = _post(app, input="Hi", max_output_tokens=2).json
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
    events = _events(_post(app, input="Hi", max_output_tokens=2, stream=True).text)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_log_probabilities_come_with_the_text_when_included(app, fake) -> None:
    entries = [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]
    script = _answer(Logprobs(entries), Tokens(["a"]))
    fake.script += [script, list(script)]
    body = {"input": "Hi", "include": ["message.output_text.logprobs"]}
    part = _post(app, **body).json["output"][0]["content"][0]
    assert part["logprobs"] == entries
    events = _events(_post(app, **body, stream=True).text)
    (delta,) = [e for e in events if e["type"] == "response.output_text.delta"]
    assert delta["logprobs"] == entries


# ------------------------------------------------------------------ the stream


def test_a_streamed_response_is_the_event_sequence_the_sdk_accumulates(app, fake) -> None:
    fake.script.append(_answer(Reasoning(["Hm"]), Tokens(["Hel", "lo"])))
    result = _post(app, input="Hi", stream=True)
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    events = _events(result.text)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created, in_progress = events[0]["response"], events[1]["response"]
    assert created["status"] == in_progress["status"] == "in_progress"
    assert created["output"] == [] and created["usage"] is None
    message = events[8]["item"]
    assert (message["type"], message["status"], message["content"]) == (
        "message",
        "in_progress",
        [],
    )
    assert {e["item_id"] for e in events[9:14]} == {message["id"]}
    assert {e["output_index"] for e in events[8:15]} == {1}
    assert [e["delta"] for e in events[10:12]] == ["Hel", "lo"]
    assert events[12]["text"] == "Hello"
    completed = events[-1]["response"]
    assert completed["id"] == created["id"] and completed["status"] == "completed"
    assert completed["output"] == [events[7]["item"], events[14]["item"]]
    assert completed["usage"]["output_tokens"] == 2


def test_streamed_calls_are_items_with_their_arguments(app, fake) -> None:
    second = ToolCall("call_def", "get_weather", {"city": "Lima"})
    fake.script.append(_called(CALL, second))
    events = _events(_post(app, input="Weather?", tools=[TOOL], stream=True).text)
    kinds = [e["type"] for e in events[2:-1]]
    assert (
        kinds
        == [
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
        ]
        * 2
    )
    added, delta, done, finished = events[2:6]
    assert added["item"] == {
        "type": "function_call",
        "id": added["item"]["id"],
        "status": "in_progress",
        "call_id": "call_abc",
        "name": "get_weather",
        "arguments": "",
    }
    assert added["item"]["id"].startswith("fc_")
    assert delta["delta"] == done["arguments"] == '{"city": "Oslo"}'
    assert finished["item"] == {
        **added["item"],
        "status": "completed",
        "arguments": '{"city": "Oslo"}',
    }
    assert [e["output_index"] for e in events[2:-1]] == [0] * 4 + [1] * 4
    assert [i["call_id"] for i in events[-1]["response"]["output"]] == ["call_abc", "call_def"]


def test_a_failure_after_streaming_began_is_response_failed(app, fake) -> None:
    fake.script.append(
        [Dispatched("agent-x", "a1", 0), Tokens(["a"]), Failed(502, "AgentLost", "agent lost")]
    )
    events = _events(_post(app, input="Hi", stream=True).text)
    assert [e["type"] for e in events[-3:]] == [
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "agent_lost", "message": "agent lost"}
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["store"] is False
    assert fake.responses == {}  # a failed response is not kept


def test_errors_before_streaming_are_openai_errors_with_honest_statuses(app, fake) -> None:
    fake.script.append([Failed(503, "BufferOverflow", "Buffered requests overflow")])
    result = _post(app, input="Hi", stream=True)
    assert result.status_code == 503
    assert result.headers["retry-after"] == "1"
    assert result.json["error"]["code"] == "buffer_overflow"


def test_a_client_that_leaves_mid_stream_cancels_the_request_and_keeps_nothing(app, fake) -> None:
    gone = asyncio.Event()
    fake.on_hang = gone
    fake.script.append([Dispatched("agent-x", "a1", 0), Tokens(["a"]), HANG, Tokens(["b"])])
    result = app.simulate_post(
        "/v1/responses",
        json={"input": "Hi", "stream": True},
        extras={DISCONNECTED: gone},
    )
    assert [e["type"] for e in _events(result.text)][-1] == "response.output_text.delta"
    assert fake.streams[0].cancelled
    assert fake.responses == {}


def test_a_block_that_is_not_a_call_stays_text_with_its_reason(app, fake) -> None:
    failed = ToolCallOutcome("validation_failed", errors=["no such city"], text=BLOCK)
    script = _answer(Tokens(["Hm. "]), ToolCallText([BLOCK]), ToolCalls(failed))
    fake.script += [script, list(script)]
    (message,) = _post(app, input="Weather?", tools=[TOOL]).json["output"]
    assert message["content"][0]["text"] == "Hm. " + BLOCK
    reason = {"outcome": "validation_failed", "errors": ["no such city"], "text": BLOCK}
    assert message["tool_call_errors"] == [reason]
    events = _events(_post(app, input="Weather?", tools=[TOOL], stream=True).text)
    (streamed,) = events[-1]["response"]["output"]
    assert streamed["content"][0]["text"] == "Hm. " + BLOCK
    assert streamed["tool_call_errors"] == [reason]


# ------------------------------------------------------------- stored responses


def test_a_call_round_trip_continues_with_previous_response_id(app, fake) -> None:
    fake.script += [_called(CALL), _answer(Tokens(["12 C in Oslo."]))]
    first = _post(app, input="Weather?", instructions="Be brief.", tools=[TOOL]).json
    (call,) = first["output"]
    assert (call["type"], call["call_id"], call["arguments"]) == (
        "function_call",
        "call_abc",
        '{"city": "Oslo"}',
    )
    output = {"type": "function_call_output", "call_id": "call_abc", "output": "12 C"}
    second = _post(app, previous_response_id=first["id"], input=[output], tools=[TOOL]).json
    assert second["previous_response_id"] == first["id"]
    assert second["output"][0]["content"][0]["text"] == "12 C in Oslo."
    history = fake.submitted[1]["conversation_history"]
    assert history == [  # the instructions are not carried over
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "content": "12 C", "tool_call_id": "call_abc", "name": "get_weather"},
    ]
    fake.script.append(_answer(Tokens(["You are welcome."])))
    _post(app, previous_response_id=second["id"], input="Thanks!", tools=[TOOL])
    assert fake.submitted[2]["conversation_history"] == [
        *history,
        {"role": "assistant", "content": "12 C in Oslo."},
        {"role": "user", "content": "Thanks!"},
    ]
    stored = json.loads(fake.responses[second["id"]])  # the items, not the messages twice
    assert set(stored) == {"response", "input_items"}


def test_a_response_kept_by_an_earlier_version_is_continued_from_its_messages(app, fake) -> None:
    """Records kept before input items were: their messages, and no input items."""
    ident = "resp_" + "1" * 32
    earlier = {"role": "assistant", "content": "Hi, Ada."}
    part = {"type": "output_text", "text": "Hi, Ada.", "annotations": []}
    item = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant"}
    fake.responses[ident] = json.dumps(
        {
            "response": {"id": ident, "output": [{**item, "content": [part]}]},
            "conversation": [{"role": "user", "content": "I am Ada."}, earlier],
        }
    ).encode()
    fake.script.append(_answer(Tokens(["Ada."])))
    answered = _post(app, previous_response_id=ident, input="Who am I?").json
    assert fake.submitted[0]["conversation_history"] == [
        {"role": "user", "content": "I am Ada."},
        earlier,
        {"role": "user", "content": "Who am I?"},
    ]
    listed = app.simulate_get(
        f"/v1/responses/{answered['id']}/input_items", params={"order": "asc"}
    )
    assert listed.json["data"][0]["id"] == "msg_1"
    gone = app.simulate_get(f"/v1/responses/{ident}/input_items")
    assert gone.status_code == 404 and "earlier version" in gone.json["error"]["message"]


def test_a_streamed_response_is_kept_before_it_completes(app, fake) -> None:
    fake.script += [_answer(Tokens(["Hi!"])), _answer(Tokens(["Again."]))]
    events = _events(_post(app, input="Hi", stream=True).text)
    completed = events[-1]["response"]
    assert completed["store"] is True
    assert app.simulate_get(f"/v1/responses/{completed['id']}").json == completed
    assert _post(app, input="More", previous_response_id=completed["id"]).status_code == 200
    assert fake.submitted[1]["conversation_history"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "More"},
    ]


def test_get_and_delete_a_stored_response(app, fake) -> None:
    fake.script.append(_answer(Tokens(["x"])))
    response = _post(app, input="Hi").json
    path = f"/v1/responses/{response['id']}"
    assert app.simulate_get(path).json == response
    deleted = app.simulate_delete(path)
    assert deleted.status_code == 200
    assert deleted.json == {"id": response["id"], "object": "response", "deleted": True}
    for result in (app.simulate_get(path), app.simulate_delete(path)):
        assert result.status_code == 404
        assert result.json["error"]["message"] == f"Response with id '{response['id']}' not found."


@pytest.mark.parametrize("ident", ["resp_" + "0" * 32, "resp_nope", "x" * 300])
def test_unknown_ids_are_404(app, fake, ident) -> None:
    for result in (
        app.simulate_get(f"/v1/responses/{ident}"),
        app.simulate_delete(f"/v1/responses/{ident}"),
    ):
        assert result.status_code == 404, result.text
        assert result.json["error"]["type"] == "invalid_request_error"
    result = _post(app, input="Hi", previous_response_id=ident)
    assert result.status_code == 404
    assert result.json["error"]["param"] == "previous_response_id"
    assert fake.submitted == []


def test_store_false_keeps_nothing_and_a_response_too_large_says_so(app, fake) -> None:
    fake.script += [_answer(Tokens(["x"])), _answer(Tokens(["y"]))]
    unkept = _post(app, input="Hi", store=False).json
    assert unkept["store"] is False and fake.responses == {}
    assert app.simulate_get(f"/v1/responses/{unkept['id']}").status_code == 404
    fake.max_response_bytes = 10
    too_large = _post(app, input="Hi").json
    assert too_large["status"] == "completed" and too_large["store"] is False
    assert fake.responses == {}


def test_a_balancer_that_cannot_keep_the_response_still_answers_it(app, fake) -> None:
    fake.script.append(_answer(Tokens(["x"])))

    async def unreachable(response_id: str, body: bytes) -> None:
        raise RequestFailed(503, "ResponseStoreFailed", "the state database failed")

    fake.put_response = unreachable  # type: ignore[method-assign]
    response = _post(app, input="Hi")
    assert response.status_code == 200 and response.json["store"] is False


def test_get_refuses_what_it_cannot_do(app, fake) -> None:
    fake.script.append(_answer(Tokens(["x"])))
    ident = _post(app, input="Hi").json["id"]
    assert app.simulate_get(f"/v1/responses/{ident}", params={"stream": "false"}).status_code == 200
    for params, param in (({"stream": "true"}, "stream"), ({"include[]": "x"}, "include[]")):
        result = app.simulate_get(f"/v1/responses/{ident}", params=params)
        assert result.status_code == 400
        assert result.json["error"]["param"] == param


# ------------------------------------------------------------ refused fields


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type"),
        ({"tools": [{**TOOL, "defer_loading": True}]}, "tools[0].defer_loading"),
        ({"tools": [{**TOOL, "name": "x y"}]}, "tools[0].name"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [TOOL]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"input": [{"type": "web_search_call", "id": "w"}]}, "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "i"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
        (
            {"input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"}]},
            "input[0].encrypted_content",
        ),
        ({"input": []}, "input"),
        ({"input": None}, "input"),
        ({"include": ["reasoning.encrypted_content"]}, "include[0]"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"text": {"format": {"type": "json_schema"}, "x": 1}}, "text.x"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
        ({"reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"conversation": 3}, "conversation"),
        ({"conversation": {"ident": "conv_1"}}, "conversation.id"),
        ({"conversation": "conv_1", "previous_response_id": "resp_1"}, "conversation"),
        ({"prompt": {"id": "p"}}, "prompt"),
        ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
        ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"seed": 1}, "seed"),
    ],
)
def test_what_this_server_does_not_honour_is_a_400_naming_it(app, fake, body, param) -> None:
    result = _post(app, **{"input": "Hi", **body})
    assert result.status_code == 400, result.text
    error = result.json["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert fake.submitted == []


def test_the_routes_are_in_the_openapi_document(app) -> None:
    document = app.simulate_get("/openapi.json").json
    paths = document["paths"]
    assert set(paths["/v1/responses"]) == {"post"}
    assert set(paths["/v1/responses/{response_id}"]) == {"get", "delete"}
    assert set(paths["/v1/responses/{response_id}/input_items"]) == {"get"}
    assert set(paths["/v1/responses/{response_id}/cancel"]) == {"post"}
    assert set(paths["/v1/responses/input_tokens"]) == {"post"}
    counted = document["components"]["schemas"]["InputTokensBody"]["properties"]
    assert {"input", "instructions", "tools", "previous_response_id"} <= set(counted)
    assert not set(counted) & {"max_output_tokens", "temperature", "stream", "store"}


# ---------------------------------------------------- input_items, input_tokens, cancel


def test_input_items_list_the_conversation_a_response_was_made_from(app, fake) -> None:
    fake.script += [_called(CALL), _answer(Tokens(["12 C in Oslo."]))]
    first = _post(app, input="Weather?", instructions="Be brief.", tools=[TOOL]).json
    output = {"type": "function_call_output", "call_id": "call_abc", "output": "12 C"}
    note = {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": "Celsius."}],
    }
    second = _post(app, previous_response_id=first["id"], input=[output, note], tools=[TOOL]).json
    listed = app.simulate_get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"})
    assert listed.status_code == 200, listed.text
    page = listed.json
    items = page["data"]
    assert [item["type"] for item in items] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    asked, call, result, developer = items
    assert asked["role"] == "user" and asked["content"] == [
        {"type": "input_text", "text": "Weather?"}
    ]
    assert call == first["output"][0]  # the earlier response's output, as it was answered
    assert result["call_id"] == "call_abc" and result["output"] == "12 C"
    assert result["id"].startswith("fco_") and result["status"] == "completed"
    assert developer["role"] == "developer" and developer["content"][0]["text"] == "Celsius."
    assert (page["object"], page["has_more"]) == ("list", False)
    assert (page["first_id"], page["last_id"]) == (asked["id"], developer["id"])
    assert len({item["id"] for item in items}) == 4
    # newest first by default, paged with limit and after
    newest = app.simulate_get(f"/v1/responses/{second['id']}/input_items", params={"limit": "3"})
    assert [item["id"] for item in newest.json["data"]] == [i["id"] for i in items[::-1][:3]]
    assert newest.json["has_more"] is True
    rest = app.simulate_get(
        f"/v1/responses/{second['id']}/input_items",
        params={"limit": "3", "after": newest.json["last_id"]},
    ).json
    assert [item["id"] for item in rest["data"]] == [asked["id"]] and rest["has_more"] is False
    # the first response's own input is one user message
    (only,) = app.simulate_get(f"/v1/responses/{first['id']}/input_items").json["data"]
    assert only["id"] == asked["id"]


def test_input_items_keep_log_probabilities_only_when_included(app, fake) -> None:
    fake.script += [_answer(Tokens(["Hi"])), _answer(Tokens(["x"]))]
    entry = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}
    sent_back = {
        "type": "message",
        "role": "assistant",
        "id": "msg_1",
        "content": [{"type": "output_text", "text": "Hi", "logprobs": [entry]}],
    }
    response = _post(app, input=[{"role": "user", "content": "Hello"}, sent_back]).json
    path = f"/v1/responses/{response['id']}/input_items"
    plain = app.simulate_get(path).json["data"][0]
    assert plain["id"] == "msg_1" and plain["content"][0]["logprobs"] == []
    for name in ("include", "include[]"):
        params = {name: "message.output_text.logprobs"}
        included = app.simulate_get(path, params=params).json["data"][0]
        assert included["content"][0]["logprobs"] == [entry]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"order": "newest"}, "order"),
        ({"after": "msg_nope"}, "after"),
        ({"include": "reasoning.encrypted_content"}, "include"),
        ({"before": "msg_1"}, "before"),
    ],
)
def test_input_items_refuse_what_they_cannot_do(app, fake, params, param) -> None:
    fake.script.append(_answer(Tokens(["x"])))
    ident = _post(app, input="Hi").json["id"]
    result = app.simulate_get(f"/v1/responses/{ident}/input_items", params=params)
    assert result.status_code == 400, result.text
    assert result.json["error"]["param"] == param


def test_input_items_and_cancel_of_unknown_responses_are_404(app, fake) -> None:
    for ident in ("resp_" + "0" * 32, "resp_nope"):
        assert app.simulate_get(f"/v1/responses/{ident}/input_items").status_code == 404
        assert app.simulate_post(f"/v1/responses/{ident}/cancel").status_code == 404


def test_a_response_is_complete_when_it_is_stored_so_cancel_is_a_400(app, fake) -> None:
    fake.script.append(_answer(Tokens(["x"])))
    ident = _post(app, input="Hi").json["id"]
    result = app.simulate_post(f"/v1/responses/{ident}/cancel")
    assert result.status_code == 400, result.text
    assert result.json["error"]["message"].startswith("Cannot cancel a synchronous response")
    assert app.simulate_get(f"/v1/responses/{ident}").json["status"] == "completed"


def test_input_tokens_asks_an_agent_to_count_what_a_response_would_prefill(app, fake) -> None:
    fake.script += [_answer(Tokens(["x"])), _answer(usage=Usage(prompt_tokens=41))]
    first = _post(app, input="Hi").json
    body = {
        "model": "m",
        "input": "And now?",
        "instructions": "Be brief.",
        "previous_response_id": first["id"],
        "tools": [TOOL],
        "tool_choice": "none",
    }
    result = app.simulate_post("/v1/responses/input_tokens", json=body)
    assert result.status_code == 200, result.text
    assert result.json == {"object": "response.input_tokens", "input_tokens": 41}
    request = fake.submitted[-1]
    assert request["count_only"] is True
    assert request["conversation_history"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "And now?"},
    ]
    assert fake.submitted[-1]["tools"] == []  # tool_choice none hides them, as it would


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_output_tokens": 8}, "max_output_tokens"),
        ({"temperature": 0.5}, "temperature"),
        ({"stream": True}, "stream"),
        ({"store": False}, "store"),
        ({"include": []}, "include"),
        ({"seed": 1}, "seed"),
        ({"input": []}, "input"),
        ({"previous_response_id": "resp_nope"}, "previous_response_id"),
    ],
)
def test_input_tokens_refuses_what_only_generation_uses(app, fake, body, param) -> None:
    result = app.simulate_post("/v1/responses/input_tokens", json={"input": "Hi", **body})
    assert result.status_code in (400, 404), result.text
    assert result.json["error"]["param"] == param
    assert fake.submitted == []
