"""The OpenAI-compatible service through ``falcon.testing``, with a fake broker client
(no sockets, no server): request mapping, errors in OpenAI's envelope with honest
statuses, SSE chunk sequences, embeddings, models."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from datetime import UTC, datetime
from typing import Any

import falcon.testing
import pytest

from paddler.client import Dispatched, Done, Embedding, Failed, Logprobs, Reasoning, Tokens
from paddler.errors import BrokerUnreachable
from paddler.http import openai
from paddler.http.asgi import DISCONNECTED
from paddler.http.common import HttpDeps
from paddler.protocol.messages import Usage
from paddler.protocol.requests import DEFAULT_MAX_TOKENS
from tests.unit.fake_broker import HANG, FakeClient, FakeLink, FakeStream

LIMIT = 4096
TINY_STATE = {"model": {"LocalToAgent": "/models/tiny.gguf"}}


def _agent(ready: bool = True) -> dict[str, Any]:
    return {"id": "agent-x", "name": "a1", "slots_total": 2, "ready": ready}


@pytest.fixture
def fake() -> FakeClient:
    client = FakeClient(TINY_STATE)
    client.agent_list = [_agent()]
    return client


@pytest.fixture
def link(fake: FakeClient) -> FakeLink:
    return FakeLink(fake)


@pytest.fixture
def app(link: FakeLink) -> falcon.testing.TestClient:
    deps = HttpDeps(link=link, max_body_bytes=LIMIT)  # type: ignore[arg-type]
    return falcon.testing.TestClient(openai.create_app(deps))


def _generation(pieces: list[str], prompt_tokens: int = 5) -> list[Any]:
    return [
        Dispatched("agent-x", "a1", 0),
        Tokens(pieces),
        Done(Usage(prompt_tokens=prompt_tokens, content_tokens=len(pieces))),
    ]


def _events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, ``[DONE]`` as a string."""
    assert text.endswith("\n\n")
    out: list[Any] = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


# ------------------------------------------------------------------ request mapping


def test_health(app) -> None:
    result = app.simulate_get("/health")
    assert (result.status_code, result.text) == (200, "OK")


def test_a_chat_body_maps_to_a_conversation_request(app, fake) -> None:
    fake.script.append(_generation(["Hel", "lo"]))
    body = {
        "model": "whatever-the-client-says",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}],
            },
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        "max_completion_tokens": 7,
        "max_tokens": 99,
        "temperature": 1.5,
        "top_p": 0.5,
        "seed": 1234,
        "stop": "\n",
        "n": 1,
        "user": "u-1",
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "logit_bias": {"50256": -100},
        "logprobs": False,
        "metadata": {"k": "v"},
        "store": False,
        "parallel_tool_calls": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "object", "required": ["a"]}},
        },
    }
    result = app.simulate_post("/v1/chat/completions", json=body)
    assert result.status_code == 200, result.text
    (request,) = fake.submitted
    assert request["conversation_history"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}],
        },
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert request["max_tokens"] == 7  # max_completion_tokens wins over the legacy field
    assert (request["temperature"], request["top_p"], request["seed"]) == (1.5, 0.5, 1234)
    assert request["stop"] == ["\n"]
    assert request["grammar"] == {
        "type": "json_schema",
        "schema": json.dumps({"type": "object", "required": ["a"]}, separators=(",", ":")),
    }
    assert json.loads(request["grammar"]["schema"]) == {"type": "object", "required": ["a"]}
    assert request["add_generation_prompt"] is True
    assert result.json["model"] == "whatever-the-client-says"


def test_legacy_max_tokens_json_object_and_defaults(app, fake) -> None:
    fake.script += [_generation(["x"]), _generation(["x"])]
    app.simulate_post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 3, "response_format": {"type": "json_object"}, "stop": None},
    )
    app.simulate_post(
        "/v1/chat/completions", json={**CHAT, "response_format": {"type": "text"}, "seed": -1}
    )
    first, second = fake.submitted
    assert first["max_tokens"] == 3
    assert json.loads(first["grammar"]["schema"]) == {"type": "object"}
    assert first["stop"] == []
    # nothing asked: the balancer's defaults
    assert second["max_tokens"] == DEFAULT_MAX_TOKENS
    assert second["grammar"] is None
    assert second["temperature"] is None and second["top_p"] is None
    assert second["seed"] == 2**32 - 1  # OpenAI takes any 64-bit seed; folded to 32 bits


def test_tools_reach_the_chat_template_unless_tool_choice_is_none(app, fake) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    fake.script += [_generation(["x"]), _generation(["x"])]
    app.simulate_post(
        "/v1/chat/completions", json={**CHAT, "tools": tools, "top_k": 40, "min_p": 0.1}
    )
    app.simulate_post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "none"})
    first, second = fake.submitted
    assert first["tools"] == tools and (first["top_k"], first["min_p"]) == (40, 0.1)
    assert second["tools"] == []


def test_a_completion_body_maps_to_a_raw_prompt_request(app, fake) -> None:
    fake.script += [_generation(["a"]), _generation(["b"])]
    app.simulate_post(
        "/v1/completions",
        json={"model": "m", "prompt": "Once", "max_tokens": 4, "stop": ["x", "y"], "top_p": 1},
    )
    app.simulate_post("/v1/completions", json={"model": "m", "prompt": ["Twice"], "seed": 5})
    first, second = fake.submitted
    assert first["raw_prompt"] == "Once"
    assert (first["max_tokens"], first["stop"], first["top_p"]) == (4, ["x", "y"], 1.0)
    assert "conversation_history" not in first
    assert second["raw_prompt"] == "Twice" and second["seed"] == 5


def test_a_request_without_a_model_is_answered_with_the_served_model(app, fake) -> None:
    fake.script.append(_generation(["x"]))
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    assert app.simulate_post("/v1/chat/completions", json=body).json["model"] == "tiny.gguf"


# ----------------------------------------------------------------------- 400 and 413


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": ["hi"]}, "messages[0]"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": None}]},
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0].type",
        ),
        ("/v1/chat/completions", {**CHAT, "model": 5}, "model"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "10"}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 1.5}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "temperature": -0.1}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "top_p"),
        ("/v1/chat/completions", {**CHAT, "seed": "s"}, "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": True}, "seed"),
        ("/v1/chat/completions", {**CHAT, "stop": 5}, "stop"),
        ("/v1/chat/completions", {**CHAT, "stop": [""]}, "stop"),
        ("/v1/chat/completions", {**CHAT, "stop": ["a"] * 17}, "stop"),
        ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "stream_options": 1}, "stream_options"),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": "y"}},
            "stream_options.include_usage",
        ),
        ("/v1/chat/completions", {**CHAT, "frequency_penalty": 3}, "frequency_penalty"),
        ("/v1/chat/completions", {**CHAT, "presence_penalty": "x"}, "presence_penalty"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": [1]}, "logit_bias"),
        ("/v1/chat/completions", {**CHAT, "tools": {"a": 1}}, "tools"),
        ("/v1/chat/completions", {**CHAT, "response_format": "json"}, "response_format"),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "yaml"}},
            "response_format.type",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": 1}}},
            "response_format.json_schema.schema",
        ),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": 5}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": [[1, 2]]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": -5}, "max_tokens"),
        ("/v1/completions", {"model": "m", "prompt": "x", "n": 3}, "n"),
        ("/v1/completions", {"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
        ("/v1/completions", {"model": "m", "prompt": "x", "echo": 1}, "echo"),
        # OpenAI gives the prompt's log-probabilities too; this server has none
        ("/v1/completions", {"model": "m", "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ("/v1/embeddings", {"model": "m"}, "input"),
        ("/v1/embeddings", {"model": "m", "input": []}, "input"),
        ("/v1/embeddings", {"model": "m", "input": [1, 2, 3]}, "input"),
        ("/v1/embeddings", {"model": "m", "input": [[1, 2]]}, "input"),
        ("/v1/embeddings", {"model": "m", "input": ["ok", 5.5]}, "input"),
        ("/v1/embeddings", {"model": "m", "input": ["ok", ""]}, "input"),
        (
            "/v1/embeddings",
            {"model": "m", "input": "x", "encoding_format": "hex"},
            "encoding_format",
        ),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"model": ["m"], "input": "x"}, "model"),
        # a field this server does not know, a typo among them, is named, not dropped
        ("/v1/chat/completions", {**CHAT, "temprature": 0}, "temprature"),
        ("/v1/chat/completions", {**CHAT, "repeat_penalty": 1.1}, "repeat_penalty"),
        ("/v1/chat/completions", {**CHAT, "store": True}, "store"),
        ("/v1/chat/completions", {**CHAT, "verbosity": "low"}, "verbosity"),
        ("/v1/chat/completions", {**CHAT, "metadata": {"k": 1}}, "metadata"),
        (
            "/v1/chat/completions",
            {**CHAT, "prompt_cache_retention": "24h"},
            "prompt_cache_retention",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "chat_template_kwargs": {"add_vision_id": True}},
            "chat_template_kwargs.add_vision_id",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "none"},
            "chat_template_kwargs.enable_thinking",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
            "stream_options.x",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_object", "schema": {}}},
            "response_format.schema",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "cache": 1}}]},
            "tools[0].function.cache",
        ),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}, "x": 1},
            },
            "tool_choice.x",
        ),
        ("/v1/completions", {"model": "m", "prompt": "x", "cache_prompt": True}, "cache_prompt"),
        ("/v1/completions", {"model": "m", "prompt": "x", "metadata": {}}, "metadata"),
        ("/v1/embeddings", {"model": "m", "input": "x", "truncate": True}, "truncate"),
    ],
)
def test_invalid_bodies_get_400_naming_the_param(app, fake, path, body, param) -> None:
    result = app.simulate_post(path, json=body)
    assert result.status_code == 400, result.text
    error = result.json["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] is None
    assert isinstance(error["message"], str) and error["message"]
    assert fake.submitted == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_malformed_json_and_non_objects_get_400(app, path) -> None:
    for body in (b'{"model": ', b'["model"]', b""):
        result = app.simulate_post(path, body=body, headers={"Content-Type": "application/json"})
        assert result.status_code == 400, (body, result.text)
        assert result.json["error"]["type"] == "invalid_request_error"
        assert result.json["error"]["param"] is None


def test_a_body_over_the_limit_gets_413(app, fake) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * LIMIT}]}
    result = app.simulate_post("/v1/chat/completions", json=big)
    assert result.status_code == 413
    assert result.json["error"]["type"] == "invalid_request_error"
    assert str(LIMIT) in result.json["error"]["message"]
    assert fake.submitted == []


def test_unknown_routes_and_methods_answer_in_openai_s_envelope(app) -> None:
    missing = app.simulate_post("/v1/nothing", json={})
    assert missing.status_code == 404
    assert missing.json["error"]["message"] == "Unknown request URL: POST /v1/nothing"
    wrong = app.simulate_get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert set(wrong.json["error"]) == {"message", "type", "param", "code"}


# -------------------------------------------------------------------- honest statuses


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_buffer_answers_503_with_retry_after(app, fake, stream) -> None:
    fake.script.append([Failed(503, "BufferOverflow", "Buffered requests overflow")])
    result = app.simulate_post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert result.status_code == 503
    assert result.headers["Retry-After"] == "1"
    assert result.headers["Content-Type"].startswith("application/json")
    assert result.json == {
        "error": {
            "message": "Buffered requests overflow",
            "type": "server_error",
            "param": None,
            "code": "buffer_overflow",
        }
    }
    assert fake.streams[0].cancelled


@pytest.mark.parametrize("stream", [False, True])
def test_a_buffer_timeout_answers_504(app, fake, stream) -> None:
    fake.script.append([Failed(504, "BufferedRequestTimeout", "waited too long")])
    result = app.simulate_post(
        "/v1/completions", json={"model": "m", "prompt": "x", "stream": stream}
    )
    assert result.status_code == 504
    assert result.json["error"]["code"] == "buffered_request_timeout"
    assert result.json["error"]["type"] == "server_error"
    assert "Retry-After" not in result.headers


@pytest.mark.parametrize("stream", [False, True])
def test_agent_refusals_after_dispatch_still_get_their_status(app, fake, stream) -> None:
    """The status waits past ``Dispatched`` for the first decisive event."""
    fake.script.append(
        [Dispatched("agent-x", "a1", 3), Failed(400, "ChatTemplateError", "template failed")]
    )
    result = app.simulate_post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert result.status_code == 400
    assert result.json["error"] == {
        "message": "template failed",
        "type": "invalid_request_error",
        "param": None,
        "code": "chat_template_error",
    }


def test_a_grammar_rejection_after_tokens_is_422_when_not_streamed(app, fake) -> None:
    fake.script.append(
        [
            Dispatched("agent-x", "a1", 0),
            Tokens(["{"]),
            Failed(422, "GrammarRejectedModelOutput", "not valid for the schema"),
        ]
    )
    result = app.simulate_post("/v1/chat/completions", json=CHAT)
    assert result.status_code == 422
    assert result.json["error"]["code"] == "grammar_rejected_model_output"


def test_a_prompt_too_long_uses_openai_s_code(app, fake) -> None:
    fake.script.append([Dispatched("agent-x", "a1", 0), Failed(400, "PromptTooLong", "too long")])
    result = app.simulate_post("/v1/chat/completions", json=CHAT)
    assert result.status_code == 400
    assert result.json["error"]["code"] == "context_length_exceeded"


def test_an_agent_lost_before_any_token_is_502(app, fake) -> None:
    fake.script.append([Dispatched("agent-x", "a1", 0), Failed(502, "AgentLost", "agent gone")])
    result = app.simulate_post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert result.status_code == 502
    assert result.json["error"]["code"] == "agent_lost"


def test_an_unreachable_broker_is_503_and_resets_the_link(app, fake, link) -> None:
    fake.unreachable = True
    for path, body in (
        ("/v1/chat/completions", CHAT),
        ("/v1/embeddings", {"model": "m", "input": "x"}),
    ):
        result = app.simulate_post(path, json=body)
        assert result.status_code == 503
        assert result.headers["Retry-After"] == "1"
        assert result.json["error"]["type"] == "server_error"
    assert app.simulate_get("/v1/models").status_code == 503
    assert link.resets == 3


def test_a_broker_that_stops_answering_mid_stream_ends_the_stream_in_band(app, fake) -> None:
    class Silent(FakeStream):
        async def __anext__(self) -> Any:
            if self.events:
                return self.events.pop(0)
            raise BrokerUnreachable("silent")

    async def submit(request: dict[str, Any]) -> FakeStream:
        return Silent([Dispatched("agent-x", "a1", 0), Tokens(["a"])])

    fake.submit = submit  # type: ignore[method-assign]
    result = app.simulate_post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = _events(result.text)
    assert events[-2]["error"]["code"] == "broker_unreachable"
    assert events[-1] == "[DONE]"


# ---------------------------------------------------------------------- non-streamed


def test_a_chat_completion_reports_usage_and_finish_reason(app, fake) -> None:
    fake.script.append(_generation(["Hel", "lo", "!"], prompt_tokens=9))
    fake.script.append(_generation(["Hel", "lo"], prompt_tokens=9))
    full = app.simulate_post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 3})
    short = app.simulate_post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 3})
    assert full.status_code == 200
    assert full.headers["Content-Type"].startswith("application/json")
    body = full.json
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "m"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (9, 3, 12)
    assert short.json["choices"][0]["finish_reason"] == "stop"
    assert short.json["choices"][0]["message"]["content"] == "Hello"


def test_a_text_completion_and_echo(app, fake) -> None:
    fake.script.append(_generation([" upon", " a"], prompt_tokens=2))
    fake.script.append(_generation([" upon"], prompt_tokens=2))
    result = app.simulate_post(
        "/v1/completions", json={"model": "m", "prompt": "Once", "max_tokens": 2}
    )
    body = result.json
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": " upon a", "finish_reason": "length", "logprobs": None}
    ]
    assert body["usage"]["total_tokens"] == 4
    echoed = app.simulate_post(
        "/v1/completions", json={"model": "m", "prompt": "Once", "echo": True}
    )
    assert echoed.json["choices"][0]["text"] == "Once upon"
    assert echoed.json["choices"][0]["finish_reason"] == "stop"


# -------------------------------------------------------------------------- streamed


def test_a_streamed_chat_completion_sends_openai_chunks(app, fake) -> None:
    fake.script.append(
        [
            Dispatched("agent-x", "a1", 0),
            Tokens(["Hel"]),
            Tokens(["lo", "!"]),
            Done(Usage(prompt_tokens=4, content_tokens=3)),
        ]
    )
    result = app.simulate_post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert result.status_code == 200
    assert result.headers["Content-Type"].startswith("text/event-stream")
    events = _events(result.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {"m"}
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {"content": "!"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 4 + ["stop"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (4, 3, 7)


def test_without_include_usage_there_is_no_usage_chunk(app, fake) -> None:
    fake.script.append(_generation(["a", "b"]))
    result = app.simulate_post(
        "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 2}
    )
    events = _events(result.text)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert "usage" not in last
    assert all(e["choices"] for e in events[:-1])


def test_a_streamed_text_completion(app, fake) -> None:
    fake.script.append(_generation([" upon", " a"], prompt_tokens=1))
    result = app.simulate_post(
        "/v1/completions",
        json={
            "model": "m",
            "prompt": "Once",
            "stream": True,
            "echo": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = _events(result.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"}
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert texts == ["Once", " upon", " a", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 3


def test_an_error_after_streaming_began_comes_in_band(app, fake) -> None:
    fake.script.append(
        [Dispatched("agent-x", "a1", 0), Tokens(["a"]), Failed(502, "AgentLost", "agent lost")]
    )
    result = app.simulate_post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert result.status_code == 200
    events = _events(result.text)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
    ]
    assert events[2] == {
        "error": {
            "message": "agent lost",
            "type": "server_error",
            "param": None,
            "code": "agent_lost",
        }
    }
    assert events[3:] == ["[DONE]"]


def test_a_client_that_disconnects_mid_stream_cancels_the_request(app, fake) -> None:
    gone = asyncio.Event()
    fake.on_hang = gone  # the stream stalls; the client leaves at that moment
    fake.script.append([Dispatched("agent-x", "a1", 0), Tokens(["a"]), HANG, Tokens(["b"])])
    result = app.simulate_post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, extras={DISCONNECTED: gone}
    )
    assert result.status_code == 200
    assert [e["choices"][0]["delta"] for e in _events(result.text)] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
    ]
    assert fake.streams[0].cancelled


def test_a_client_that_leaves_while_buffered_cancels_the_request(app, fake) -> None:
    gone = asyncio.Event()
    fake.on_hang = gone
    fake.script.append([HANG])
    result = app.simulate_post("/v1/chat/completions", json=CHAT, extras={DISCONNECTED: gone})
    assert result.status_code == 499
    assert fake.streams[0].cancelled


# ------------------------------------------------------------------------ embeddings


def _embedded(document: str, vector: list[float]) -> Embedding:
    return Embedding(
        {
            "Embedding": {
                "embedding": vector,
                "normalization_method": "L2",
                "pooling_type": "Last",
                "source_document_id": document,
            }
        }
    )


def test_embeddings_come_back_in_input_order_as_floats(app, fake) -> None:
    fake.script.append(
        [
            Dispatched("agent-x", "a1", 0),
            _embedded("1", [0.0, 1.0]),
            _embedded("0", [0.6, 0.8]),
            Done(Usage(prompt_tokens=6)),
        ]
    )
    result = app.simulate_post(
        "/v1/embeddings",
        json={"model": "emb", "input": ["first", "second"], "encoding_format": "float"},
    )
    assert result.status_code == 200, result.text
    assert fake.submitted == [
        {
            "input_batch": [{"id": "0", "content": "first"}, {"id": "1", "content": "second"}],
            "normalization_method": "L2",
        }
    ]
    assert result.json == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.6, 0.8]},
            {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
        ],
        "model": "emb",
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }


def test_embeddings_in_base64_are_little_endian_float32(app, fake) -> None:
    vector = [0.6, -0.8, 0.0]
    fake.script.append([_embedded("0", vector), Done(Usage(prompt_tokens=2))])
    result = app.simulate_post(
        "/v1/embeddings", json={"model": "emb", "input": "one", "encoding_format": "base64"}
    )
    (entry,) = result.json["data"]
    raw = base64.b64decode(entry["embedding"])
    assert raw == struct.pack("<3f", *vector)
    assert list(struct.unpack("<3f", raw)) == pytest.approx(vector)


def test_an_embedding_batch_fans_out_over_the_ready_agents(app, fake) -> None:
    fake.agent_list = [_agent(), _agent(), _agent(ready=False)]
    fake.script += [
        [_embedded("1", [1.0]), _embedded("0", [0.0]), Done(Usage(prompt_tokens=2))],
        [_embedded("2", [2.0]), Done(Usage(prompt_tokens=3))],
    ]
    result = app.simulate_post("/v1/embeddings", json={"model": "e", "input": ["a", "b", "c"]})
    assert [d["embedding"] for d in result.json["data"]] == [[0.0], [1.0], [2.0]]
    assert [len(r["input_batch"]) for r in fake.submitted] == [2, 1]
    assert result.json["usage"]["prompt_tokens"] == 5


def test_a_document_over_the_batch_size_is_a_400_naming_its_index(app, fake) -> None:
    fake.script.append(
        [
            _embedded("0", [1.0]),
            Embedding(
                {
                    "DocumentExceedsBatchSize": {
                        "document_tokens": 900,
                        "embedding_batch_size": 512,
                        "source_document_id": "1",
                    }
                }
            ),
            Done(Usage(prompt_tokens=1)),
        ]
    )
    result = app.simulate_post("/v1/embeddings", json={"model": "e", "input": ["a", "long"]})
    assert result.status_code == 400
    error = result.json["error"]
    assert error["param"] == "input"
    assert "input[1]" in error["message"] and "900" in error["message"]
    assert fake.streams[0].cancelled


def test_disabled_embeddings_tell_how_to_enable_them(app, fake) -> None:
    fake.script.append(
        [
            Dispatched("agent-x", "a1", 0),
            Failed(400, "EmbeddingsDisabled", "embeddings are off"),
        ]
    )
    result = app.simulate_post("/v1/embeddings", json={"model": "e", "input": "a"})
    assert result.status_code == 400
    assert "inference_parameters.enable_embeddings" in result.json["error"]["message"]
    assert result.json["error"]["code"] == "embeddings_disabled"


def test_embedding_failures_keep_their_status(app, fake) -> None:
    fake.script.append([Failed(503, "BufferOverflow", "Buffered requests overflow")])
    result = app.simulate_post("/v1/embeddings", json={"model": "e", "input": "a"})
    assert result.status_code == 503 and result.headers["Retry-After"] == "1"
    fake.script.append([Embedding({"Error": "document '0' failed"}), Done(Usage())])
    assert app.simulate_post("/v1/embeddings", json={"input": "a"}).status_code == 500


def test_dimensions_other_than_the_model_s_are_refused(app, fake) -> None:
    fake.script += [[_embedded("0", [1.0, 0.0]), Done(Usage())]] * 2
    same = app.simulate_post("/v1/embeddings", json={"model": "e", "input": "a", "dimensions": 2})
    assert same.status_code == 200
    other = app.simulate_post("/v1/embeddings", json={"model": "e", "input": "a", "dimensions": 8})
    assert other.status_code == 400 and other.json["error"]["param"] == "dimensions"


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"LocalToAgent": "/models/qwen/Qwen3-0.6B-Q8_0.gguf"}, "Qwen3-0.6B-Q8_0.gguf"),
        ({"LocalToAgent": "plain.gguf"}, "plain.gguf"),
        ({"Url": {"url": "https://example.com/files/x%20y.gguf?download=1"}}, "x y.gguf"),
        (
            {
                "HuggingFace": {
                    "repo_id": "Qwen/Qwen3-0.6B-GGUF",
                    "revision": "main",
                    "filename": "Qwen3-0.6B-Q8_0.gguf",
                }
            },
            "Qwen/Qwen3-0.6B-GGUF/Qwen3-0.6B-Q8_0.gguf",
        ),
    ],
)
def test_the_models_list_names_the_desired_state_s_model(app, fake, model, expected) -> None:
    fake.state = {"model": model, "inference_parameters": {}}
    result = app.simulate_get("/v1/models")
    assert result.status_code == 200
    body = result.json
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert entry["id"] == expected
    assert (entry["object"], entry["owned_by"]) == ("model", "paddler")
    assert isinstance(entry["created"], int)
    one = app.simulate_get(f"/v1/models/{expected}")
    assert one.status_code == 200 and one.json == entry


def test_no_model_means_an_empty_list(app, fake) -> None:
    fake.state = {"model": "None"}
    assert app.simulate_get("/v1/models").json == {"object": "list", "data": []}
    missing = app.simulate_get("/v1/models/anything")
    assert missing.status_code == 404
    assert missing.json["error"]["code"] == "model_not_found"


ANTHROPIC = {"anthropic-version": "2023-06-01"}


def test_anthropic_clients_get_the_models_in_anthropic_s_shape(app, fake) -> None:
    fake.state = {"model": {"LocalToAgent": "/m/tiny.gguf"}, "inference_parameters": {}}
    openai_entry = app.simulate_get("/v1/models").json["data"][0]
    listed = app.simulate_get("/v1/models", headers=ANTHROPIC)
    assert listed.status_code == 200, listed.text
    (model,) = listed.json["data"]
    assert model == {
        "type": "model",
        "id": "tiny.gguf",
        "display_name": "tiny.gguf",
        "created_at": datetime.fromtimestamp(openai_entry["created"], UTC)
        .isoformat()
        .replace("+00:00", "Z"),
        "lifecycle": "active",
    }
    assert listed.json["has_more"] is False
    assert (listed.json["first_id"], listed.json["last_id"]) == ("tiny.gguf", "tiny.gguf")
    one = app.simulate_get("/v1/models/tiny.gguf", headers=ANTHROPIC)
    assert one.json == model
    after = app.simulate_get("/v1/models", headers=ANTHROPIC, params={"after_id": "tiny.gguf"})
    assert after.json == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    before = app.simulate_get("/v1/models", headers=ANTHROPIC, params={"before_id": "tiny.gguf"})
    assert before.json["data"] == [] and before.json["has_more"] is False
    paged = app.simulate_get("/v1/models", headers=ANTHROPIC, params={"limit": "1"})
    assert paged.json["data"] == [model]
    for params, field in (
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"after_id": "other"}, "after_id"),
        ({"after_id": "tiny.gguf", "before_id": "tiny.gguf"}, "before_id"),
        ({"page": "2"}, "page"),
    ):
        bad = app.simulate_get("/v1/models", headers=ANTHROPIC, params=params)
        assert bad.status_code == 400, bad.text
        assert bad.json["type"] == "error"  # Anthropic's envelope
        assert bad.json["error"]["type"] == "invalid_request_error"
        assert bad.json["error"]["message"].startswith(f"{field}: ")
    missing = app.simulate_get("/v1/models/other", headers=ANTHROPIC)
    assert missing.status_code == 404
    assert missing.json["type"] == "error" and missing.json["error"]["type"] == "not_found_error"
    # without the header: OpenAI's shapes, its envelope, and no paging parameters read
    assert app.simulate_get("/v1/models/other").json["error"]["code"] == "model_not_found"


def _entry(token: str, logprob: float, top: int) -> dict[str, Any]:
    base = {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {**base, "top_logprobs": [base] * top}


def test_sampling_options_reach_the_broker_and_bad_ones_are_named(app, fake) -> None:
    fake.script += [_generation(["x"])]
    body = {
        **CHAT,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "logit_bias": {"42": -100, "7": 3.5},
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert app.simulate_post("/v1/chat/completions", json=body).status_code == 200
    (request,) = fake.submitted
    assert request["frequency_penalty"] == 0.5 and request["presence_penalty"] == -0.5
    assert request["logit_bias"] == {"42": -100, "7": 3.5}
    assert (request["logprobs"], request["top_logprobs"]) == (True, 2)
    for bad, field in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ):
        result = app.simulate_post("/v1/chat/completions", json={**CHAT, **bad})
        assert result.status_code == 400, bad
        assert result.json["error"]["param"] == field, result.json
    result = app.simulate_post("/v1/completions", json={"prompt": "x", "logprobs": 6})
    assert (result.status_code, result.json["error"]["param"]) == (400, "logprobs")


def test_chat_logprobs_come_with_the_message_and_with_each_chunk(app, fake) -> None:
    entries = [_entry("Hel", -0.1, 1), _entry("lo", -0.2, 1)]
    script = [
        Dispatched("agent-x", "a1", 0),
        Logprobs(entries[:1]),
        Tokens(["Hel"]),
        Logprobs(entries[1:]),
        Tokens(["lo"]),
        Done(Usage(prompt_tokens=5, content_tokens=2)),
    ]
    fake.script += [list(script), list(script)]
    body = {**CHAT, "logprobs": True, "top_logprobs": 1}
    whole = app.simulate_post("/v1/chat/completions", json=body).json
    assert whole["choices"][0]["logprobs"] == {"content": entries, "refusal": None}
    streamed = _events(
        app.simulate_post("/v1/chat/completions", json={**body, "stream": True}).text
    )
    chunks = [e["choices"][0] for e in streamed if e != "[DONE]" and e["choices"]]
    with_text = [c for c in chunks if c["delta"].get("content")]
    assert [c["logprobs"]["content"] for c in with_text] == [entries[:1], entries[1:]]


def test_legacy_completion_logprobs_are_parallel_lists(app, fake) -> None:
    entries = [_entry("Hel", -0.1, 2), _entry("lo", -0.2, 2)]
    fake.script += [
        [
            Dispatched("agent-x", "a1", 0),
            Logprobs(entries),
            Tokens(["Hello"]),
            Done(Usage(prompt_tokens=5, content_tokens=2)),
        ]
    ]
    body = {"prompt": "Say", "logprobs": 2}
    choice = app.simulate_post("/v1/completions", json=body).json["choices"][0]
    assert choice["text"] == "Hello"
    assert choice["logprobs"] == {
        "tokens": ["Hel", "lo"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"Hel": -0.1}, {"lo": -0.2}],
        "text_offset": [0, 3],
    }
    (request,) = fake.submitted
    assert (request["logprobs"], request["top_logprobs"]) == (True, 2)


def test_fields_that_do_not_concern_this_server_are_accepted(app, fake) -> None:
    """What OpenAI's clients send that has no effect here passes; everything else is
    honoured or named in a 400 (see the parametrized test above)."""
    fake.script += [_generation(["x"]) for _ in range(4)]
    bodies = [
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "user": "u-1",
                "metadata": {"k": "v"},
                "store": False,
                "service_tier": "auto",
                "safety_identifier": "s",
                "prompt_cache_key": "p",
                "prompt_cache_retention": "in_memory",
                "n": 1,
                "stream_options": {"include_obfuscation": False},
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "description": "d", "strict": True},
                },
            },
        ),
        ("/v1/completions", {"model": "m", "prompt": "x", "user": "u-1", "best_of": 1}),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": False}}),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {}}),
    ]
    for path, body in bodies:
        result = app.simulate_post(path, json=body)
        assert result.status_code == 200, result.text
    thinking = [request["enable_thinking"] for request in fake.submitted]
    assert thinking == [True, False, False, True]  # a raw prompt has no template to tell


def test_reasoning_comes_apart_from_the_answer_and_can_be_turned_off(app, fake) -> None:
    script = [
        Dispatched("agent-x", "a1", 0),
        Reasoning(["Let me ", "see."]),
        Tokens(["Yes."]),
        Done(Usage(prompt_tokens=5, content_tokens=1, reasoning_tokens=2)),
    ]
    fake.script += [list(script), list(script), _generation(["x"])]
    whole = app.simulate_post("/v1/chat/completions", json=CHAT).json
    message = whole["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("Yes.", "Let me see.")
    assert whole["usage"]["completion_tokens"] == 3
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    streamed = _events(
        app.simulate_post("/v1/chat/completions", json={**CHAT, "stream": True}).text
    )
    deltas = [e["choices"][0]["delta"] for e in streamed if e != "[DONE]" and e["choices"]]
    assert [d["reasoning_content"] for d in deltas if "reasoning_content" in d] == [
        "Let me ",
        "see.",
    ]
    assert "".join(d.get("content") or "" for d in deltas) == "Yes."
    app.simulate_post("/v1/chat/completions", json={**CHAT, "reasoning_effort": "none"})
    assert [r["enable_thinking"] for r in fake.submitted] == [True, True, False]
    bad = app.simulate_post("/v1/chat/completions", json={**CHAT, "reasoning_effort": "max"})
    assert (bad.status_code, bad.json["error"]["param"]) == (400, "reasoning_effort")
