"""Fields the agents could not honour are refused with a 400 that names them, on
every API that takes them, rather than accepted and ignored: ``parallel_tool_calls:
false`` with ``tool_choice`` auto (only a forced choice's grammar keeps to one call),
images (the agents serve text-only models), ``echo`` with ``logprobs`` on the legacy
completions (the prompt's tokens get no log-probabilities). And ``x-api-key`` is
taken on ``/v1/models`` as on ``/v1/messages``, so Anthropic's SDKs list models."""

from __future__ import annotations

from typing import Any

import falcon.testing
import pytest

from paddler.client import Dispatched, Done, Tokens
from paddler.http import inference, openai
from paddler.http.api_keys import ApiKeys
from paddler.http.common import HttpDeps
from paddler.protocol.messages import Usage
from tests.unit.fake_broker import FakeClient, FakeLink

KEY = "models-key-1"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Weather?"}]}
RESPONSE_TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
PNG = "iVBORw0KGgo="
TEXT_ONLY = "the agents serve text-only models (multimodal input is not supported)"


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient({"model": {"LocalToAgent": "/models/tiny.gguf"}})


@pytest.fixture
def app(fake: FakeClient) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(openai.create_app(HttpDeps(link=FakeLink(fake))))  # type: ignore[arg-type]


@pytest.fixture
def native(fake: FakeClient) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(inference.create_app(HttpDeps(link=FakeLink(fake))))  # type: ignore[arg-type]


@pytest.fixture
def keyed(fake: FakeClient) -> falcon.testing.TestClient:
    deps = HttpDeps(link=FakeLink(fake), api_keys=ApiKeys.of([KEY]))  # type: ignore[arg-type]
    return falcon.testing.TestClient(openai.create_app(deps))


def _answer() -> list[Any]:
    return [Dispatched("agent-x", "a1", 0), Tokens(["ok"]), Done(Usage(prompt_tokens=3))]


def _openai_400(result: falcon.testing.Result, param: str) -> str:
    assert result.status_code == 400, result.text
    error = result.json["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param}: ")
    message: str = error["message"]
    return message


# ---------------------------------------------------------- parallel_tool_calls


@pytest.mark.parametrize("choice", [None, "auto"])
def test_chat_parallel_tool_calls_false_with_auto_is_a_400(app, fake, choice) -> None:
    body = {**CHAT, "tools": TOOLS, "parallel_tool_calls": False}
    if choice is not None:
        body["tool_choice"] = choice
    message = _openai_400(
        app.simulate_post("/v1/chat/completions", json=body), "parallel_tool_calls"
    )
    assert "required" in message and "auto" in message
    assert fake.submitted == []


def test_chat_parallel_tool_calls_false_is_kept_where_it_can_be(app, fake) -> None:
    """Forced choices keep to it with a grammar; with no tools shown no call comes."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    bodies = [
        {**CHAT, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
        {**CHAT, "tools": TOOLS, "tool_choice": named, "parallel_tool_calls": False},
        {**CHAT, "tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": False},
        {**CHAT, "parallel_tool_calls": False},
        {**CHAT, "tools": TOOLS, "parallel_tool_calls": True},
    ]
    fake.script += [_answer() for _ in bodies]
    for body in bodies:
        result = app.simulate_post("/v1/chat/completions", json=body)
        assert result.status_code == 200, (body, result.text)
    required, forced, hidden, toolless, parallel = fake.submitted
    assert required["parallel_tool_calls"] is False and forced["parallel_tool_calls"] is False
    assert hidden["tools"] == [] and toolless["tools"] == []
    assert parallel["tool_choice"] == "auto" and parallel["parallel_tool_calls"] is True


def test_responses_parallel_tool_calls_false_with_auto_is_a_400(app, fake) -> None:
    body = {"model": "m", "input": "Weather?", "tools": [RESPONSE_TOOL]}
    for extra in ({}, {"tool_choice": "auto"}):
        result = app.simulate_post(
            "/v1/responses", json={**body, **extra, "parallel_tool_calls": False}
        )
        _openai_400(result, "parallel_tool_calls")
    assert fake.submitted == []
    fake.script.append(_answer())
    required = {**body, "tool_choice": "required", "parallel_tool_calls": False}
    assert app.simulate_post("/v1/responses", json=required).status_code == 200
    assert fake.submitted[-1]["parallel_tool_calls"] is False


def test_native_parallel_tool_calls_false_with_auto_is_a_400_before_streaming(native, fake) -> None:
    body = {
        "conversation_history": [{"role": "user", "content": "Weather?"}],
        "tools": TOOLS,
        "parallel_tool_calls": False,
    }
    for path, prompt in (
        ("/api/v1/continue_from_conversation_history", {}),
        ("/api/v1/continue_from_raw_prompt", {"raw_prompt": "Weather?"}),
    ):
        request = {**body, **prompt}
        if prompt:
            del request["conversation_history"]
        result = native.simulate_post(path, json=request)
        assert result.status_code == 400, result.text
        assert result.json["field"] == "parallel_tool_calls"
        assert "tool_choice" in result.json["error"]
    assert fake.submitted == []
    fake.script.append(_answer())
    forced = {**body, "tool_choice": "required"}
    result = native.simulate_post("/api/v1/continue_from_conversation_history", json=forced)
    assert result.status_code == 200
    assert fake.submitted[-1]["parallel_tool_calls"] is False


def test_anthropic_keeps_its_own_400_for_disable_parallel_tool_use_with_auto(app, fake) -> None:
    body = {
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [ANTHROPIC_TOOL],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }
    result = app.simulate_post("/v1/messages", json=body)
    assert result.status_code == 400
    assert result.json["error"]["message"].startswith("tool_choice.disable_parallel_tool_use: ")
    assert fake.submitted == []


# ----------------------------------------------------------------------- images


def test_chat_image_url_parts_are_a_400_naming_the_part(app, fake) -> None:
    for image_url in ({"url": f"data:image/png;base64,{PNG}"}, "https://example.com/a.png"):
        messages = [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": image_url},
                ],
            },
        ]
        result = app.simulate_post("/v1/chat/completions", json={**CHAT, "messages": messages})
        message = _openai_400(result, "messages[1].content[1]")
        assert TEXT_ONLY in message
    assert fake.submitted == []


def test_anthropic_image_blocks_are_a_400_naming_the_block(app, fake) -> None:
    for source in (
        {"type": "base64", "media_type": "image/png", "data": PNG},
        {"type": "url", "url": "https://example.com/a.png"},
    ):
        body = {
            "max_tokens": 16,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": source},
                    ],
                }
            ],
        }
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            sent = body if path == "/v1/messages" else {"messages": body["messages"]}
            result = app.simulate_post(path, json=sent)
            assert result.status_code == 400, result.text
            assert result.json["type"] == "error"
            assert result.json["error"]["type"] == "invalid_request_error"
            message = result.json["error"]["message"]
            assert message.startswith("messages[0].content[1]: "), message
            assert TEXT_ONLY in message
    assert fake.submitted == []


def test_native_image_parts_are_a_400_naming_the_part(native, fake) -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": "What is this?"},
            ],
        },
    ]
    result = native.simulate_post(
        "/api/v1/continue_from_conversation_history", json={"conversation_history": history}
    )
    assert result.status_code == 400, result.text
    assert result.json["field"] == "conversation_history[2].content[0]"
    assert TEXT_ONLY in result.json["error"]
    assert fake.submitted == []
    # text parts (with keys for the template) still pass
    fake.script.append(_answer())
    text = [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache": 1}]}]
    result = native.simulate_post(
        "/api/v1/continue_from_conversation_history", json={"conversation_history": text}
    )
    assert result.status_code == 200
    assert fake.submitted[-1]["conversation_history"] == text


# ------------------------------------------------------------- echo with logprobs


@pytest.mark.parametrize("logprobs", [0, 2])
def test_completions_echo_with_logprobs_is_a_400_naming_echo(app, fake, logprobs) -> None:
    body = {"model": "m", "prompt": "Say", "echo": True, "logprobs": logprobs}
    for stream in (False, True):
        result = app.simulate_post("/v1/completions", json={**body, "stream": stream})
        message = _openai_400(result, "echo")
        assert "logprobs" in message
    assert fake.submitted == []


def test_completions_echo_or_logprobs_alone_are_honoured(app, fake) -> None:
    fake.script += [_answer(), _answer(), _answer()]
    echoed = app.simulate_post("/v1/completions", json={"prompt": "Say", "echo": True})
    assert echoed.status_code == 200 and echoed.json["choices"][0]["text"] == "Sayok"
    plain = {"prompt": "Say", "echo": False, "logprobs": 1}
    assert app.simulate_post("/v1/completions", json=plain).status_code == 200
    assert fake.submitted[-1]["logprobs"] is True
    unset = {"prompt": "Say", "echo": True, "logprobs": None}
    assert app.simulate_post("/v1/completions", json=unset).status_code == 200


# ------------------------------------------------------------ x-api-key on models


def test_x_api_key_is_taken_on_the_models_routes(keyed) -> None:
    for headers in (
        {"x-api-key": KEY},
        {"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        {"Authorization": f"Bearer {KEY}"},
        {"x-api-key": "wrong", "Authorization": f"Bearer {KEY}"},
    ):
        listed = keyed.simulate_get("/v1/models", headers=headers)
        assert listed.status_code == 200, (headers, listed.text)
        assert listed.json["data"][0]["id"] == "tiny.gguf"
        one = keyed.simulate_get("/v1/models/tiny.gguf", headers=headers)
        assert one.status_code == 200, (headers, one.text)
        assert one.json["id"] == "tiny.gguf"


def test_a_wrong_x_api_key_on_the_models_routes_is_a_401(keyed) -> None:
    for path in ("/v1/models", "/v1/models/tiny.gguf"):
        wrong = keyed.simulate_get(path, headers={"x-api-key": "sk-wrong"})
        assert wrong.status_code == 401
        assert wrong.json["error"]["code"] == "invalid_api_key"  # OpenAI's envelope
        assert "sk-wrong" not in wrong.text
        anthropic = keyed.simulate_get(
            path, headers={"x-api-key": "sk-wrong", "anthropic-version": "2023-06-01"}
        )
        assert anthropic.status_code == 401
        assert anthropic.json == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid API key"},
        }
        assert keyed.simulate_get(path).status_code == 401


def test_the_openapi_document_declares_x_api_key_on_the_models_routes(keyed) -> None:
    paths = keyed.simulate_get("/openapi.json").json["paths"]
    for path in ("/v1/models", "/v1/models/{model}"):
        assert paths[path]["get"]["security"] == [{"bearer": []}, {"x-api-key": []}]
    assert paths["/v1/chat/completions"]["post"]["security"] == [{"bearer": []}]


def test_a_multimodal_projector_in_the_desired_state_is_refused_by_name() -> None:
    from paddler.errors import ConfigurationError
    from paddler.protocol.desired_state import validate_desired_state

    assert validate_desired_state({"multimodal_projection": None})["multimodal_projection"] == (
        "None"
    )
    with pytest.raises(ConfigurationError) as refused:
        validate_desired_state({"multimodal_projection": {"LocalToAgent": "/m/mmproj.gguf"}})
    assert refused.value.field == "multimodal_projection"
    assert "text-only" in str(refused.value)
