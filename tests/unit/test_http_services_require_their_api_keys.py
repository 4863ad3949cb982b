"""With API keys on, every HTTP service answers 401 in its own error format without
a key or with a wrong one, and serves with a right one; ``/health``, ``/openapi.json``
and CORS preflights stay open (``falcon.testing``, a fake broker, no server)."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import falcon
import falcon.testing
import pytest
from openapi_spec_validator import validate

from paddler.client import Dispatched, Done, Tokens
from paddler.http import api_keys, inference, management, openai
from paddler.http.api_keys import ApiKeys
from paddler.http.common import HttpDeps
from paddler.protocol.messages import Usage
from tests.unit.fake_broker import FakeClient, FakeLink

KEY = "inference-key-1"
OTHER_KEY = "inference-key-2"
ORIGIN = "https://app.example"
RAW = "/api/v1/continue_from_raw_prompt"


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient({"model": {"LocalToAgent": "/models/tiny.gguf"}})


def _deps(fake: FakeClient, *keys: str, cors: list[str] | None = None) -> HttpDeps:
    return HttpDeps(
        link=FakeLink(fake),  # type: ignore[arg-type]
        cors_origins=cors or [],
        api_keys=ApiKeys.of(keys),
    )


@pytest.fixture
def inference_app(fake: FakeClient) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(
        inference.create_app(_deps(fake, KEY, OTHER_KEY, cors=[ORIGIN]))
    )


@pytest.fixture
def management_app(fake: FakeClient) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(management.create_app(_deps(fake, "management-key")))


@pytest.fixture
def openai_app(fake: FakeClient) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(openai.create_app(_deps(fake, KEY)))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _script_one_generation(fake: FakeClient) -> None:
    fake.script.append(
        [
            Dispatched("agent-x", "a1", 0),
            Tokens(["Hi"]),
            Done(Usage(prompt_tokens=1, content_tokens=1)),
        ]
    )


def test_a_native_service_answers_401_in_its_own_format_without_a_key(inference_app) -> None:
    result = inference_app.simulate_post(RAW, json={"raw_prompt": "Hi", "max_tokens": 1})
    assert result.status_code == 401
    assert result.json == {
        "error": "an API key is required: send the header Authorization: Bearer <key>",
        "field": None,
    }
    assert result.headers["www-authenticate"] == "Bearer"


def test_a_wrong_key_or_another_scheme_is_a_401_too(inference_app) -> None:
    for headers in (
        _bearer("not-the-key"),
        _bearer(KEY + "x"),
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
    ):
        result = inference_app.simulate_post(
            RAW, json={"raw_prompt": "Hi", "max_tokens": 1}, headers=headers
        )
        assert result.status_code == 401, headers
        assert set(result.json) == {"error", "field"}
        assert result.headers["www-authenticate"].startswith("Bearer")
    wrong = inference_app.simulate_get("/openapi.json", headers=_bearer("nope"))
    assert wrong.status_code == 200  # the document is open, whatever is sent


def test_every_configured_key_serves(inference_app, fake) -> None:
    for key in (KEY, OTHER_KEY):
        _script_one_generation(fake)
        result = inference_app.simulate_post(
            RAW, json={"raw_prompt": "Hi", "max_tokens": 1}, headers=_bearer(key)
        )
        assert result.status_code == 200
        assert '"ContentToken":"Hi"' in result.text
    assert len(fake.submitted) == 2


def test_a_request_without_a_key_never_reaches_the_broker(inference_app, fake) -> None:
    inference_app.simulate_post(RAW, json={"raw_prompt": "Hi", "max_tokens": 1})
    assert fake.submitted == []


def test_management_takes_its_own_keys_not_the_inference_ones(management_app) -> None:
    assert management_app.simulate_get("/api/v1/agents").status_code == 401
    assert management_app.simulate_get("/api/v1/agents", headers=_bearer(KEY)).status_code == 401
    served = management_app.simulate_get("/api/v1/agents", headers=_bearer("management-key"))
    assert served.status_code == 200 and "agents" in served.json
    put = management_app.simulate_put(
        "/api/v1/balancer_desired_state", json={"model": "None"}, headers=_bearer("wrong")
    )
    assert put.status_code == 401


def test_the_openai_service_answers_in_openai_s_envelope(openai_app) -> None:
    missing = openai_app.simulate_get("/v1/models")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    error = missing.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "invalid_api_key",
    )
    assert "didn't provide an API key" in error["message"]
    wrong = openai_app.simulate_post(
        "/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
        headers=_bearer("sk-wrong"),
    )
    assert wrong.status_code == 401
    assert wrong.json["error"]["code"] == "invalid_api_key"
    assert wrong.json["error"]["message"] == "Incorrect API key provided."
    assert "sk-wrong" not in wrong.text  # a presented key is never echoed
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    served = openai_app.simulate_get("/v1/models", headers=_bearer(KEY))
    assert served.status_code == 200 and served.json["object"] == "list"


def test_health_stays_open_on_every_service(inference_app, management_app, openai_app) -> None:
    for app in (inference_app, management_app, openai_app):
        result = app.simulate_get("/health")
        assert (result.status_code, result.text) == (200, "OK")


def test_a_cors_preflight_needs_no_key_and_a_401_carries_cors_headers(inference_app) -> None:
    preflight = inference_app.simulate_options(
        RAW,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = inference_app.simulate_post(
        RAW, json={"raw_prompt": "Hi"}, headers={"Origin": ORIGIN}
    )
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN  # the page can read why


def test_an_unknown_path_is_a_404_with_or_without_a_key(inference_app) -> None:
    assert inference_app.simulate_get("/nowhere").status_code == 404


def test_keys_are_compared_in_constant_time_with_every_key(monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    keys = ApiKeys.of(["first", "second", "third"])
    assert keys.accepts("first")  # a match on the first key does not stop the loop
    assert len(calls) == 3
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: lengths say nothing
    calls.clear()
    assert not keys.accepts("fourth") and len(calls) == 3
    calls.clear()
    assert not keys.accepts(None) and not keys.accepts("") and len(calls) == 6


def test_keys_are_kept_as_digests_only() -> None:
    keys = ApiKeys.of([KEY, KEY, OTHER_KEY])
    assert len(keys.digests) == 2
    assert KEY not in repr(keys) and all(KEY not in value for value in keys.hex())
    assert ApiKeys.from_hex(keys.hex()).accepts(OTHER_KEY)
    assert not ApiKeys() and keys


def _document(client: falcon.testing.TestClient) -> dict[str, Any]:
    result = client.simulate_get("/openapi.json")
    assert result.status_code == 200
    document: dict[str, Any] = result.json
    return document


def test_the_openapi_documents_declare_the_bearer_scheme_where_keys_are_needed(
    inference_app, management_app, openai_app, fake
) -> None:
    for app in (inference_app, management_app, openai_app):
        document = _document(app)
        validate(document)
        assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        for path, item in document["paths"].items():
            for operation in item.values():
                if path in ("/health", "/openapi.json"):
                    assert "security" not in operation
                elif path.startswith(("/v1/messages", "/v1/models")):  # x-api-key too
                    assert operation["security"] == [{"bearer": []}, {"x-api-key": []}]
                    assert "401" in operation["responses"]
                else:
                    assert operation["security"] == [{"bearer": []}]
                    assert "401" in operation["responses"]
    open_app = falcon.testing.TestClient(inference.create_app(_deps(fake)))
    plain = _document(open_app)
    assert "securitySchemes" not in plain["components"]
    assert not any("security" in op for item in plain["paths"].values() for op in item.values())


# ---------------------------------------------------------------------------- WebSocket


async def _open_socket(app: Any, **options: Any) -> tuple[str | None, str]:
    """Open the inference socket, run one request; (the accepted subprotocol, its text)."""
    async with (
        falcon.testing.ASGIConductor(app) as conductor,
        conductor.simulate_ws("/api/v1/inference_socket", **options) as ws,
    ):
        await ws.send_text(
            '{"Request":{"id":"r1","request":{"ContinueFromRawPrompt":'
            '{"raw_prompt":"Hi","max_tokens":1}}}}'
        )
        text = await asyncio.wait_for(ws.receive_text(), 5)
        return ws.subprotocol, text


@pytest.fixture
def socket_app(fake: FakeClient) -> Any:
    return inference.create_app(_deps(fake, KEY))


def test_a_browser_passes_its_key_as_a_websocket_subprotocol(socket_app, fake) -> None:
    _script_one_generation(fake)
    accepted, text = asyncio.run(
        _open_socket(socket_app, subprotocols=["paddler", f"paddler.bearer.{KEY}"])
    )
    assert accepted == "paddler"  # the key is not echoed back
    assert '"request_id":"r1"' in text
    _script_one_generation(fake)
    alone, _ = asyncio.run(_open_socket(socket_app, subprotocols=[f"paddler.bearer.{KEY}"]))
    assert alone == f"paddler.bearer.{KEY}"  # a browser needs one of its offers back


def test_a_websocket_client_may_send_the_header_instead(socket_app, fake) -> None:
    _script_one_generation(fake)
    accepted, text = asyncio.run(_open_socket(socket_app, headers=_bearer(KEY)))
    assert accepted is None and "ContentToken" in text


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"subprotocols": ["paddler", "paddler.bearer.wrong"]},
        {"headers": _bearer("wrong")},
    ],
    ids=["no-key", "wrong-subprotocol-key", "wrong-header-key"],
)
def test_a_websocket_without_a_right_key_is_refused_before_it_opens(
    socket_app, fake, options
) -> None:
    with pytest.raises(falcon.WebSocketDisconnected) as refused:
        asyncio.run(_open_socket(socket_app, **options))
    assert refused.value.code == api_keys.UNAUTHORIZED_CLOSE_CODE
    assert fake.submitted == []


def test_without_keys_the_socket_still_answers_a_subprotocol_offer(fake) -> None:
    _script_one_generation(fake)
    app = inference.create_app(_deps(fake))
    accepted, _ = asyncio.run(_open_socket(app, subprotocols=["paddler"]))
    assert accepted == "paddler"
