"""OpenAI's Conversations API through ``falcon.testing`` and a scripted broker: a
conversation created with items and metadata, read, its metadata replaced, deleted;
its items listed in pages, added, read and removed one by one; a response made in
it sees its items as messages and adds its input and output items when it
completes; concurrent changes lose nothing; every bad id, parameter and body is a
clear 4xx."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import falcon.testing
import pytest

from paddler.client import Dispatched, Done, Failed, Tokens
from paddler.errors import RequestFailed
from paddler.http import openai
from paddler.http.common import HttpDeps
from paddler.http.openai.conversations import change_conversation
from paddler.protocol.messages import Usage
from tests.unit.fake_broker import FakeClient, FakeLink

ASKED = {"type": "message", "role": "user", "content": "My name is Ada."}


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient({"model": {"LocalToAgent": "/models/tiny.gguf"}})


@pytest.fixture
def deps(fake: FakeClient) -> HttpDeps:
    return HttpDeps(link=FakeLink(fake))  # type: ignore[arg-type]


@pytest.fixture
def app(deps: HttpDeps) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(openai.create_app(deps))


def _answer(text: str) -> list[Any]:
    return [Dispatched("agent-x", "a1", 0), Tokens([text]), Done(Usage(5, content_tokens=2))]


def _create(app: falcon.testing.TestClient, **body: Any) -> dict[str, Any]:
    result = app.simulate_post("/v1/conversations", json=body)
    assert result.status_code == 200, result.text
    return result.json  # type: ignore[no-any-return]


def _items(app: falcon.testing.TestClient, ident: str, **params: str) -> dict[str, Any]:
    result = app.simulate_get(f"/v1/conversations/{ident}/items", params=params)
    assert result.status_code == 200, result.text
    return result.json  # type: ignore[no-any-return]


def test_a_conversation_is_created_read_updated_and_deleted(app, fake) -> None:
    made = _create(app, items=[ASKED], metadata={"topic": "names"})
    ident = made["id"]
    assert ident.startswith("conv_") and made["object"] == "conversation"
    assert made["metadata"] == {"topic": "names"} and isinstance(made["created_at"], int)
    path = f"/v1/conversations/{ident}"
    assert app.simulate_get(path).json == made
    updated = app.simulate_post(path, json={"metadata": {"topic": "other"}}).json
    assert updated == {**made, "metadata": {"topic": "other"}}
    assert app.simulate_get(path).json == updated
    deleted = app.simulate_delete(path)
    assert deleted.json == {"id": ident, "object": "conversation.deleted", "deleted": True}
    for result in (app.simulate_get(path), app.simulate_delete(path)):
        assert result.status_code == 404
        assert result.json["error"]["message"] == f"Conversation with id '{ident}' not found."
    assert fake.responses == {}
    empty = _create(app)
    assert empty["metadata"] == {} and _items(app, empty["id"])["data"] == []


def test_items_are_added_listed_in_pages_read_and_removed(app) -> None:
    ident = _create(app, items=[ASKED])["id"]
    path = f"/v1/conversations/{ident}/items"
    answer = {"type": "message", "role": "assistant", "content": "Hello Ada.", "id": "msg_mine"}
    call = {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"}
    added = app.simulate_post(path, json={"items": [answer, call]})
    assert added.status_code == 200, added.text
    data = added.json["data"]
    assert [item["type"] for item in data] == ["message", "function_call"]
    assert data[0]["id"] == "msg_mine" and data[0]["content"] == [
        {"type": "output_text", "text": "Hello Ada.", "annotations": []}
    ]
    assert data[1]["id"].startswith("fc_") and data[1]["status"] == "completed"
    everything = _items(app, ident, order="asc")["data"]
    assert [item["id"] for item in everything][1:] == [item["id"] for item in data]
    assert everything[0]["content"] == [{"type": "input_text", "text": "My name is Ada."}]
    first = _items(app, ident, limit="2")  # newest first
    assert [item["id"] for item in first["data"]] == [data[1]["id"], "msg_mine"]
    assert first["has_more"] is True
    rest = _items(app, ident, limit="2", after=first["last_id"])
    assert rest["data"] == [everything[0]] and rest["has_more"] is False
    one = app.simulate_get(f"{path}/msg_mine")
    assert one.json == data[0]
    after = app.simulate_delete(f"{path}/msg_mine")
    assert after.status_code == 200 and after.json["id"] == ident
    assert after.json["object"] == "conversation"
    assert [item["id"] for item in _items(app, ident, order="asc")["data"]] == [
        everything[0]["id"],
        data[1]["id"],
    ]
    for result in (app.simulate_get(f"{path}/msg_mine"), app.simulate_delete(f"{path}/msg_mine")):
        assert result.status_code == 404
        assert result.json["error"]["message"] == "Item with id 'msg_mine' not found."


def test_a_response_in_a_conversation_sees_its_items_and_adds_its_own(app, fake) -> None:
    ident = _create(app, items=[ASKED])["id"]
    fake.script += [_answer("Hello Ada."), _answer("Ada.")]
    first = app.simulate_post("/v1/responses", json={"conversation": ident, "input": "Hi"}).json
    assert first["conversation"] == {"id": ident}
    assert fake.submitted[0]["conversation_history"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "user", "content": "Hi"},
    ]
    body = {"conversation": {"id": ident}, "input": "What is my name?", "instructions": "Be kind."}
    second = app.simulate_post("/v1/responses", json=body).json
    assert fake.submitted[1]["conversation_history"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    items = _items(app, ident, order="asc")["data"]
    assert [(item["type"], item["role"]) for item in items] == [
        ("message", "user"),
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
        ("message", "assistant"),
    ]
    assert items[2] == first["output"][0] and items[4] == second["output"][0]
    # the response's input items are the conversation's, then its own
    listed = app.simulate_get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"})
    assert [item["id"] for item in listed.json["data"]] == [item["id"] for item in items[:4]]


def test_a_streamed_response_adds_its_items_before_it_completes(app, fake) -> None:
    ident = _create(app)["id"]
    fake.script.append(_answer("Hello."))
    body = {"conversation": ident, "input": "Hi", "stream": True}
    text = app.simulate_post("/v1/responses", json=body).text
    events = [
        json.loads(line[len("data: ") :]) for line in text.split("\n") if line.startswith("data: ")
    ]
    assert events[0]["response"]["conversation"] == {"id": ident}
    completed = events[-1]
    assert completed["type"] == "response.completed"
    assert completed["response"]["conversation"] == {"id": ident}
    items = _items(app, ident, order="asc")["data"]
    assert [item["role"] for item in items] == ["user", "assistant"]
    assert items[1] == completed["response"]["output"][0]


def test_a_response_that_fails_or_whose_conversation_went_away_adds_nothing(app, fake) -> None:
    ident = _create(app)["id"]
    fake.script.append(_answer("x"))
    unknown = app.simulate_post(
        "/v1/responses", json={"conversation": "conv_" + "0" * 32, "input": "Hi"}
    )
    assert unknown.status_code == 404
    assert unknown.json["error"]["param"] == "conversation"
    assert fake.submitted == []
    fake.script.insert(
        0, [Dispatched("agent-x", "a1", 0), Tokens(["a"]), Failed(502, "AgentLost", "agent lost")]
    )
    body = {"conversation": ident, "input": "Hi", "stream": True}
    failed = app.simulate_post("/v1/responses", json=body).text
    assert "response.failed" in failed
    assert _items(app, ident)["data"] == []
    fake.submitted.clear()

    real_get = fake.get_response

    async def deleted_meanwhile(response_id: str) -> bytes:
        data = await real_get(response_id)
        if response_id == ident and len(fake.submitted) == 1:
            fake.responses.pop(ident)  # after the response read it, before it ends
        return data

    fake.get_response = deleted_meanwhile  # type: ignore[method-assign]
    answered = app.simulate_post("/v1/responses", json={"conversation": ident, "input": "Hi"})
    assert answered.status_code == 200, answered.text
    assert answered.json["conversation"] is None  # its items had nowhere to go
    assert answered.json["output"][0]["content"][0]["text"] == "x"


def test_concurrent_changes_are_made_again_and_lose_nothing(deps, fake, app) -> None:
    ident = _create(app)["id"]
    real_put = fake.put_response

    async def racing_put(response_id: str, body: bytes, expected: bytes | None = None) -> None:
        if expected is not None and not racing_put.raced:  # type: ignore[attr-defined]
            racing_put.raced = True  # type: ignore[attr-defined]
            record = json.loads(fake.responses[response_id])
            record["items"].append({"type": "message", "id": "msg_other", "role": "user",
                                    "status": "completed", "content": []})  # fmt: skip
            fake.responses[response_id] = json.dumps(record).encode()
        await real_put(response_id, body, expected)

    racing_put.raced = False  # type: ignore[attr-defined]
    fake.put_response = racing_put  # type: ignore[method-assign]
    mine = {"type": "message", "id": "msg_mine", "role": "user", "content": []}
    asyncio.run(change_conversation(deps, ident, lambda record: record["items"].append(mine)))
    ids = [item["id"] for item in json.loads(fake.responses[ident])["items"]]
    assert ids == ["msg_other", "msg_mine"]


def test_a_conversation_that_would_grow_too_large_is_a_400_and_keeps_what_it_had(app, fake) -> None:
    ident = _create(app, items=[ASKED])["id"]
    fake.max_response_bytes = len(fake.responses[ident]) + 50
    long = {"type": "message", "role": "user", "content": "x" * 200}
    result = app.simulate_post(f"/v1/conversations/{ident}/items", json={"items": [long]})
    assert result.status_code == 400, result.text
    assert result.json["error"]["param"] == "items"
    assert len(_items(app, ident)["data"]) == 1
    fake.max_response_bytes = 10
    refused = app.simulate_post("/v1/conversations", json={"items": [ASKED]})
    assert refused.status_code == 400 and refused.json["error"]["param"] == "items"


def test_a_balancer_that_fails_is_an_honest_error(app, fake) -> None:
    async def failing(response_id: str, body: bytes, expected: bytes | None = None) -> None:
        raise RequestFailed(503, "ResponseStoreFailed", "the state database failed")

    fake.put_response = failing  # type: ignore[method-assign]
    result = app.simulate_post("/v1/conversations", json={})
    assert result.status_code == 503, result.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"items": [ASKED] * 21}, "items"),
        ({"items": "Hi"}, "items"),
        ({"items": [{"type": "web_search_call", "id": "w"}]}, "items[0].type"),
        ({"items": [{"type": "reasoning", "summary": []}]}, "items[0]"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"metadata": {str(n): "v" for n in range(17)}}, "metadata"),
        ({"title": "x"}, "title"),
    ],
)
def test_a_bad_conversation_body_is_a_400_naming_its_field(app, fake, body, param) -> None:
    result = app.simulate_post("/v1/conversations", json=body)
    assert result.status_code == 400, result.text
    assert result.json["error"]["param"] == param
    assert fake.responses == {}


def test_bad_ids_parameters_and_bodies_on_a_conversation(app, fake) -> None:
    ident = _create(app, items=[ASKED])["id"]
    for bad in ("conv_nope", "resp_" + "0" * 32, "x" * 300):
        for result in (
            app.simulate_get(f"/v1/conversations/{bad}"),
            app.simulate_delete(f"/v1/conversations/{bad}"),
            app.simulate_get(f"/v1/conversations/{bad}/items"),
            app.simulate_post(f"/v1/conversations/{bad}/items", json={"items": [ASKED]}),
            app.simulate_post(f"/v1/conversations/{bad}", json={"metadata": {}}),
        ):
            assert result.status_code == 404, result.text
    path = f"/v1/conversations/{ident}"
    checks = [
        (app.simulate_post(path, json={}), "metadata"),
        (app.simulate_post(f"{path}/items", json={"items": []}), "items"),
        (app.simulate_post(f"{path}/items", json={}), "items"),
        (app.simulate_get(f"{path}/items", params={"limit": "0"}), "limit"),
        (app.simulate_get(f"{path}/items", params={"after": "msg_none"}), "after"),
        (app.simulate_get(f"{path}/items", params={"include": "x"}), "include"),
        (
            app.simulate_post(f"{path}/items", params={"limit": "2"}, json={"items": [ASKED]}),
            "limit",
        ),
        (app.simulate_get(path, params={"include": "x"}), "include"),
        (app.simulate_delete(path, params={"force": "1"}), "force"),
        (app.simulate_delete(f"{path}/items/x", params={"force": "1"}), "force"),
    ]
    for result, param in checks:
        assert result.status_code == 400, result.text
        assert result.json["error"]["param"] == param
    assert len(_items(app, ident)["data"]) == 1


def test_the_routes_are_in_the_openapi_document(app) -> None:
    paths = app.simulate_get("/openapi.json").json["paths"]
    assert set(paths["/v1/conversations"]) == {"post"}
    assert set(paths["/v1/conversations/{conversation_id}"]) == {"get", "post", "delete"}
    assert set(paths["/v1/conversations/{conversation_id}/items"]) == {"get", "post"}
    assert set(paths["/v1/conversations/{conversation_id}/items/{item_id}"]) == {"get", "delete"}
