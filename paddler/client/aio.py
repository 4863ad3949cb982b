"""The asyncio ZeroMQ client of the broker: a ``zmq.asyncio`` driver of ``ClientCore``.

A reader task hands every received message to the core and wakes the tasks waiting
for that request, so any number of streams can be read concurrently from one
``AsyncClient``. A watchdog task ticks the core's timers: while anyone waits it
pings a silent broker, and fails every waiting task with ``BrokerUnreachable`` after
``timeout_s`` of silence. What the client decides lives in ``paddler.client.core``.

A client that raised ``BrokerUnreachable`` remembers it (``failure``), so whoever owns
it can tell a failed client from a fresh one; ``close(error)`` ends every stream still
open with ``error`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from paddler.client import queries
from paddler.client.core import (
    DEFAULT_TIMEOUT_S,
    ClientCore,
    CoreDriver,
    Message,
    StreamState,
    add_text,
)
from paddler.client.dealer import open_dealer
from paddler.client.events import Event
from paddler.client.queries import Query
from paddler.client.requests import (
    conversation_request,
    embedding_request,
    raw_prompt_request,
)
from paddler.errors import BrokerUnreachable

T = TypeVar("T")

_Waiter = asyncio.Future[BaseException | None]
"""Resolved when its request may have a message: None, or the error to raise."""


class AsyncStream(StreamState):
    """The events of one request: ``async for event in stream`` (the stream is its
    own iterator). The request is cancelled when the stream is left unfinished:
    ``cancel()``, the end of an ``async with`` block, or the stream being dropped.
    """

    def __init__(self, client: AsyncClient, request_id: int) -> None:
        self.client = client
        super().__init__(client._core, request_id, client._cancel)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        return self._take(await self.client._wait(self.request_id))

    async def text(self) -> str:
        """All text of the request; ``RequestFailed`` if it ends with an error."""
        parts: list[str] = []
        async for event in self:
            add_text(parts, event)
        return "".join(parts)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncClient(CoreDriver):
    """Create with ``await AsyncClient.connect(address)``."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context: zmq.asyncio.Context | None = None,
        broker_public_key: str | Path | None = None,
        curve_secret_key: str | Path | None = None,
    ) -> None:
        """With ``broker_public_key`` and ``curve_secret_key`` (key files, as from
        ``paddler keys generate``), the connection uses CurveZMQ."""
        self._core = ClientCore(address, timeout_s, now=time.monotonic())
        self._own_context = context is None
        self.context = context or zmq.asyncio.Context()
        self.socket = open_dealer(
            self.context, address, broker_public_key, curve_secret_key, self._own_context
        )
        self._waiters: dict[int, list[_Waiter]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed_with: BaseException | None = None
        self.failure: BrokerUnreachable | None = None
        """The first ``BrokerUnreachable`` this client raised; None while it works."""
        self.heard_at_s: float | None = None
        """``time.monotonic()`` when the broker last sent anything; None before that."""

    @classmethod
    async def connect(cls, address: str, **options: Any) -> AsyncClient:
        client = cls(address, **options)
        client.start()
        try:
            await client.ping()
        except BaseException:
            await client.close()
            raise
        return client

    def start(self) -> None:
        """Start the reader and the watchdog on the running loop (``connect`` does)."""
        if self._reader is None:
            self._loop = asyncio.get_running_loop()
            self._reader = self._loop.create_task(self._read())
            self._watchdog = self._loop.create_task(self._watch())

    # ---------------------------------------------------------------- plumbing

    async def _read(self) -> None:
        socket = self.socket
        core = self._core
        while True:
            frames = await socket.recv_multipart()
            self.heard_at_s = now = time.monotonic()
            for request_id in core.receive_all(frames, now):
                self._wake(request_id)

    async def _watch(self) -> None:
        core = self._core
        while True:
            await asyncio.sleep(core.tick_s)
            try:
                ping = core.tick(time.monotonic())
                if ping is not None:
                    await self._send(ping)
            except BrokerUnreachable as error:
                self.failure = self.failure or error
                for request_id in list(self._waiters):
                    self._wake(request_id, error)
            except zmq.ZMQError:  # the socket is closing
                pass

    def _wake(self, request_id: int, error: BaseException | None = None) -> None:
        for waiter in self._waiters.pop(request_id, ()):
            if not waiter.done():
                waiter.set_result(error)

    async def _send(self, frames: list[bytes]) -> None:
        self.start()
        try:
            await self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again as exc:
            error = self._core.cannot_send()
            self.failure = self.failure or error
            raise error from exc

    def _send_now(self, frames: list[bytes]) -> None:
        """Send without waiting, and without an error: for CANCEL frames."""
        if self.socket.closed:
            return
        with contextlib.suppress(zmq.ZMQError):
            sent = asyncio.ensure_future(self.socket.send_multipart(frames, zmq.NOBLOCK))
            # a lost CANCEL is not worth an error: take it, so nobody logs it unretrieved
            sent.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _wait(self, request_id: int) -> Message:
        """The next message of ``request_id``; ``BrokerUnreachable`` if the broker is silent."""
        core = self._core
        if self._closed_with is not None:
            raise self._closed_with.with_traceback(None)
        message = core.next_message(request_id)
        if message is not None:
            # a message already here: let the other tasks run first, so that one stream
            # with a backlog cannot keep the event loop from every other stream
            await asyncio.sleep(0)
            return message
        self.start()
        core.begin_wait(time.monotonic())
        try:
            while True:
                waiter: _Waiter = asyncio.get_running_loop().create_future()
                waiting = self._waiters.setdefault(request_id, [])
                waiting.append(waiter)
                try:
                    error = await waiter
                finally:
                    if waiter in waiting:
                        waiting.remove(waiter)
                        if not waiting and self._waiters.get(request_id) is waiting:
                            del self._waiters[request_id]
                if error is not None:
                    raise error.with_traceback(None)
                message = core.next_message(request_id)
                if message is not None:
                    return message
        finally:
            core.end_wait()

    def _cancel(self, request_id: int) -> None:
        frames = self._core.cancel(request_id)
        loop = self._loop
        if frames is None or loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._cancelled(request_id, frames)
        else:
            # dropped outside the client's loop (a finalizer): the socket belongs to it
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._cancelled, request_id, frames)

    def _cancelled(self, request_id: int, frames: list[bytes]) -> None:
        self._wake(request_id)  # a task still reading it gets RequestFailed 499
        self._send_now(frames)

    async def _query(self, query: Query[T]) -> T:
        request_id, frames = self._core.query(query)
        try:
            await self._send(frames)
            message = await self._wait(request_id)
        finally:
            self._core.forget(request_id)
        return query.answer(message)

    # ------------------------------------------------------------------- public

    async def ping(self) -> None:
        """Check the broker answers (and speaks this protocol version)."""
        await self._query(queries.PING)

    async def submit(self, request: dict[str, Any]) -> AsyncStream:
        """Send a request (see ``paddler.protocol.requests``) and return its stream."""
        request_id, frames = self._core.submit(request)
        try:
            await self._send(frames)
        except BaseException:
            self._core.forget(request_id)
            raise
        return AsyncStream(self, request_id)

    async def continue_from_raw_prompt(self, prompt: str, **options: Any) -> AsyncStream:
        return await self.submit(raw_prompt_request(prompt, **options))

    async def continue_from_conversation_history(
        self, messages: list[dict[str, Any]], **options: Any
    ) -> AsyncStream:
        return await self.submit(conversation_request(messages, **options))

    async def generate_embedding_batch(
        self, documents: list[dict[str, str]], normalization_method: Any = "None"
    ) -> AsyncStream:
        """Embed ``[{"id": ..., "content": ...}, ...]``: one ``Embedding`` event per document."""
        return await self.submit(embedding_request(documents, normalization_method))

    async def agents(self) -> list[dict[str, Any]]:
        return await self._query(queries.AGENTS)

    async def buffered_requests(self) -> int:
        return await self._query(queries.BUFFERED_REQUESTS)

    async def desired_state(self) -> dict[str, Any]:
        return await self._query(queries.DESIRED_STATE)

    async def applicable_state(self) -> dict[str, Any] | None:
        return await self._query(queries.APPLICABLE_STATE)

    async def agent_info(self, agent_id: str, what: str) -> Any:
        """``model_metadata`` or ``chat_template_override`` of an agent (``None`` if it
        has none); ``RequestFailed`` 404 for an unknown agent, 504 if it does not answer."""
        return await self._query(queries.agent_info(agent_id, what))

    async def metrics(self) -> dict[str, Any]:
        """Counters and histograms of the broker, with the agents and the buffered count."""
        return await self._query(queries.METRICS)

    async def put_desired_state(self, state: dict[str, Any]) -> None:
        """Store and apply a desired state; ``ConfigurationError`` names a bad field."""
        await self._query(queries.put_desired_state(state))

    async def put_response(
        self, response_id: str, body: bytes, expected: bytes | None = None
    ) -> None:
        """Keep a response of the OpenAI Responses API (or a conversation) in the
        balancer's state database; ``RequestFailed`` 413 if it is larger than a stored
        response may be. With ``expected``, only in place of that body: 404 if none is
        kept, 409 if another is (someone else changed it since it was read)."""
        await self._query(queries.put_response(response_id, body, expected))

    async def get_response(self, response_id: str) -> bytes:
        """A kept response; ``RequestFailed`` 404 if there is none of that id."""
        return await self._query(queries.get_response(response_id))

    async def delete_response(self, response_id: str) -> None:
        """Forget a kept response; ``RequestFailed`` 404 if there is none of that id."""
        await self._query(queries.delete_response(response_id))

    @property
    def closed(self) -> bool:
        return self._core.closed

    async def close(self, error: BaseException | None = None) -> None:
        """Cancel every open request and close the socket. Tasks waiting for this
        client, and later reads of its streams, get ``error`` (say, ``BrokerUnreachable``
        when the client is dropped for a failure), or ``RequestFailed`` 499 without one."""
        if self._core.closed:
            return
        self._closed_with = error
        for frames in self._core.close():
            self._send_now(frames)
        for request_id in list(self._waiters):
            self._wake(request_id, error)  # without an error: they get RequestFailed 499
        for task in (self._reader, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
                    await task
        self.socket.close(linger=100)
        if self._own_context:
            self.context.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return self._core.describe("AsyncClient")
