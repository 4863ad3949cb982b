"""Every HTTP service answers 400 to a body nested deeper than ``MAX_JSON_DEPTH`` (it
was a 500 from a ``RecursionError``) and to a grammar llama.cpp cannot take safely,
before anything reaches the broker; through ``falcon.testing`` with a fake broker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import falcon.testing
import pytest

from paddler.http import inference, management, openai
from paddler.http.common import HttpDeps
from tests.unit.fake_broker import FakeClient, FakeLink

DEEP = 100_000
DEEP_BODY = ("[" * DEEP + "]" * DEEP).encode()
DEEP_GRAMMAR = "root ::= " + "(" * 60_000 + '"a"' + ")" * 60_000
TOO_DEEP = "nested deeper than 128 levels"


@pytest.fixture
def fake() -> FakeClient:
    client = FakeClient({"model": {"LocalToAgent": "/models/tiny.gguf"}})
    client.agent_list = [{"id": "agent-x", "name": "a1", "slots_total": 2, "ready": True}]
    return client


def _app(module: Any, fake: FakeClient) -> Any:
    return module.create_app(HttpDeps(link=FakeLink(fake)))  # type: ignore[arg-type]


def _post(app: Any, path: str, body: bytes, method: str = "POST") -> Any:
    client = falcon.testing.TestClient(app)
    return client.simulate_request(
        method, path, body=body, headers={"Content-Type": "application/json"}
    )


def _object_nested(depth: int) -> bytes:
    return ('{"raw_prompt": "x", "tools": ' + "[" * depth + "]" * depth + "}").encode()


@pytest.mark.parametrize(
    ("module", "method", "path"),
    [
        (inference, "POST", "/api/v1/continue_from_raw_prompt"),
        (inference, "POST", "/api/v1/continue_from_conversation_history"),
        (inference, "POST", "/api/v1/generate_embedding_batch"),
        (management, "PUT", "/api/v1/balancer_desired_state"),
    ],
)
def test_a_deep_body_is_a_400_naming_the_body_on_the_native_services(
    fake, module, method, path
) -> None:
    for body in (DEEP_BODY, _object_nested(129)):
        result = _post(_app(module, fake), path, body, method)
        assert result.status_code == 400, result.text
        assert result.json == {"error": f"body: {TOO_DEEP}", "field": "body"}
    assert fake.submitted == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_a_deep_body_is_a_400_in_openai_s_envelope(fake, path) -> None:
    result = _post(_app(openai, fake), path, DEEP_BODY)
    assert result.status_code == 400, result.text
    error = result.json["error"]
    assert error["type"] == "invalid_request_error"
    assert TOO_DEEP in error["message"]
    assert fake.submitted == []


def test_a_body_at_the_limit_is_read(fake) -> None:
    # the object, the history, a message and 125 levels of lists in a key the chat
    # template gets as it is: 128 levels in all
    path = "/api/v1/continue_from_conversation_history"
    body = (
        '{"conversation_history": [{"role": "user", "content": "x", "extra": '
        + "[" * 125
        + "]" * 125
        + "}]}"
    ).encode()
    result = _post(_app(inference, fake), path, body)
    assert result.status_code == 200, result.text
    assert len(fake.submitted) == 1


def test_a_deep_websocket_message_is_answered_and_the_socket_serves_on(fake) -> None:
    async def talk() -> list[dict[str, Any]]:
        app = _app(inference, fake)
        async with (
            falcon.testing.ASGIConductor(app) as conductor,
            conductor.simulate_ws("/api/v1/inference_socket") as ws,
        ):
            await ws.send_text("[" * DEEP + "]" * DEEP)
            first = json.loads(await asyncio.wait_for(ws.receive_text(), 5))
            await ws.send_text('{"Request": {"id": "r1", "request": {}}}')
            second = json.loads(await asyncio.wait_for(ws.receive_text(), 5))
            return [first, second]

    first, second = asyncio.run(talk())
    assert TOO_DEEP in json.dumps(first)
    assert "Request.request" in json.dumps(second)  # still reading messages


def test_the_60000_deep_grammar_is_a_400_naming_the_grammar_on_the_native_api(fake) -> None:
    body = {
        "raw_prompt": "x",
        "max_tokens": 4,
        "grammar": {"type": "gbnf", "grammar": DEEP_GRAMMAR, "root": "root"},
    }
    result = _post(_app(inference, fake), "/api/v1/continue_from_raw_prompt", json.dumps(body))
    assert result.status_code == 400, result.text
    assert result.json["field"] == "grammar.grammar"
    nested = {**body, "grammar": {"type": "gbnf", "grammar": "root ::= " + "(" * 65 + '"a"'}}
    result = _post(_app(inference, fake), "/api/v1/continue_from_raw_prompt", json.dumps(nested))
    assert result.json == {
        "error": "grammar.grammar: nests groups deeper than 64 levels",
        "field": "grammar.grammar",
    }
    assert fake.submitted == []


def _chat(schema: Any) -> bytes:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    return json.dumps(body).encode()


def test_a_response_format_schema_past_the_grammar_limits_is_a_400_on_openai(fake) -> None:
    deep: Any = {"type": "string"}
    for _ in range(40):  # 81 levels of JSON: within a body's limit, past a schema's
        deep = {"type": "object", "properties": {"a": deep}}
    evil = {"type": "string", "pattern": "(a)\\1"}
    for schema, words in ((deep, "deeper than 64"), (evil, "linear-time")):
        result = _post(_app(openai, fake), "/v1/chat/completions", _chat(schema))
        assert result.status_code == 400, result.text
        error = result.json["error"]
        assert error["param"] == "response_format.json_schema.schema"
        assert words in error["message"]
    assert fake.submitted == []
