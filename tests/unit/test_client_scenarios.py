"""The same scenarios against both clients (``Client`` and ``AsyncClient``), through
a small adapter parametrized ``sync`` / ``asyncio``, against a real ZeroMQ ROUTER on
a free loopback port: a scripted broker run by a thread, which records what the
client sends and answers by script. Every socket has linger 0, every wait is bounded.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import zmq

from paddler.client import (
    AsyncClient,
    AsyncStream,
    Client,
    Dispatched,
    Done,
    Event,
    Failed,
    Stream,
    Tokens,
)
from paddler.client.requests import raw_prompt_request
from paddler.errors import BrokerUnreachable, ConfigurationError, RequestFailed
from paddler.protocol.codec import HEADER, encode, unpack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.messages import Usage

WAIT_S = 5.0
"""The longest any step of a scenario may take."""

Answer = Callable[[int, Any], list[list[bytes]]]
"""What the scripted broker sends back for one message: ``(request_id, body) -> messages``."""


def error(request_id: int, code: int, kind: str, description: str) -> list[bytes]:
    return encode(Kind.ERROR, request_id, {"code": code, "kind": kind, "description": description})


def usage_body(content_tokens: int) -> dict[str, Any]:
    return {"usage": {"prompt_tokens": 2, "content_tokens": content_tokens}}


def generation(request_id: int, *steps: list[str]) -> list[list[bytes]]:
    """Dispatched, one TOKENS message per step, Done."""
    messages = [
        encode(
            Kind.DISPATCHED,
            request_id,
            {"agent_id": "agent-1", "agent_name": "a1", "queued_ms": 3},
        )
    ]
    messages += [encode(Kind.TOKENS, request_id, step) for step in steps]
    messages.append(encode(Kind.DONE, request_id, usage_body(sum(map(len, steps)))))
    return messages


class ScriptedBroker:
    """A ROUTER socket served by a thread. ``answers`` maps a kind to what to send
    back; ``silent`` makes it answer nothing; ``send`` pushes messages to the client."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.answers: dict[int, Answer] = {
            Kind.PING: lambda rid, body: [encode(Kind.PONG, rid, {"version": PROTOCOL_VERSION})]
        }
        self.silent = threading.Event()
        self._received: list[tuple[int, int, Any]] = []
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._peer: bytes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-broker", daemon=True)
        self._thread.start()

    def received(self, kind: Kind) -> list[tuple[int, Any]]:
        """``(request_id, body)`` of every message of ``kind`` received so far."""
        with self._lock:
            return [(rid, body) for k, rid, body in self._received if k == kind]

    def send(self, *messages: list[bytes]) -> None:
        """Send to the client that spoke last."""
        for message in messages:
            self._outbox.put(message)

    def _serve(self) -> None:
        socket = self.socket
        while not self._stop.is_set():
            if socket.poll(10):
                identity, *frames = socket.recv_multipart()
                self._peer = identity
                for reply in self._handle(frames):
                    socket.send_multipart([identity, *reply])
            while self._peer is not None:
                try:
                    message = self._outbox.get_nowait()
                except queue.Empty:
                    break
                socket.send_multipart([self._peer, *message])

    def _handle(self, frames: list[bytes]) -> list[list[bytes]]:
        kind, request_id = HEADER.unpack(frames[0])
        body = unpack_body(frames[1])
        with self._lock:
            self._received.append((kind, request_id, body))
        answer = self.answers.get(kind)
        if self.silent.is_set() or answer is None:
            return []
        return answer(request_id, body)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        self.socket.close(linger=0)
        self.context.term()


class SyncApi:
    """The scenarios' verbs, done with ``Client``."""

    name = "Client"
    end_of_stream: type[Exception] = StopIteration

    def __init__(self) -> None:
        self.clients: list[Client] = []

    def connect(self, address: str, timeout_s: float = WAIT_S) -> Any:
        client = Client(address, timeout_s=timeout_s)
        self.clients.append(client)
        return client

    def call(self, client: Any, method: str, *args: Any, **options: Any) -> Any:
        return getattr(client, method)(*args, **options)

    def next(self, stream: Any) -> Event:
        return next(stream)  # type: ignore[no-any-return]

    def events(self, stream: Any) -> list[Event]:
        return list(stream)

    def text(self, stream: Any) -> str:
        return stream.text()  # type: ignore[no-any-return]

    def texts(self, streams: list[Any]) -> list[str]:
        """Read streams in the reverse order of their submission."""
        return [stream.text() for stream in reversed(streams)][::-1]

    def leave_block(self, stream: Any) -> None:
        with stream:
            pass

    def close(self, client: Any) -> None:
        client.close()

    def wait_until(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.01)

    def shutdown(self) -> None:
        for client in self.clients:
            client.close()


class AsyncApi:
    """The same verbs done with ``AsyncClient`` on a loop of the test's own; the loop
    runs only while a verb runs, as a loop does between awaits."""

    name = "AsyncClient"
    end_of_stream: type[Exception] = StopAsyncIteration

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clients: list[AsyncClient] = []

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, WAIT_S * 2))

    def connect(self, address: str, timeout_s: float = WAIT_S) -> Any:
        client = self.run(AsyncClient.connect(address, timeout_s=timeout_s))
        self.clients.append(client)
        return client

    def call(self, client: Any, method: str, *args: Any, **options: Any) -> Any:
        return self.run(getattr(client, method)(*args, **options))

    def next(self, stream: Any) -> Event:
        return self.run(stream.__anext__())  # type: ignore[no-any-return]

    def events(self, stream: Any) -> list[Event]:
        async def collect() -> list[Event]:
            return [event async for event in stream]

        return self.run(collect())  # type: ignore[no-any-return]

    def text(self, stream: Any) -> str:
        return self.run(stream.text())  # type: ignore[no-any-return]

    def texts(self, streams: list[Any]) -> list[str]:
        """Read the streams concurrently."""

        async def read_all() -> list[str]:
            return list(await asyncio.gather(*(stream.text() for stream in streams)))

        return self.run(read_all())  # type: ignore[no-any-return]

    def leave_block(self, stream: Any) -> None:
        async def leave() -> None:
            async with stream:
                pass

        self.run(leave())

    def close(self, client: Any) -> None:
        self.run(client.close())

    def wait_until(self, condition: Callable[[], bool]) -> None:
        async def until() -> None:
            while not condition():
                await asyncio.sleep(0.01)

        self.run(asyncio.wait_for(until(), WAIT_S))

    def shutdown(self) -> None:
        try:
            for client in self.clients:
                self.run(client.close())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()


Api = SyncApi | AsyncApi


@pytest.fixture(params=["sync", "asyncio"])
def api(request: pytest.FixtureRequest) -> Iterator[Api]:
    adapter: Api = SyncApi() if request.param == "sync" else AsyncApi()
    try:
        yield adapter
    finally:
        adapter.shutdown()


@pytest.fixture
def broker() -> Iterator[ScriptedBroker]:
    scripted = ScriptedBroker()
    try:
        yield scripted
    finally:
        scripted.close()


# ----------------------------------------------------------------- scenarios


def test_ping_is_answered_by_pong(api: Api, broker: ScriptedBroker) -> None:
    client = api.connect(broker.address)
    assert api.call(client, "ping") is None
    pings = broker.received(Kind.PING)
    assert [body for _, body in pings] == [{"version": PROTOCOL_VERSION}] * 2
    assert len({rid for rid, _ in pings}) == 2
    assert repr(client) == f"<{api.name} {broker.address} open_requests=0>"


def test_a_protocol_version_mismatch_fails_the_connection(api: Api, broker: ScriptedBroker) -> None:
    broker.answers[Kind.PING] = lambda rid, body: [
        error(rid, 400, "ProtocolVersionMismatch", "this balancer speaks version 2")
    ]
    with pytest.raises(RequestFailed) as raised:
        api.connect(broker.address)
    assert (raised.value.code, raised.value.kind) == (400, "ProtocolVersionMismatch")


def test_submit_streams_tokens_until_done(api: Api, broker: ScriptedBroker) -> None:
    broker.answers[Kind.SUBMIT] = lambda rid, body: generation(rid, ["Hel", "lo"], [" world"])
    client = api.connect(broker.address)
    stream = api.call(client, "continue_from_raw_prompt", "Hi", max_tokens=3)
    assert isinstance(stream, Stream | AsyncStream)
    assert repr(client) == f"<{api.name} {broker.address} open_requests=1>"
    assert api.events(stream) == [
        Dispatched("agent-1", "a1", 3),
        Tokens(["Hel", "lo"]),
        Tokens([" world"]),
        Done(Usage(prompt_tokens=2, content_tokens=3)),
    ]
    assert stream.finished
    assert api.events(stream) == []
    with pytest.raises(api.end_of_stream):
        api.next(stream)
    assert broker.received(Kind.SUBMIT) == [
        (stream.request_id, raw_prompt_request("Hi", max_tokens=3))
    ]
    assert broker.received(Kind.CANCEL) == []
    assert repr(client) == f"<{api.name} {broker.address} open_requests=0>"


def test_text_joins_the_pieces(api: Api, broker: ScriptedBroker) -> None:
    broker.answers[Kind.SUBMIT] = lambda rid, body: generation(rid, ["a", "b"], [], ["c"])
    client = api.connect(broker.address)
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    assert api.text(stream) == "abc"


def test_a_failed_request_raises_request_failed(api: Api, broker: ScriptedBroker) -> None:
    broker.answers[Kind.SUBMIT] = lambda rid, body: [
        encode(Kind.TOKENS, rid, ["partial"]),
        error(rid, 503, "BufferOverflow", "the buffer is full"),
    ]
    client = api.connect(broker.address)
    with pytest.raises(RequestFailed) as raised:
        api.text(api.call(client, "submit", {"raw_prompt": "x"}))
    assert (raised.value.code, raised.value.kind) == (503, "BufferOverflow")
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    assert api.events(stream) == [
        Tokens(["partial"]),
        Failed(503, "BufferOverflow", "the buffer is full"),
    ]
    assert stream.finished


def test_cancel_tells_the_broker_and_ends_the_stream(api: Api, broker: ScriptedBroker) -> None:
    broker.answers[Kind.SUBMIT] = lambda rid, body: generation(rid)[:1]  # Dispatched only
    client = api.connect(broker.address)
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    assert isinstance(api.next(stream), Dispatched)
    stream.cancel()
    stream.cancel()
    api.wait_until(lambda: bool(broker.received(Kind.CANCEL)))
    assert broker.received(Kind.CANCEL) == [(stream.request_id, {})]
    assert stream.finished
    assert api.events(stream) == []
    broker.send(encode(Kind.TOKENS, stream.request_id, ["late"]))  # dropped
    assert api.call(client, "ping") is None
    assert repr(client) == f"<{api.name} {broker.address} open_requests=0>"
    assert broker.received(Kind.CANCEL) == [(stream.request_id, {})]


def test_leaving_a_with_block_cancels_the_stream(api: Api, broker: ScriptedBroker) -> None:
    client = api.connect(broker.address)
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    api.leave_block(stream)
    api.wait_until(lambda: broker.received(Kind.CANCEL) == [(stream.request_id, {})])
    assert stream.finished


def test_reading_a_request_the_client_dropped_raises_499(api: Api, broker: ScriptedBroker) -> None:
    client = api.connect(broker.address)
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    api.close(client)
    api.wait_until(lambda: broker.received(Kind.CANCEL) == [(stream.request_id, {})])
    with pytest.raises(RequestFailed) as raised:
        api.next(stream)
    assert (raised.value.code, raised.value.kind) == (499, "Cancelled")


def test_dropping_a_stream_cancels_it(api: Api, broker: ScriptedBroker) -> None:
    broker.answers[Kind.SUBMIT] = lambda rid, body: generation(rid)[:1]
    client = api.connect(broker.address)
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    request_id = stream.request_id
    assert isinstance(api.next(stream), Dispatched)
    del stream
    api.wait_until(lambda: broker.received(Kind.CANCEL) == [(request_id, {})])
    assert repr(client) == f"<{api.name} {broker.address} open_requests=0>"


def test_a_finished_stream_dropped_sends_no_cancel(api: Api, broker: ScriptedBroker) -> None:
    broker.answers[Kind.SUBMIT] = lambda rid, body: generation(rid, ["x"])
    client = api.connect(broker.address)
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    assert api.text(stream) == "x"
    del stream
    assert api.call(client, "ping") is None
    assert broker.received(Kind.CANCEL) == []


def test_a_silent_broker_is_pinged_then_unreachable(api: Api, broker: ScriptedBroker) -> None:
    timeout_s = 2.5
    client = api.connect(broker.address, timeout_s=timeout_s)
    broker.silent.set()
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="did not answer for") as raised:
        api.next(stream)
    elapsed = time.monotonic() - started
    assert broker.address in str(raised.value)
    assert timeout_s - 0.1 <= elapsed < timeout_s + 2.0
    pings_while_silent = [rid for rid, _ in broker.received(Kind.PING)[1:]]
    assert pings_while_silent and set(pings_while_silent) == {0}
    # the broker answers again: the client carries on
    broker.silent.clear()
    assert api.call(client, "ping") is None


def test_silence_is_counted_from_the_start_of_a_wait(api: Api, broker: ScriptedBroker) -> None:
    """An idle client is not a silent broker: the first wait after a pause gets a full
    ``timeout_s`` (the synchronous client used to count the pause as silence)."""
    client = api.connect(broker.address, timeout_s=1.5)
    time.sleep(1.7)
    stream = api.call(client, "submit", {"raw_prompt": "x"})
    late = threading.Timer(1.2, broker.send, generation(stream.request_id)[:1])
    late.start()
    try:
        assert isinstance(api.next(stream), Dispatched)
    finally:
        late.cancel()
        late.join(WAIT_S)


def test_queries_return_their_answers(api: Api, broker: ScriptedBroker) -> None:
    state = {"model": {"LocalToAgent": "/m.gguf"}}
    broker.answers.update(
        {
            Kind.GET_AGENTS: lambda rid, body: [
                encode(Kind.AGENTS, rid, {"agents": [{"id": "a"}]})
            ],
            Kind.GET_BUFFERED: lambda rid, body: [encode(Kind.BUFFERED, rid, {"count": 4})],
            Kind.GET_DESIRED_STATE: lambda rid, body: [encode(Kind.STATE, rid, {"state": state})],
            Kind.GET_APPLICABLE_STATE: lambda rid, body: [encode(Kind.STATE, rid, {"state": None})],
            Kind.GET_METRICS: lambda rid, body: [encode(Kind.METRICS, rid, {"requests": 9})],
            Kind.GET_AGENT_INFO: lambda rid, body: [
                encode(Kind.AGENT_INFO, rid, {"value": {"asked": body}})
            ],
            Kind.PUT_DESIRED_STATE: lambda rid, body: [encode(Kind.ACK, rid, {})],
        }
    )
    client = api.connect(broker.address)
    assert api.call(client, "agents") == [{"id": "a"}]
    assert api.call(client, "buffered_requests") == 4
    assert api.call(client, "desired_state") == state
    assert api.call(client, "applicable_state") is None
    assert api.call(client, "metrics") == {"requests": 9}
    assert api.call(client, "agent_info", "a", "model_metadata") == {
        "asked": {"agent_id": "a", "what": "model_metadata"}
    }
    assert api.call(client, "put_desired_state", state) is None
    assert broker.received(Kind.PUT_DESIRED_STATE)[0][1] == {"state": state}
    assert repr(client) == f"<{api.name} {broker.address} open_requests=0>"


def test_stored_responses_are_put_got_and_deleted(api: Api, broker: ScriptedBroker) -> None:
    kept: dict[str, bytes] = {}

    def put(rid: int, body: Any) -> list[list[bytes]]:
        if "expected" in body and kept.get(body["id"]) != body["expected"]:
            return [error(rid, 409, "StoredChanged", "changed")]
        kept[body["id"]] = body["body"]
        return [encode(Kind.ACK, rid, {})]

    def get(rid: int, body: Any) -> list[list[bytes]]:
        if body["id"] not in kept:
            return [error(rid, 404, "UnknownResponse", "none")]
        return [encode(Kind.STORED_RESPONSE, rid, {"body": kept[body["id"]]})]

    def delete(rid: int, body: Any) -> list[list[bytes]]:
        return [
            encode(Kind.ACK, rid, {})
            if kept.pop(body["id"], None)
            else error(rid, 404, "UnknownResponse", "none")
        ]

    broker.answers.update(
        {Kind.PUT_RESPONSE: put, Kind.GET_RESPONSE: get, Kind.DELETE_RESPONSE: delete}
    )
    client = api.connect(broker.address)
    assert api.call(client, "put_response", "resp_a", b"\x00{}") is None
    assert api.call(client, "get_response", "resp_a") == b"\x00{}"
    assert api.call(client, "put_response", "resp_a", b"[]", b"\x00{}") is None
    with pytest.raises(RequestFailed) as changed:
        api.call(client, "put_response", "resp_a", b"()", b"\x00{}")
    assert changed.value.code == 409
    assert api.call(client, "get_response", "resp_a") == b"[]"
    assert api.call(client, "delete_response", "resp_a") is None
    for method in ("get_response", "delete_response"):
        with pytest.raises(RequestFailed) as unknown:
            api.call(client, method, "resp_a")
        assert (unknown.value.code, unknown.value.kind) == (404, "UnknownResponse")
    assert repr(client) == f"<{api.name} {broker.address} open_requests=0>"


def test_query_errors_are_raised_as_ours(api: Api, broker: ScriptedBroker) -> None:
    broker.answers.update(
        {
            Kind.PUT_DESIRED_STATE: lambda rid, body: [
                error(rid, 400, "InvalidDesiredState", "model: is not a known variant")
            ],
            Kind.GET_AGENT_INFO: lambda rid, body: [error(rid, 404, "AgentNotFound", "no a")],
            Kind.GET_AGENTS: lambda rid, body: [encode(Kind.STATE, rid, {"state": {}})],
        }
    )
    client = api.connect(broker.address)
    with pytest.raises(ConfigurationError) as invalid:
        api.call(client, "put_desired_state", {"model": 1})
    assert (invalid.value.field, invalid.value.message) == ("model", "is not a known variant")
    with pytest.raises(RequestFailed) as missing:
        api.call(client, "agent_info", "a", "model_metadata")
    assert (missing.value.code, missing.value.kind) == (404, "AgentNotFound")
    with pytest.raises(RequestFailed) as wrong:
        api.call(client, "agents")
    assert (wrong.value.code, wrong.value.kind) == (502, "ProtocolError")
    assert repr(client) == f"<{api.name} {broker.address} open_requests=0>"


def test_malformed_frames_are_ignored(api: Api, broker: ScriptedBroker) -> None:
    def answer(rid: int, body: Any) -> list[list[bytes]]:
        return [
            [HEADER.pack(Kind.TOKENS, rid)],  # no body
            [*encode(Kind.TOKENS, rid, ["x"]), b"extra"],  # a frame too many
            [b"bad-header", b"\x90"],  # header of the wrong size
            encode(Kind.TOKENS, rid + 1000, ["not ours"]),  # unknown request
            *generation(rid, ["fine"]),
        ]

    broker.answers[Kind.SUBMIT] = answer
    client = api.connect(broker.address)
    assert api.text(api.call(client, "submit", {"raw_prompt": "x"})) == "fine"
    # a malformed body of a request's own message ends that request with a 502
    broker.answers[Kind.SUBMIT] = lambda rid, body: [[HEADER.pack(Kind.TOKENS, rid), b"\xc1"]]
    events = api.events(api.call(client, "submit", {"raw_prompt": "x"}))
    assert len(events) == 1
    assert isinstance(events[0], Failed)
    assert (events[0].code, events[0].kind) == (502, "ProtocolError")
    assert api.call(client, "ping") is None


def test_concurrent_streams_are_interleaved(api: Api, broker: ScriptedBroker) -> None:
    submitted: list[int] = []

    def answer(rid: int, body: Any) -> list[list[bytes]]:
        submitted.append(rid)
        if len(submitted) < 2:
            return []
        first, second = submitted
        return [
            encode(Kind.TOKENS, first, ["a1"]),
            encode(Kind.TOKENS, second, ["b1"]),
            encode(Kind.TOKENS, first, ["a2"]),
            encode(Kind.TOKENS, second, ["b2"]),
            encode(Kind.DONE, second, usage_body(2)),
            encode(Kind.TOKENS, first, ["a3"]),
            encode(Kind.DONE, first, usage_body(3)),
        ]

    broker.answers[Kind.SUBMIT] = answer
    client = api.connect(broker.address)
    first = api.call(client, "submit", {"raw_prompt": "a"})
    second = api.call(client, "submit", {"raw_prompt": "b"})
    assert repr(client) == f"<{api.name} {broker.address} open_requests=2>"
    assert api.texts([first, second]) == ["a1a2a3", "b1b2"]
    assert repr(client) == f"<{api.name} {broker.address} open_requests=0>"
    assert broker.received(Kind.CANCEL) == []


# ----------------------------------------------- what only tasks can do at once


def test_a_task_reading_a_stream_cancelled_by_another_gets_499(broker: ScriptedBroker) -> None:
    async def scenario() -> None:
        client = await AsyncClient.connect(broker.address)
        try:
            stream = await client.submit({"raw_prompt": "x"})
            reader = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.05)
            assert not reader.done()
            stream.cancel()
            with pytest.raises(RequestFailed) as raised:
                await asyncio.wait_for(reader, WAIT_S)
            assert raised.value.code == 499
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
    assert len(broker.received(Kind.CANCEL)) == 1


def test_a_silent_broker_fails_every_waiting_task(broker: ScriptedBroker) -> None:
    async def scenario() -> None:
        client = await AsyncClient.connect(broker.address, timeout_s=1.0)
        try:
            broker.silent.set()
            streams = [await client.submit({"raw_prompt": "x"}) for _ in range(2)]
            query = client.buffered_requests()
            results = await asyncio.gather(
                *(stream.__anext__() for stream in streams), query, return_exceptions=True
            )
            assert [type(result) for result in results] == [BrokerUnreachable] * 3
            assert repr(client) == f"<AsyncClient {broker.address} open_requests=2>"
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))


def test_closing_wakes_a_waiting_task_with_499(broker: ScriptedBroker) -> None:
    async def scenario() -> None:
        client = await AsyncClient.connect(broker.address)
        stream = await client.submit({"raw_prompt": "x"})
        reader = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(RequestFailed) as raised:
            await asyncio.wait_for(reader, WAIT_S)
        assert raised.value.code == 499

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
