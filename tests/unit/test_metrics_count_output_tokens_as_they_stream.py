"""Output tokens are counted as the broker forwards them, not when their request ends:
each text frame's token ids (``paddler_output_tokens_streamed_total``), so the panel's
"output tokens/s" chart follows a long request while it streams."""

from __future__ import annotations

from typing import Any

from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.http.metrics import render_metrics
from paddler.http.metrics_history import chart_point
from paddler.protocol.codec import decode, encode, make_header, pack_body, pack_token_ids
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

CLIENT = b"client"
AGENT = b"agent-a"


def _broker_with_a_request(client_request_id: int = 1) -> tuple[Broker, int]:
    """A broker, one agent, and one request dispatched to it: its agent-side id."""
    broker = Broker(BrokerSettings())
    body = {"version": PROTOCOL_VERSION, "name": "a", "status": {"slots_total": 2, "ready": True}}
    broker.on_agent_message(AGENT, encode(Kind.REGISTER, 0, body), 0.0)
    submit = pack_body({"raw_prompt": "x", "max_tokens": 100})
    broker.on_client_message(CLIENT, [make_header(Kind.SUBMIT, client_request_id), submit], 0.0)
    (request_id,) = [
        decode(frames)[1]
        for _, identity, frames in broker.outbox
        if identity == AGENT and decode(frames)[0] == Kind.DISPATCH
    ]
    broker.outbox.clear()
    return broker, request_id


def _text(kind: Kind, request_id: int, token_ids: list[int] | None) -> list[bytes]:
    frames = [make_header(kind, request_id), pack_body(["x"] * max(1, len(token_ids or [])))]
    if token_ids is not None:
        frames.append(pack_token_ids(token_ids))
    return frames


def _snapshot(broker: Broker) -> dict[str, Any]:
    return {"metrics": broker.metrics.snapshot(), "agents": [], "buffered": 0}


def test_text_frames_count_their_tokens_as_they_are_forwarded() -> None:
    broker, request_id = _broker_with_a_request()
    start = _snapshot(broker)
    broker.on_agent_message(AGENT, _text(Kind.TOKENS, request_id, [1, 2, 3]), 0.1)
    broker.on_agent_message(AGENT, _text(Kind.REASONING, request_id, [4]), 0.2)
    broker.on_agent_message(AGENT, _text(Kind.TOOL_CALL, request_id, [5, 6]), 0.3)
    assert broker.metrics.output_tokens == 6  # before the request ends
    assert broker.metrics.requests == {}
    midway = _snapshot(broker)
    assert chart_point(start, midway, elapsed_s=2.0, at=2.0)["tokens_per_s"] == 3.0
    assert "paddler_output_tokens_streamed_total 6.0" in render_metrics(midway)

    # the end adds nothing to it (its content_tokens go to the per-agent counter)
    done = {"usage": {"content_tokens": 6}}
    broker.on_agent_message(AGENT, encode(Kind.DONE, request_id, done), 0.4)
    assert broker.metrics.output_tokens == 6
    assert broker.metrics.tokens_by_agent == {"a": 6}


def test_frames_not_forwarded_or_without_token_ids_count_nothing() -> None:
    broker, request_id = _broker_with_a_request()
    broker.on_agent_message(AGENT, _text(Kind.TOKENS, request_id, None), 0.1)  # no ids
    broker.on_agent_message(b"intruder", _text(Kind.TOKENS, request_id, [1, 2]), 0.1)
    broker.on_agent_message(AGENT, _text(Kind.TOKENS, request_id + 99, [1, 2]), 0.1)
    assert broker.metrics.output_tokens == 0
    broker.on_client_message(CLIENT, encode(Kind.CANCEL, 1, {}), 0.2)
    broker.on_agent_message(AGENT, _text(Kind.TOKENS, request_id, [1, 2]), 0.3)  # cancelled
    assert broker.metrics.output_tokens == 0
