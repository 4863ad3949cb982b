"""The inference and management resources through ``falcon.testing``, with a fake
broker client (no sockets, no server)."""

from __future__ import annotations

import json
from typing import Any

import falcon.testing
import pytest

from paddler.client import Dispatched, Done, Embedding, Failed, Tokens
from paddler.http import inference, management
from paddler.http.common import HttpDeps
from paddler.protocol.messages import Usage
from tests.unit.fake_broker import AGENT, FakeClient, FakeLink


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
        ("/api/v1/continue_from_raw_prompt", {"raw_prompt": "x", "logprobs": True}, "logprobs"),
        (
            "/api/v1/continue_from_raw_prompt",
            {"raw_prompt": "x", "tools": [{"type": "function", "function": {}}]},
            "tools[0].function.name",
        ),
        (
            "/api/v1/generate_embedding_batch",
            {"input_batch": [{"id": "a", "content": "x"}], "normalization_method": "L3"},
            "normalization_method",
        ),
        (  # only a forced choice's grammar keeps to one call
            "/api/v1/continue_from_conversation_history",
            {
                "conversation_history": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "parallel_tool_calls": False,
            },
            "parallel_tool_calls",
        ),
        (  # a tool choice that cannot be honoured: a 400 before the stream, not in it
            "/api/v1/continue_from_conversation_history",
            {
                "conversation_history": [{"role": "user", "content": "hi"}],
                "tool_choice": "required",
            },
            "tool_choice",
        ),
        (  # the agents serve text-only models
            "/api/v1/continue_from_conversation_history",
            {
                "conversation_history": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                        ],
                    }
                ]
            },
            "conversation_history[0].content[1]",
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


def test_reasoning_streams_as_paddlers_reasoning_token() -> None:
    from paddler.client import Reasoning
    from paddler.http.envelopes import generation_messages

    (envelope,) = generation_messages("r1", "a1", Reasoning(["hmm"]))
    assert envelope["Response"]["response"] == {"GeneratedToken": {"ReasoningToken": "hmm"}}
