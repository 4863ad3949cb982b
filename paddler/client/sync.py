"""The synchronous ZeroMQ client of the broker.

One DEALER socket; many requests may be open at once (frames for other requests
are kept until their stream reads them). Not thread-safe: use one ``Client`` per
thread. A broker that stops answering raises ``BrokerUnreachable`` after
``timeout_s`` instead of hanging: while a call waits, the client pings.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import zmq

from paddler.client.events import TERMINAL, Event, Failed, Tokens, decode_event
from paddler.client.requests import (
    conversation_request,
    embedding_request,
    raw_prompt_request,
)
from paddler.errors import BrokerUnreachable, ConfigurationError, PaddlerError, RequestFailed
from paddler.protocol.codec import HEADER, MAX_BODY_BYTES, encode, pack_body, unpack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.messages import ErrorBody

DEFAULT_TIMEOUT_S = 5.0
PING_AFTER_S = 1.0
_TOKENS = int(Kind.TOKENS)


def configure_dealer(socket: zmq.Socket[Any]) -> None:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    socket.setsockopt(zmq.RCVHWM, 100_000)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_BODY_BYTES + 4096)


def query_failure(kind: int, body: bytes, expected: Kind) -> PaddlerError:
    """The exception for a query answered with something else than ``expected``."""
    if kind == Kind.ERROR:
        error = ErrorBody.from_body(unpack_body(body))
        if error.kind == "InvalidDesiredState":
            field, _, message = error.description.partition(": ")
            return ConfigurationError(field, message)
        return RequestFailed(error.code, error.kind, error.description)
    return RequestFailed(502, "ProtocolError", f"expected {expected.name}, got kind {kind}")


class Stream:
    """The events of one request; the stream is its own iterator.

    Iterating it more than once continues where the last loop stopped. The request
    is cancelled when the stream is left unfinished: ``cancel()``, the end of a
    ``with`` block, or the stream being dropped (a loop over a stream nobody keeps
    cancels it as soon as the loop is left).
    """

    def __init__(self, client: Client, request_id: int) -> None:
        self.client = client
        self.request_id = request_id
        self.finished = False
        # no reference cycle: dropping the stream runs this at once, not at a GC pass
        self._cancel_when_dropped = weakref.finalize(self, client._cancel, request_id)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self.finished:
            raise StopIteration
        kind, body = self.client._wait(self.request_id)
        event = decode_event(kind, body)
        if isinstance(event, TERMINAL):
            self.finished = True
            self.client._pending.pop(self.request_id, None)
            self._cancel_when_dropped.detach()
        return event

    def cancel(self) -> None:
        """Stop the request wherever it is (buffered or generating)."""
        if not self.finished:
            self.finished = True
            self._cancel_when_dropped()

    def text(self) -> str:
        """All text of the request; ``RequestFailed`` if it ends with an error."""
        parts: list[str] = []
        for event in self:
            if isinstance(event, Tokens):
                parts.extend(event.pieces)
            elif isinstance(event, Failed):
                raise event.exception()
        return "".join(parts)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client:
    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        configure_dealer(self.socket)
        self.socket.connect(address)
        self._next_id = 1
        self._pending: dict[int, deque[tuple[int, bytes]]] = {}
        self._last_heard = time.monotonic()
        self._ping_sent = 0.0
        self._closed = False
        try:
            self.ping()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- plumbing

    def _new_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        self._pending[request_id] = deque()
        return request_id

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again as exc:
            raise BrokerUnreachable(f"cannot send to the balancer at {self.address}") from exc

    def _receive(self, timeout_ms: float) -> None:
        """Route everything available (waiting up to ``timeout_ms`` for the first)."""
        socket = self.socket
        if not socket.poll(int(timeout_ms)):
            return
        pending = self._pending
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            if len(frames) != 2 or len(frames[0]) != 9:
                continue
            kind, request_id = HEADER.unpack(frames[0])
            queue = pending.get(request_id)
            if queue is not None:
                queue.append((kind, frames[1]))

    def _wait(self, request_id: int) -> tuple[int, bytes]:
        """The next message of ``request_id``; ``BrokerUnreachable`` if the broker is silent."""
        queue = self._pending.get(request_id)
        if queue is None:
            raise RequestFailed(499, "Cancelled", "the request was cancelled")
        if queue:
            return queue.popleft()
        while True:
            self._receive(min(PING_AFTER_S, self.timeout_s) * 1000.0)
            if queue:
                return queue.popleft()
            now = time.monotonic()
            silent = now - self._last_heard
            if silent >= self.timeout_s:
                raise BrokerUnreachable(
                    f"the balancer at {self.address} did not answer for {silent:.1f} s"
                )
            if silent >= PING_AFTER_S and now - self._ping_sent >= PING_AFTER_S:
                self._ping_sent = now
                self._send(encode(Kind.PING, 0, {"version": PROTOCOL_VERSION}))

    def _cancel(self, request_id: int) -> None:
        if self._pending.pop(request_id, None) is not None and not self._closed:
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart(encode(Kind.CANCEL, request_id, {}), zmq.NOBLOCK)

    def _query(self, kind: Kind, body: dict[str, Any], expected: Kind) -> Any:
        request_id = self._new_id()
        try:
            self._send(encode(kind, request_id, body))
            reply_kind, reply = self._wait(request_id)
        finally:
            self._pending.pop(request_id, None)
        if reply_kind != expected:
            raise query_failure(reply_kind, reply, expected)
        return unpack_body(reply)

    # ------------------------------------------------------------------- public

    def ping(self) -> None:
        """Check the broker answers (and speaks this protocol version)."""
        self._last_heard = time.monotonic()
        self._query(Kind.PING, {"version": PROTOCOL_VERSION}, Kind.PONG)

    def submit(self, request: dict[str, Any]) -> Stream:
        """Send a request (see ``paddler.protocol.requests``) and return its stream."""
        request_id = self._new_id()
        self._send([HEADER.pack(Kind.SUBMIT, request_id), pack_body(request)])
        return Stream(self, request_id)

    def continue_from_raw_prompt(self, prompt: str, **options: Any) -> Stream:
        return self.submit(raw_prompt_request(prompt, **options))

    def continue_from_conversation_history(
        self, messages: list[dict[str, Any]], **options: Any
    ) -> Stream:
        return self.submit(conversation_request(messages, **options))

    def generate_embedding_batch(
        self, documents: list[dict[str, str]], normalization_method: Any = "None"
    ) -> Stream:
        """Embed ``[{"id": ..., "content": ...}, ...]``: one ``Embedding`` event per document."""
        return self.submit(embedding_request(documents, normalization_method))

    def agents(self) -> list[dict[str, Any]]:
        return self._query(Kind.GET_AGENTS, {}, Kind.AGENTS)["agents"]  # type: ignore[no-any-return]

    def buffered_requests(self) -> int:
        return self._query(Kind.GET_BUFFERED, {}, Kind.BUFFERED)["count"]  # type: ignore[no-any-return]

    def desired_state(self) -> dict[str, Any]:
        return self._query(Kind.GET_DESIRED_STATE, {}, Kind.STATE)["state"]  # type: ignore[no-any-return]

    def applicable_state(self) -> dict[str, Any] | None:
        return self._query(Kind.GET_APPLICABLE_STATE, {}, Kind.STATE)["state"]  # type: ignore[no-any-return]

    def agent_info(self, agent_id: str, what: str) -> Any:
        """``model_metadata`` or ``chat_template_override`` of an agent (``None`` if it
        has none); ``RequestFailed`` 404 for an unknown agent, 504 if it does not answer."""
        return (
            self._query(Kind.GET_AGENT_INFO, {"agent_id": agent_id, "what": what}, Kind.AGENT_INFO)
        )["value"]

    def metrics(self) -> dict[str, Any]:
        """Counters and histograms of the broker, with the agents and the buffered count."""
        return self._query(Kind.GET_METRICS, {}, Kind.METRICS)  # type: ignore[no-any-return]

    def put_desired_state(self, state: dict[str, Any]) -> None:
        """Store and apply a desired state; ``ConfigurationError`` names a bad field."""
        self._query(Kind.PUT_DESIRED_STATE, {"state": state}, Kind.ACK)

    def close(self) -> None:
        if self._closed:
            return
        for request_id in list(self._pending):
            self._cancel(request_id)
        self._closed = True
        self.socket.close(linger=100)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.address} open_requests={len(self._pending)}>"
