"""A bug in one handler of the broker's socket loop (removing an unreachable agent,
cancelling a lost client's requests, the timers, one message) is logged with its
traceback and the loop goes on serving; the request it was about ends with 500
``InternalError``. A bug that fires again and again is logged a few times a minute,
then summed up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
import zmq

from paddler.broker.server import FAULTS_LOGGED_PER_HANDLER, BrokerServer
from paddler.broker.settings import BrokerSettings
from paddler.protocol.codec import decode, encode, make_header, pack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

LOOPBACK = "tcp://127.0.0.1:*"


def _bug(*_: Any, **__: Any) -> NoReturn:
    raise RuntimeError("a bug")


@pytest.fixture
def server() -> Iterator[BrokerServer]:
    server = BrokerServer(BrokerSettings(agents_addr=LOOPBACK, clients_addr=LOOPBACK))
    try:
        yield server
    finally:
        if not server.context.closed:
            server.close()


def _bugs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    records = [r for r in caplog.records if r.name == "paddler.broker" and r.levelno >= 40]
    caplog.clear()
    return records


def test_a_bug_removing_an_unreachable_agent_or_client_is_logged_and_the_flush_goes_on(
    server: BrokerServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="paddler.broker")
    broker = server.broker
    body = {"version": PROTOCOL_VERSION, "name": "ghost", "status": {"slots_total": 1}}
    broker.on_agent_message(b"ghost", encode(Kind.REGISTER, 0, body), 0.0)  # not connected
    broker.outbox.append(broker.outbox[0])  # two sends fail: two bugs, both logged
    broker.on_client_message(b"gone", encode(Kind.PING, 1, {"version": PROTOCOL_VERSION}), 0.0)
    monkeypatch.setattr(broker, "remove_agent", _bug)
    monkeypatch.setattr(broker, "client_lost", _bug)

    server._flush()

    bugs = _bugs(caplog)
    assert [r.getMessage() for r in bugs] == [
        "bug while handling removing an unreachable agent (67686f7374); the broker goes on",
        "bug while handling removing an unreachable agent (67686f7374); the broker goes on",
        "bug while handling cancelling the requests of an unreachable client (676f6e65); "
        "the broker goes on",
    ]
    assert all(r.exc_info is not None and r.exc_info[0] is RuntimeError for r in bugs)
    assert broker.outbox == []


def test_a_bug_in_the_timers_is_logged_a_few_times_a_minute_then_summed_up(
    server: BrokerServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="paddler.broker")
    monkeypatch.setattr(server.broker, "tick", _bug)
    start = server.faults.window_s * 10
    for i in range(FAULTS_LOGGED_PER_HANDLER + 3):
        server._tick(start + i * 0.05)
    bugs = _bugs(caplog)
    assert len(bugs) == FAULTS_LOGGED_PER_HANDLER
    assert bugs[0].getMessage() == "bug while handling the timers; the broker goes on"
    assert all(r.exc_info is not None for r in bugs)

    monkeypatch.undo()
    server._tick(start + server.faults.window_s + 1)
    assert [r.getMessage() for r in _bugs(caplog)] == [
        "3 more bugs while handling the timers in the last 60 s (not logged one by one)"
    ]


def test_the_loop_serves_on_through_a_bug_in_a_message_handler_and_in_its_timers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="paddler.broker")
    started = threading.Event()
    servers: list[BrokerServer] = []

    def serve() -> None:  # the server lives in its thread (its state store does)
        server = BrokerServer(BrokerSettings(agents_addr=LOOPBACK, clients_addr=LOOPBACK))
        server.broker._on_submit = _bug  # type: ignore[method-assign]
        server.broker.tick = _bug  # type: ignore[method-assign]
        servers.append(server)
        started.set()
        server.run()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    [server] = servers
    context = zmq.Context()
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        client.connect(server.clients.getsockopt_string(zmq.LAST_ENDPOINT))
        client.send_multipart([make_header(Kind.SUBMIT, 7), pack_body({"raw_prompt": "x"})])
        kind, request_id, error = decode(client.recv_multipart())
        assert (kind, request_id, error["code"], error["kind"]) == (
            Kind.ERROR,
            7,
            500,
            "InternalError",
        )
        client.send_multipart(encode(Kind.PING, 8, {"version": PROTOCOL_VERSION}))
        assert decode(client.recv_multipart())[:2] == (Kind.PONG, 8)
    finally:
        client.close()
        context.term()
        server.stop()
        thread.join(10)
    assert not thread.is_alive()
    messages = [r.getMessage() for r in _bugs(caplog)]
    assert any(m.startswith("bug while handling a message from a client (") for m in messages)
    assert "bug while handling the timers; the broker goes on" in messages
    assert server.broker.metrics.requests == {"InternalError": 1}


def test_a_query_whose_handler_has_a_bug_is_answered_not_left_waiting(
    server: BrokerServer,
) -> None:
    broker = server.broker
    broker.handler_failed(False, b"c", encode(Kind.GET_AGENTS, 9, {}), 0.0)
    broker.handler_failed(False, b"c", encode(Kind.CANCEL, 10, {}), 0.0)
    answers = [decode(frames) for _, identity, frames in broker.outbox if identity == b"c"]
    assert [(kind, request_id, body["code"]) for kind, request_id, body in answers] == [
        (Kind.ERROR, 9, 500)
    ]
    assert broker.metrics.requests == {}  # a query is not a request


class _FailingSocket:
    """A socket whose sends fail with an error that is not a peer gone (once)."""

    def __init__(self, socket: Any, errno_: int) -> None:
        self.socket = socket
        self.errno = errno_

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        if self.errno:
            errno_, self.errno = self.errno, 0
            raise zmq.ZMQError(errno_)
        self.socket.send_multipart(frames, flags)


def test_a_send_that_fails_for_another_reason_than_a_gone_peer_loses_only_that_message(
    server: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="paddler.broker")
    context = zmq.Context()
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.setsockopt(zmq.IDENTITY, b"client-1")
    client.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        client.connect(server.clients.getsockopt_string(zmq.LAST_ENDPOINT))
        client.send_multipart(encode(Kind.PING, 1, {"version": PROTOCOL_VERSION}))
        real = server.clients
        assert real.poll(5000)
        server._drain(real, False)
        server.clients = _FailingSocket(real, zmq.EINVAL)  # type: ignore[assignment]
        server._flush()  # the pong is lost; nothing raises
        bugs = _bugs(caplog)
        assert [r.getMessage() for r in bugs] == [
            "bug while handling a send (636c69656e742d31); the broker goes on"
        ]
        server.clients = real
        client.send_multipart(encode(Kind.PING, 2, {"version": PROTOCOL_VERSION}))
        assert real.poll(5000)
        server._drain(real, False)
        server._flush()
        assert decode(client.recv_multipart())[:2] == (Kind.PONG, 2)
    finally:
        client.close()
        context.term()
