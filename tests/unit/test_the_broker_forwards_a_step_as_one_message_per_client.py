"""An agent sends a step's frames as one ``BATCH``; the balancer hands each message
to its request as if it had come alone, and sends each client what the pass gave
it as one message, in order. A bug while handling one message of a batch ends only
that message's request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from paddler.broker.server import BrokerServer
from paddler.broker.settings import BrokerSettings
from paddler.protocol.codec import (
    HEADER,
    batched,
    decode,
    encode,
    messages_of,
    pack_body,
    pack_token_ids,
)
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

LOOPBACK = "tcp://127.0.0.1:*"
SOCKETS: list[zmq.Socket[bytes]] = []


@pytest.fixture
def served() -> Iterator[tuple[BrokerServer, zmq.Context[Any]]]:
    started = threading.Event()
    servers: list[BrokerServer] = []

    def serve() -> None:  # the server lives in its thread (its state store does)
        servers.append(BrokerServer(BrokerSettings(agents_addr=LOOPBACK, clients_addr=LOOPBACK)))
        started.set()
        servers[0].run()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    context: zmq.Context[Any] = zmq.Context()
    try:
        yield servers[0], context
    finally:
        for socket in SOCKETS:
            socket.close(linger=0)
        SOCKETS.clear()
        context.term()
        servers[0].stop()
        thread.join(10)


def _socket(context: zmq.Context[Any], endpoint: str, identity: bytes) -> zmq.Socket[bytes]:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.connect(endpoint)
    SOCKETS.append(socket)
    return socket


def _messages(socket: zmq.Socket[bytes]) -> list[tuple[int, int, Any]]:
    return [decode(message) for message in messages_of(socket.recv_multipart())]


def _tokens(request_id: int, text: str, token: int) -> list[bytes]:
    return [HEADER.pack(Kind.TOKENS, request_id), pack_body([text]), pack_token_ids([token])]


def test_a_step_reaches_each_client_as_one_message_in_order(served) -> None:
    server, context = served
    agent = _socket(context, server.agents.getsockopt_string(zmq.LAST_ENDPOINT), b"agent-1")
    clients_endpoint = server.clients.getsockopt_string(zmq.LAST_ENDPOINT)
    first = _socket(context, clients_endpoint, b"client-1")
    second = _socket(context, clients_endpoint, b"client-2")
    status = {"slots_total": 3, "ready": True, "model_path": "/m"}
    agent.send_multipart(
        encode(Kind.REGISTER, 0, {"version": PROTOCOL_VERSION, "name": "a", "status": status})
    )
    assert decode(agent.recv_multipart())[0] == Kind.REGISTERED
    # two requests of one client, one of another: the agent learns the broker's ids
    first.send_multipart(encode(Kind.SUBMIT, 1, {"raw_prompt": "a"}))
    first.send_multipart(encode(Kind.SUBMIT, 2, {"raw_prompt": "b"}))
    second.send_multipart(encode(Kind.SUBMIT, 1, {"raw_prompt": "c"}))
    dispatched: dict[str, int] = {}
    while len(dispatched) < 3:
        kind, request_id, body = decode(agent.recv_multipart())
        if kind == Kind.DISPATCH:
            dispatched[body["raw_prompt"]] = request_id
    for client in (first, second):  # each client hears where its requests went
        seen = 0
        while seen < (2 if client is first else 1):
            seen += sum(kind == Kind.DISPATCHED for kind, _, _ in _messages(client))
    a, b, c = dispatched["a"], dispatched["b"], dispatched["c"]
    (step,) = batched(
        [
            _tokens(a, "a1", 5),
            _tokens(c, "c1", 6),
            _tokens(b, "b1", 7),
            encode(Kind.DONE, a, {"usage": {"content_tokens": 1}}),
            _tokens(b, "b2", 8),
            # text whose tokens went out with the frame before: an empty ids frame
            [HEADER.pack(Kind.TOKENS, b), pack_body(["b3"]), b""],
        ]
    )
    agent.send_multipart(step)
    got = _messages(first)
    assert [(kind, rid, body) for kind, rid, body in got] == [
        (Kind.TOKENS, 1, ["a1"]),
        (Kind.TOKENS, 2, ["b1"]),
        (Kind.DONE, 1, {"usage": {"content_tokens": 1}}),
        (Kind.TOKENS, 2, ["b2"]),
        (Kind.TOKENS, 2, ["b3"]),
    ]
    assert _messages(second) == [(Kind.TOKENS, 1, ["c1"])]  # one message: sent as it is
    # the token ids stayed with the balancer: the requests can continue elsewhere
    broker = server.broker
    assert broker.requests[b].token_ids is not None
    assert bytes(broker.requests[b].token_ids) == pack_token_ids([7, 8])


def test_a_bug_on_one_message_of_a_batch_ends_only_its_request(served, monkeypatch) -> None:
    server, context = served
    agent = _socket(context, server.agents.getsockopt_string(zmq.LAST_ENDPOINT), b"agent-1")
    client = _socket(context, server.clients.getsockopt_string(zmq.LAST_ENDPOINT), b"client")
    status = {"slots_total": 2, "ready": True, "model_path": "/m"}
    agent.send_multipart(
        encode(Kind.REGISTER, 0, {"version": PROTOCOL_VERSION, "name": "a", "status": status})
    )
    assert decode(agent.recv_multipart())[0] == Kind.REGISTERED
    client.send_multipart(encode(Kind.SUBMIT, 1, {"raw_prompt": "a"}))
    client.send_multipart(encode(Kind.SUBMIT, 2, {"raw_prompt": "b"}))
    dispatched: dict[str, int] = {}
    while len(dispatched) < 2:
        kind, request_id, body = decode(agent.recv_multipart())
        if kind == Kind.DISPATCH:
            dispatched[body["raw_prompt"]] = request_id
    broken = dispatched["a"]
    terminal = server.broker._on_terminal

    def on_terminal(identity: bytes, kind: int, request_id: int, *rest: Any) -> None:
        if request_id == broken:
            raise RuntimeError("a bug")
        terminal(identity, kind, request_id, *rest)

    monkeypatch.setattr(server.broker, "_on_terminal", on_terminal)
    (step,) = batched(
        [
            encode(Kind.DONE, broken, {"usage": {}}),
            _tokens(dispatched["b"], "b1", 7),
            encode(Kind.DONE, dispatched["b"], {"usage": {"content_tokens": 1}}),
        ]
    )
    agent.send_multipart(step)
    ends: dict[int, Any] = {}
    texts: list[Any] = []
    while len(ends) < 2:
        for kind, request_id, body in _messages(client):
            if kind in (Kind.DONE, Kind.ERROR):
                ends[request_id] = (kind, body.get("code"))
            elif kind == Kind.TOKENS:
                texts.append(body)
    assert ends == {1: (Kind.ERROR, 500), 2: (Kind.DONE, None)}
    assert texts == [["b1"]]
