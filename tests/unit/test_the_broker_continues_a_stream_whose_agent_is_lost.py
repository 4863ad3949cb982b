"""The broker's side of continuation, without sockets: which requests continue, on
which agent, with which tokens, and how each of them ends when none can take it."""

from __future__ import annotations

from typing import Any

from paddler.broker.records import Target
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.protocol.codec import (
    HEADER,
    decode,
    encode,
    make_header,
    pack_body,
    pack_token_ids,
    unpack_body,
    unpack_token_ids,
)
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.requests import CONTINUATION, dispatched_request

CLIENT = b"client"
REQUEST = {"raw_prompt": "x", "max_tokens": 50, "seed": 7, "stop": ["zz"]}


def _broker(**settings: Any) -> Broker:
    return Broker(BrokerSettings(buffered_request_timeout=5000, **settings))


def _register(broker: Broker, agent: bytes, model: str = "m.gguf", now: float = 0.0) -> None:
    status = {"slots_total": 1, "ready": True, "model_path": model}
    body = {"version": PROTOCOL_VERSION, "name": agent.decode(), "status": status}
    broker.on_agent_message(agent, encode(Kind.REGISTER, 0, body), now)


def _submit(broker: Broker, request: dict[str, Any] | None = None, client_id: int = 1) -> None:
    body = pack_body(request or REQUEST)
    broker.on_client_message(CLIENT, [make_header(Kind.SUBMIT, client_id), body], 0.0)


def _sent(broker: Broker) -> list[tuple[Target, bytes, int, int, Any]]:
    """(target, identity, kind, request id, body) of everything sent; outbox emptied."""
    out = []
    for target, identity, frames in broker.outbox:
        kind, request_id = HEADER.unpack(frames[0])
        out.append((target, identity, kind, request_id, unpack_body(frames[1])))
    broker.outbox.clear()
    return out


def _dispatch_of(sent: list[Any]) -> tuple[bytes, int, dict[str, Any]]:
    (dispatch,) = [s for s in sent if s[0] is Target.AGENTS and s[2] == Kind.DISPATCH]
    return dispatch[1], dispatch[3], dispatch[4]


def _tokens(broker: Broker, agent: bytes, request_id: int, ids: list[int] | None, now: float):
    frames = [make_header(Kind.TOKENS, request_id), pack_body(["piece"])]
    if ids is not None:
        frames.append(pack_token_ids(ids))
    broker.on_agent_message(agent, frames, now)


def _streaming(broker: Broker, ids: list[list[int]] | None = None) -> tuple[bytes, int]:
    """A request dispatched to agent ``a`` that streamed frames with ``ids``."""
    _submit(broker)
    agent, request_id, _ = _dispatch_of(_sent(broker))
    for frame_ids in [[11], [12, 13]] if ids is None else ids:
        _tokens(broker, agent, request_id, frame_ids, 0.1)
    broker.outbox.clear()
    return agent, request_id


def test_a_lost_agents_streamed_request_continues_with_its_prompt_and_tokens() -> None:
    broker = _broker()
    _register(broker, b"a")
    agent, request_id = _streaming(broker)
    _register(broker, b"b")
    broker.remove_agent(agent, 1.0, reason="stopped answering")
    sent = _sent(broker)
    target, continued_id, body = _dispatch_of(sent)
    assert (target, continued_id) == (b"b", request_id)
    assert dispatched_request(body) is body
    assert unpack_token_ids(body.pop(CONTINUATION)["token_ids"]) == [11, 12, 13]
    assert body["raw_prompt"] == "x" and body["seed"] == 7 and body["stop"] == ["zz"]
    # the client hears of the new agent, and of nothing going wrong
    to_client = [s for s in sent if s[0] is Target.CLIENTS]
    assert [(s[2], s[4]["agent_name"]) for s in to_client] == [(Kind.DISPATCHED, "b")]
    assert broker.metrics.continuations == 1
    # the tokens of both agents count for the next continuation
    _tokens(broker, b"b", request_id, [14], 1.1)
    _register(broker, b"c")
    broker.outbox.clear()
    broker.remove_agent(b"b", 1.2, reason="deregistered")
    _, _, body = _dispatch_of(_sent(broker))
    assert unpack_token_ids(body[CONTINUATION]["token_ids"]) == [11, 12, 13, 14]


def test_a_continuation_waits_for_an_agent_with_the_same_model_ahead_of_the_buffer() -> None:
    broker = _broker()
    _register(broker, b"a", model="one.gguf")
    agent, request_id = _streaming(broker)
    _register(broker, b"other-model", model="two.gguf")
    broker.outbox.clear()
    broker.remove_agent(agent, 1.0, reason="stopped answering")
    assert _sent(broker) == [] and list(broker.continuing) == [request_id]
    _submit(broker, client_id=2)  # a newer request takes the other model's free slot
    assert _dispatch_of(_sent(broker))[0] == b"other-model"
    _submit(broker, client_id=3)  # and the next one waits in the buffer
    assert broker.waiting() == 2
    _register(broker, b"same-model", model="one.gguf", now=2.0)
    dispatched = [s for s in _sent(broker) if s[2] == Kind.DISPATCH]
    assert [(s[1], CONTINUATION in s[4]) for s in dispatched] == [(b"same-model", True)]


def test_a_continuation_nobody_takes_fails_with_502_after_the_buffered_timeout() -> None:
    broker = _broker()
    _register(broker, b"a")
    agent, _ = _streaming(broker)
    broker.remove_agent(agent, 1.0, reason="stopped answering")
    broker.tick(5.9)
    assert all(s[2] != Kind.ERROR for s in _sent(broker))
    broker.tick(6.0)
    (error,) = [s for s in _sent(broker) if s[2] == Kind.ERROR]
    assert (error[4]["code"], error[4]["kind"]) == (502, "AgentLost")
    assert (
        "agent stopped answering while generating; no agent with its model"
        in error[4]["description"]
    )
    assert not broker.requests and not broker.continuing
    assert broker.metrics.requests["AgentLost"] == 1


def test_a_client_cancelling_while_its_request_waits_to_continue_ends_it_at_once() -> None:
    broker = _broker()
    _register(broker, b"a")
    agent, _ = _streaming(broker)
    broker.remove_agent(agent, 1.0, reason="stopped answering")
    broker.on_client_message(CLIENT, encode(Kind.CANCEL, 1, {}), 1.5)
    assert not broker.requests and not broker.continuing and broker.waiting() == 0
    assert dict(broker.metrics.requests) == {"cancelled": 1}


def test_an_engine_restart_moves_streamed_requests_and_restarts_unstarted_ones() -> None:
    broker = _broker()
    _register(broker, b"a")
    agent, request_id = _streaming(broker)
    _register(broker, b"b")
    # the worker reports the failed engine (not ready) before it ends the requests
    failed = {"slots_total": 1, "ready": False, "model_path": "m.gguf"}
    broker.on_agent_message(agent, encode(Kind.AGENT_STATUS, 0, failed), 0.9)
    body = {"code": 503, "kind": "AgentEngineRestarted", "description": "it broke"}
    broker.on_agent_message(agent, encode(Kind.ERROR, request_id, body), 1.0)
    target, _, dispatched = _dispatch_of(_sent(broker))
    assert target == b"b" and CONTINUATION in dispatched
    # unstarted: sent again from the start, not continued
    broker.on_agent_message(agent, encode(Kind.AGENT_STATUS, 0, {**failed, "ready": True}), 2.0)
    _submit(broker, client_id=2)
    _, unstarted, _ = _dispatch_of(_sent(broker))
    broker.on_agent_message(agent, encode(Kind.AGENT_STATUS, 0, failed), 2.1)
    broker.on_agent_message(agent, encode(Kind.ERROR, unstarted, body), 2.2)
    assert broker.buffer.ids() == [unstarted] and broker.metrics.continuations == 1


def test_what_cannot_continue_fails_with_502_as_before() -> None:
    # continuations off; out of continuations; text without its token ids
    for settings, ids, streams in (
        ({"max_continuations": 0}, None, 1),
        ({"max_continuations": 1}, None, 2),
        ({}, [[11], None], 1),
    ):
        broker = _broker(**settings)
        _register(broker, b"a0")
        frames: list[Any] = ids or [[11]]
        agent, request_id = _streaming(broker, [f for f in frames if f is not None])
        if None in frames:
            _tokens(broker, agent, request_id, None, 0.2)
        for index in range(1, streams):
            _register(broker, f"a{index}".encode())
            broker.remove_agent(agent, 1.0, reason="stopped answering")
            agent, _, _ = _dispatch_of(_sent(broker))
            _tokens(broker, agent, request_id, [12], 1.1)
        broker.outbox.clear()
        _register(broker, b"spare")
        broker.remove_agent(agent, 2.0, reason="stopped answering")
        errors = [s for s in _sent(broker) if s[2] == Kind.ERROR]
        assert [(e[4]["code"], e[4]["kind"]) for e in errors] == [(502, "AgentLost")], settings
        assert not broker.requests


def test_an_embedding_request_never_continues() -> None:
    broker = _broker()
    _register(broker, b"a")
    _submit(broker, {"input_batch": [{"id": "d", "content": "x"}]})
    agent, request_id, _ = _dispatch_of(_sent(broker))
    broker.on_agent_message(
        agent, [make_header(Kind.EMBEDDING, request_id), pack_body({"Embedding": {}})], 0.1
    )
    _register(broker, b"b")
    broker.outbox.clear()
    broker.remove_agent(agent, 1.0, reason="stopped answering")
    assert [decode(f)[0] for _, _, f in broker.outbox] == [Kind.ERROR]


def test_three_frames_are_only_for_tokens() -> None:
    broker = _broker()
    _register(broker, b"a")
    frames = [*encode(Kind.HEARTBEAT, 0, {}), b"\x00\x00\x00\x00"]
    broker.on_agent_message(b"a", frames, 0.1)
    assert broker.metrics.dropped_frames == 1


def test_tool_call_text_counts_for_continuation_and_parsed_calls_are_forwarded() -> None:
    broker = _broker()
    _register(broker, b"a")
    agent, request_id = _streaming(broker, [[11]])
    text = [
        make_header(Kind.TOOL_CALL, request_id),
        pack_body(["<tool_call>"]),
        pack_token_ids([21, 22]),
    ]
    broker.on_agent_message(agent, text, 0.2)
    outcome = {"outcome": "parsed", "calls": [], "errors": [], "text": "<tool_call>"}
    broker.on_agent_message(agent, encode(Kind.TOOL_CALLS, request_id, outcome), 0.3)
    forwarded = [(s[2], s[4]) for s in _sent(broker) if s[0] is Target.CLIENTS]
    assert forwarded == [(Kind.TOOL_CALL, ["<tool_call>"]), (Kind.TOOL_CALLS, outcome)]
    _register(broker, b"b")
    broker.remove_agent(agent, 1.0, reason="stopped answering")
    _, _, body = _dispatch_of(_sent(broker))
    assert unpack_token_ids(body[CONTINUATION]["token_ids"]) == [11, 21, 22]
