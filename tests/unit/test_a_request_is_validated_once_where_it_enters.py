"""A request is validated once, where it enters: the balancer's own HTTP workers
(known by their key, with curve) validated theirs, so the broker checks only its wire
shape and forwards its frame as it came; any other client's request is validated at
the broker, its edge."""

from __future__ import annotations

from typing import Any

import pytest

import paddler.broker.state as state_module
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker, submitted_request
from paddler.http.inference import generation_request
from paddler.http.openai.responses_body import ResponsesBody
from paddler.http.openai.schemas import ChatCompletionBody, CompletionBody
from paddler.protocol.codec import HEADER, encode, make_header, pack_body, unpack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.requests import (
    CONTINUATION,
    ConversationRequest,
    EmbeddingRequest,
    RawPromptRequest,
    validate_request,
)
from paddler.protocol.shapes import check

WORKER = b"W" * 40
OTHER = b"O" * 40


def _broker(monkeypatch: pytest.MonkeyPatch) -> tuple[Broker, list[Any]]:
    broker = Broker(BrokerSettings())
    broker.trusted_clients = frozenset({WORKER})
    status = {"slots_total": 4, "ready": True, "model_path": "m.gguf"}
    body = {"version": PROTOCOL_VERSION, "name": "a", "status": status}
    broker.on_agent_message(b"a", encode(Kind.REGISTER, 0, body), 0.0)
    broker.outbox.clear()
    validated: list[Any] = []

    def counting(request: Any) -> dict[str, Any]:
        validated.append(request)
        return validate_request(request)

    monkeypatch.setattr(state_module, "validate_request", counting)
    return broker, validated


def _dispatched(broker: Broker) -> bytes:
    (frames,) = [f for _, _, f in broker.outbox if HEADER.unpack(f[0])[0] == Kind.DISPATCH]
    return frames[1]


def test_a_workers_request_is_checked_for_shape_only_and_goes_on_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, validated = _broker(monkeypatch)
    body = pack_body(generation_request({"raw_prompt": "x", "max_tokens": 3}, RawPromptRequest))
    broker.on_client_message(b"w", [make_header(Kind.SUBMIT, 1), body], 0.0, WORKER)
    assert validated == []
    assert _dispatched(broker) == body  # the same bytes


def test_any_other_clients_request_is_validated_at_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, validated = _broker(monkeypatch)
    body = pack_body({"raw_prompt": "x", "max_tokens": 3})
    for client, key in ((b"c", OTHER), (b"d", None)):
        broker.on_client_message(client, [make_header(Kind.SUBMIT, 1), body], 0.0, key)
    assert len(validated) == 2
    # a bad value from a client nobody vouches for is a 400 naming it
    bad = pack_body({"raw_prompt": "x", "max_tokens": -1})
    broker.outbox.clear()
    broker.on_client_message(b"e", [make_header(Kind.SUBMIT, 1), bad], 0.0, OTHER)
    ((_, _, frames),) = broker.outbox
    assert unpack_body(frames[1])["kind"] == "InvalidRequest"


def test_a_worker_frame_that_is_not_a_wire_form_is_validated_after_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, validated = _broker(monkeypatch)
    wire = generation_request({"raw_prompt": "x"}, RawPromptRequest)
    for client_id, body in enumerate(
        ({"raw_prompt": "x"}, {**wire, CONTINUATION: {"token_ids": b""}}), start=1
    ):
        frames = [make_header(Kind.SUBMIT, client_id), pack_body(body)]
        broker.on_client_message(b"w", frames, 0.0, WORKER)
    assert len(validated) == 2


def test_every_request_the_http_services_build_passes_the_shape_check() -> None:
    chat = check(ChatCompletionBody, {"messages": [{"role": "user", "content": "hi"}]})
    completion = check(CompletionBody, {"prompt": "hi", "max_tokens": 4})
    responses = check(ResponsesBody, {"input": "hi"})
    built = [
        generation_request({"raw_prompt": "x"}, RawPromptRequest),
        generation_request(
            {"conversation_history": [{"role": "user", "content": "hi"}]}, ConversationRequest
        ),
        check(EmbeddingRequest, {"input_batch": [{"id": "a", "content": "x"}]}).wire(),
        chat.to_request(),
        {**chat.to_request(), "count_only": True},
        completion.to_request(),
        responses.broker_request(responses.input_messages([])),
    ]
    for request in built:
        assert submitted_request(pack_body(request)) == request, sorted(request)
