"""With curve, an agent is the key it registered with, not the id it claims: a message
under its id that comes with another key means its connection is gone and another
key's connection holds the id (libzmq keeps one connection per id). Nothing from that
connection is accepted, the agent is removed (its streams continue elsewhere), and
its id cannot be registered with the other key."""

from __future__ import annotations

from typing import Any

from paddler.broker.records import Target
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker
from paddler.protocol.codec import (
    HEADER,
    encode,
    make_header,
    pack_body,
    pack_token_ids,
    unpack_body,
)
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

CLIENT = b"client"
KEY = b"A" * 40
OTHER = b"B" * 40


def _register(broker: Broker, agent: bytes, key: bytes, now: float = 0.0) -> None:
    status = {"slots_total": 1, "ready": True, "model_path": "m.gguf"}
    body = {"version": PROTOCOL_VERSION, "name": agent.decode(), "status": status}
    broker.on_agent_message(agent, encode(Kind.REGISTER, 0, body), now, key)


def _sent(broker: Broker) -> list[tuple[Target, bytes, int, int, Any]]:
    out = []
    for target, identity, frames in broker.outbox:
        kind, request_id = HEADER.unpack(frames[0])
        out.append((target, identity, kind, request_id, unpack_body(frames[1])))
    broker.outbox.clear()
    return out


def _streaming(broker: Broker) -> int:
    body = pack_body({"raw_prompt": "x", "max_tokens": 50})
    broker.on_client_message(CLIENT, [make_header(Kind.SUBMIT, 1), body], 0.0)
    (dispatch,) = [s for s in _sent(broker) if s[2] == Kind.DISPATCH]
    request_id = dispatch[3]
    frames = [make_header(Kind.TOKENS, request_id), pack_body(["a"]), pack_token_ids([5])]
    broker.on_agent_message(b"a", frames, 0.1, KEY)
    broker.outbox.clear()
    return request_id


def test_a_message_under_an_agents_id_with_another_key_is_refused_and_ends_the_agent() -> None:
    broker = Broker(BrokerSettings(buffered_request_timeout=5000))
    _register(broker, b"a", KEY)
    _register(broker, b"b", KEY[:-1] + b"C")
    broker.outbox.clear()
    request_id = _streaming(broker)
    assert broker.in_flight.of_agent(b"a") == [request_id]
    dropped = broker.metrics.dropped_frames

    # the other key's connection claims to finish the request: not accepted
    done = encode(Kind.DONE, request_id, {"usage": {"prompt_tokens": 1}})
    broker.on_agent_message(b"a", done, 0.2, OTHER)

    assert broker.metrics.dropped_frames == dropped + 1
    assert b"a" not in broker.agents
    sent = _sent(broker)
    # the client heard no end; its stream continues on the other agent
    assert not [s for s in sent if s[0] is Target.CLIENTS and s[2] == Kind.DONE]
    assert [(s[1], s[2], s[3]) for s in sent if s[0] is Target.AGENTS] == [
        (b"b", Kind.DISPATCH, request_id)
    ]


def test_an_agents_id_cannot_be_registered_with_another_key() -> None:
    broker = Broker(BrokerSettings())
    _register(broker, b"a", KEY)
    broker.outbox.clear()
    _register(broker, b"a", OTHER, 1.0)
    assert b"a" not in broker.agents
    sent = _sent(broker)
    assert [(s[1], s[2], s[4]["kind"]) for s in sent] == [(b"a", Kind.ERROR, "IdentityInUse")]
    # not even once the agent it belonged to is gone
    _register(broker, b"a", OTHER, 2.0)
    assert b"a" not in broker.agents
    # its own key gets it back
    _register(broker, b"a", KEY, 3.0)
    assert broker.agents[b"a"].key == KEY
    heartbeat = encode(Kind.HEARTBEAT, 0, {})
    broker.on_agent_message(b"a", heartbeat, 4.0, KEY)
    assert broker.agents[b"a"].last_heard == 4.0


def test_without_curve_nothing_is_checked() -> None:
    broker = Broker(BrokerSettings())
    status = {"slots_total": 1, "ready": True, "model_path": "m.gguf"}
    body = {"version": PROTOCOL_VERSION, "name": "a", "status": status}
    broker.on_agent_message(b"a", encode(Kind.REGISTER, 0, body), 0.0)
    broker.on_agent_message(b"a", encode(Kind.HEARTBEAT, 0, {}), 1.0)
    assert broker.agents[b"a"].last_heard == 1.0 and broker.agents[b"a"].key is None
