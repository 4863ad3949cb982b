"""The synchronous ZeroMQ client of the broker: a blocking driver of ``ClientCore``.

One DEALER socket; many requests may be open at once (frames for other requests
are kept until their stream reads them). Not thread-safe: use one ``Client`` per
thread. A broker that stops answering raises ``BrokerUnreachable`` after
``timeout_s`` instead of hanging: while a call waits, the client pings. What the
client decides lives in ``paddler.client.core``; this module only sends, polls and
receives.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import zmq

from paddler.client import queries
from paddler.client.core import (
    DEFAULT_TIMEOUT_S,
    PING_AFTER_S,
    ClientCore,
    CoreDriver,
    Message,
    StreamState,
    add_text,
)
from paddler.client.dealer import configure_dealer, open_dealer
from paddler.client.events import Event
from paddler.client.queries import Query, query_failure
from paddler.client.requests import (
    conversation_request,
    embedding_request,
    raw_prompt_request,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PING_AFTER_S",
    "Client",
    "Stream",
    "configure_dealer",
    "query_failure",
]

T = TypeVar("T")


class Stream(StreamState):
    """The events of one request; the stream is its own iterator.

    Iterating it more than once continues where the last loop stopped. The request
    is cancelled when the stream is left unfinished: ``cancel()``, the end of a
    ``with`` block, or the stream being dropped (a loop over a stream nobody keeps
    cancels it as soon as the loop is left).
    """

    def __init__(self, client: Client, request_id: int) -> None:
        self.client = client
        super().__init__(client._core, request_id, client._cancel)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self.finished:
            raise StopIteration
        return self._take(self.client._wait(self.request_id))

    def text(self) -> str:
        """All text of the request; ``RequestFailed`` if it ends with an error."""
        parts: list[str] = []
        for event in self:
            add_text(parts, event)
        return "".join(parts)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client(CoreDriver):
    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context[Any] | None = None,
        broker_public_key: str | Path | None = None,
        curve_secret_key: str | Path | None = None,
    ) -> None:
        """With ``broker_public_key`` and ``curve_secret_key`` (key files, as from
        ``paddler keys generate``), the connection uses CurveZMQ."""
        self._core = ClientCore(address, timeout_s, now=time.monotonic())
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = open_dealer(
            self.context, address, broker_public_key, curve_secret_key, self._own_context
        )
        try:
            self.ping()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- plumbing

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again as exc:
            raise self._core.cannot_send() from exc

    def _receive(self, timeout_s: float) -> None:
        """Hand everything available to the core (waiting up to ``timeout_s`` for the first)."""
        socket = self.socket
        if not socket.poll(int(timeout_s * 1000.0)):
            return
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._core.receive_all(frames, time.monotonic())

    def _wait(self, request_id: int) -> Message:
        """The next message of ``request_id``; ``BrokerUnreachable`` if the broker is silent."""
        core = self._core
        message = core.next_message(request_id)
        if message is not None:
            return message
        core.begin_wait(time.monotonic())
        try:
            while True:
                self._receive(core.tick_s)
                message = core.next_message(request_id)
                if message is not None:
                    return message
                ping = core.tick(time.monotonic())
                if ping is not None:
                    self._send(ping)
        finally:
            core.end_wait()

    def _cancel(self, request_id: int) -> None:
        frames = self._core.cancel(request_id)
        if frames is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart(frames, zmq.NOBLOCK)

    def _query(self, query: Query[T]) -> T:
        request_id, frames = self._core.query(query)
        try:
            self._send(frames)
            message = self._wait(request_id)
        finally:
            self._core.forget(request_id)
        return query.answer(message)

    # ------------------------------------------------------------------- public

    def ping(self) -> None:
        """Check the broker answers (and speaks this protocol version)."""
        self._query(queries.PING)

    def submit(self, request: dict[str, Any]) -> Stream:
        """Send a request (see ``paddler.protocol.requests``) and return its stream."""
        request_id, frames = self._core.submit(request)
        try:
            self._send(frames)
        except BaseException:
            self._core.forget(request_id)
            raise
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
        return self._query(queries.AGENTS)

    def buffered_requests(self) -> int:
        return self._query(queries.BUFFERED_REQUESTS)

    def desired_state(self) -> dict[str, Any]:
        return self._query(queries.DESIRED_STATE)

    def applicable_state(self) -> dict[str, Any] | None:
        return self._query(queries.APPLICABLE_STATE)

    def agent_info(self, agent_id: str, what: str) -> Any:
        """``model_metadata`` or ``chat_template_override`` of an agent (``None`` if it
        has none); ``RequestFailed`` 404 for an unknown agent, 504 if it does not answer."""
        return self._query(queries.agent_info(agent_id, what))

    def metrics(self) -> dict[str, Any]:
        """Counters and histograms of the broker, with the agents and the buffered count."""
        return self._query(queries.METRICS)

    def put_desired_state(self, state: dict[str, Any]) -> None:
        """Store and apply a desired state; ``ConfigurationError`` names a bad field."""
        self._query(queries.put_desired_state(state))

    def put_response(self, response_id: str, body: bytes, expected: bytes | None = None) -> None:
        """Keep a response of the OpenAI Responses API (or a conversation) in the
        balancer's state database; ``RequestFailed`` 413 if it is larger than a stored
        response may be. With ``expected``, only in place of that body: 404 if none is
        kept, 409 if another is (someone else changed it since it was read)."""
        self._query(queries.put_response(response_id, body, expected))

    def get_response(self, response_id: str) -> bytes:
        """A kept response; ``RequestFailed`` 404 if there is none of that id."""
        return self._query(queries.get_response(response_id))

    def delete_response(self, response_id: str) -> None:
        """Forget a kept response; ``RequestFailed`` 404 if there is none of that id."""
        self._query(queries.delete_response(response_id))

    def close(self) -> None:
        if self._core.closed:
            return
        for frames in self._core.close():
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart(frames, zmq.NOBLOCK)
        self.socket.close(linger=100)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return self._core.describe("Client")
