"""The inference and management resources through ``falcon.testing``, with a fake
broker client (no sockets, no server)."""

from __future__ import annotations

import json
from typing import Any

import falcon.testing
import pytest

from paddler.client import Dispatched, Done, Embedding, Failed, Tokens
from paddler.errors import BrokerUnreachable, ConfigurationError, RequestFailed
from paddler.http import inference, management
from paddler.http.common import HttpDeps
from paddler.protocol.messages import Usage

AGENT = {
    "id": "agent-x",
    "name": "a1",
    "slots_total": 4,
    "slots_processing": 1,
    "desired_slots_total": 4,
    "model_path": "/m.gguf",
    "issues": [],
    "state_application_status": "Applied",
    "uses_chat_template_override": False,
    "download_current": 0,
    "download_total": 0,
    "download_filename": None,
    "download_indeterminate": True,
    "ready": True,
}


class FakeStream:
    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeClient:
    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.script: list[list[Any]] = []
        self.state: dict[str, Any] = {"model": "None"}
        self.put: list[dict[str, Any]] = []
        self.unreachable = False

    async def submit(self, request: dict[str, Any]) -> FakeStream:
        if self.unreachable:
            raise BrokerUnreachable("fake broker is down")
        self.submitted.append(request)
        return FakeStream(self.script.pop(0) if self.script else [])

    async def generate_embedding_batch(self, documents: list[Any], method: Any) -> FakeStream:
        return await self.submit({"input_batch": documents, "normalization_method": method})

    async def agents(self) -> list[dict[str, Any]]:
        if self.unreachable:
            raise BrokerUnreachable("fake broker is down")
        return [dict(AGENT)]

    async def buffered_requests(self) -> int:
        return 2

    async def desired_state(self) -> dict[str, Any]:
        return self.state

    async def applicable_state(self) -> dict[str, Any] | None:
        return None

    async def put_desired_state(self, state: dict[str, Any]) -> None:
        if "bad" in state:
            raise ConfigurationError("bad", "unknown field")
        self.put.append(state)

    async def agent_info(self, agent_id: str, what: str) -> Any:
        if agent_id != "agent-x":
            raise RequestFailed(404, "UnknownAgent", f"no agent {agent_id!r}")
        if what == "model_metadata":
            return {"metadata": {"general.name": "m"}}
        return None

    async def metrics(self) -> dict[str, Any]:
        histogram = {"buckets": [0.1, 1.0], "cumulative": [1, 2, 2], "count": 2, "sum": 0.6}
        return {
            "agents": [AGENT],
            "buffered": 2,
            "metrics": {
                "queue_wait_seconds": histogram,
                "time_to_first_token_seconds": histogram,
                "inter_token_seconds": histogram,
                "requests": {"done": 2},
                "tokens_by_agent": {"a1": 10},
                "requests_by_agent": {"a1": 2},
            },
        }


class FakeLink:
    def __init__(self, client: FakeClient) -> None:
        self._client = client
        self.resets = 0

    async def client(self) -> FakeClient:
        return self._client

    async def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


@pytest.fixture
def inference_app(fake: FakeClient) -> falcon.testing.TestClient:
    deps = HttpDeps(link=FakeLink(fake), max_body_bytes=2048)  # type: ignore[arg-type]
    return falcon.testing.TestClient(inference.create_app(deps))


@pytest.fixture
def management_app(fake: FakeClient) -> falcon.testing.TestClient:
    deps = HttpDeps(link=FakeLink(fake), max_body_bytes=2048)  # type: ignore[arg-type]
    return falcon.testing.TestClient(management.create_app(deps))


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_health(inference_app, management_app) -> None:
    for app in (inference_app, management_app):
        result = app.simulate_get("/health")
        assert (result.status_code, result.text) == (200, "OK")


def test_a_raw_prompt_streams_paddler_envelopes(inference_app, fake) -> None:
    fake.script.append(
        [
            Dispatched("agent-x", "a1", 0),
            Tokens(["He", "llo"]),
            Done(Usage(prompt_tokens=2, content_tokens=2)),
        ]
    )
    result = inference_app.simulate_post(
        "/api/v1/continue_from_raw_prompt", json={"raw_prompt": "Hi", "max_tokens": 2}
    )
    assert result.status_code == 200
    lines = _lines(result.text)
    assert [line["Response"]["response"]["GeneratedToken"] for line in lines] == [
        {"ContentToken": "He"},
        {"ContentToken": "llo"},
        {"Done": {"usage": Usage(prompt_tokens=2, content_tokens=2).to_body()}},
    ]
    assert {line["Response"]["generated_by"] for line in lines} == {"a1"}
    assert fake.submitted[0]["raw_prompt"] == "Hi" and fake.submitted[0]["max_tokens"] == 2


def test_token_errors_and_broker_errors_use_their_envelopes(inference_app, fake) -> None:
    fake.script.append(
        [Dispatched("agent-x", "a1", 0), Failed(400, "ChatTemplateError", "template failed")]
    )
    fake.script.append([Failed(503, "BufferOverflow", "Buffered requests overflow")])
    body = {"conversation_history": [{"role": "user", "content": "hi"}]}
    first = _lines(
        inference_app.simulate_post("/api/v1/continue_from_conversation_history", json=body).text
    )
    assert first[0]["Response"]["response"] == {
        "GeneratedToken": {"ChatTemplateError": "template failed"}
    }
    second = _lines(
        inference_app.simulate_post("/api/v1/continue_from_conversation_history", json=body).text
    )
    assert second[0]["Error"]["error"] == {"code": 503, "description": "Buffered requests overflow"}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/continue_from_raw_prompt", {"conversation_history": []}, "raw_prompt"),
        ("/api/v1/continue_from_raw_prompt", {"raw_prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/api/v1/continue_from_raw_prompt", {"raw_prompt": "x", "seed": "s"}, "seed"),
        (
            "/api/v1/continue_from_conversation_history",
            {"conversation_history": []},
            "conversation_history",
        ),
        (
            "/api/v1/continue_from_conversation_history",
            {"conversation_history": [{"role": "user"}]},
            "conversation_history[0].content",
        ),
        ("/api/v1/generate_embedding_batch", {"input_batch": []}, "input_batch"),
        (
            "/api/v1/generate_embedding_batch",
            {"input_batch": [{"id": "a", "content": "x"}], "normalization_method": "L3"},
            "normalization_method",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_field(inference_app, path, body, field) -> None:
    result = inference_app.simulate_post(path, json=body)
    assert result.status_code == 400
    assert result.json["field"] == field


def test_malformed_and_oversized_bodies(inference_app) -> None:
    malformed = inference_app.simulate_post(
        "/api/v1/continue_from_raw_prompt",
        body=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json["error"]
    huge = inference_app.simulate_post(
        "/api/v1/continue_from_raw_prompt", json={"raw_prompt": "x" * 5000}
    )
    assert huge.status_code == 413


def test_an_unreachable_broker_is_reported_in_band(inference_app, fake) -> None:
    fake.unreachable = True
    lines = _lines(
        inference_app.simulate_post(
            "/api/v1/continue_from_raw_prompt", json={"raw_prompt": "x"}
        ).text
    )
    assert lines[0]["Error"]["error"]["code"] == 503


def test_an_embedding_batch_fans_out_and_ends_with_one_done(inference_app, fake) -> None:
    result = {
        "Embedding": {
            "embedding": [1.0],
            "normalization_method": "L2",
            "pooling_type": "Last",
            "source_document_id": "a",
        }
    }
    fake.script.append([Dispatched("agent-x", "a1", 0), Embedding(result), Done(Usage())])
    lines = _lines(
        inference_app.simulate_post(
            "/api/v1/generate_embedding_batch",
            json={"input_batch": [{"id": "a", "content": "x"}], "normalization_method": "L2"},
        ).text
    )
    assert [line["Response"]["response"] for line in lines] == [
        {"Embedding": result},
        {"Embedding": "Done"},
    ]


def test_agents_buffered_and_snapshots(management_app) -> None:
    agents = management_app.simulate_get("/api/v1/agents").json["agents"]
    assert agents == [{k: v for k, v in AGENT.items() if k != "ready"}]
    assert management_app.simulate_get("/api/v1/buffered_requests").json == {
        "buffered_requests_current": 2
    }
    assert management_app.simulate_get("/api/v1/balancer_applicable_state").json is None


def test_desired_state_get_and_put(management_app, fake) -> None:
    assert management_app.simulate_get("/api/v1/balancer_desired_state").json == {"model": "None"}
    ok = management_app.simulate_put("/api/v1/balancer_desired_state", json={"model": "None"})
    assert ok.status_code == 204 and fake.put == [{"model": "None"}]
    bad = management_app.simulate_put("/api/v1/balancer_desired_state", json={"bad": 1})
    assert bad.status_code == 400 and bad.json["field"] == "bad"
    not_object = management_app.simulate_put("/api/v1/balancer_desired_state", json=[1])
    assert not_object.status_code == 400


def test_agent_details_and_unknown_agents(management_app) -> None:
    metadata = management_app.simulate_get("/api/v1/agent/agent-x/model_metadata")
    assert metadata.json == {"metadata": {"general.name": "m"}}
    override = management_app.simulate_get("/api/v1/agent/agent-x/chat_template_override")
    assert override.status_code == 200 and override.json is None
    unknown = management_app.simulate_get("/api/v1/agent/nobody/model_metadata")
    assert unknown.status_code == 404


def test_metrics_render_prometheus_text(management_app) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    result = management_app.simulate_get("/metrics")
    assert result.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(result.text)}
    assert {
        "paddler_slots_processing",
        "paddler_slots_total",
        "paddler_requests_buffered",
        "paddler_time_to_first_token_seconds",
        "paddler_generated_tokens",
    } <= names
