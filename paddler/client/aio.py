"""The asyncio ZeroMQ client of the broker (``zmq.asyncio``).

A reader task routes frames to per-request queues, so any number of streams can
be read concurrently from one ``AsyncClient``. While anyone waits, the client
pings a silent broker and fails every waiter with ``BrokerUnreachable`` after
``timeout_s`` of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from paddler.client.events import TERMINAL, Event, Failed, Tokens, decode_event
from paddler.client.requests import (
    conversation_request,
    embedding_request,
    raw_prompt_request,
)
from paddler.client.sync import DEFAULT_TIMEOUT_S, PING_AFTER_S, configure_dealer, query_failure
from paddler.errors import BrokerUnreachable
from paddler.protocol.codec import HEADER, encode, pack_body, unpack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind

_Item = tuple[int, bytes] | BaseException


class AsyncStream:
    """The events of one request: ``async for event in stream`` (the stream is its
    own iterator). The request is cancelled when the stream is left unfinished:
    ``cancel()``, the end of an ``async with`` block, or the stream being dropped.
    """

    def __init__(self, client: AsyncClient, request_id: int) -> None:
        self.client = client
        self.request_id = request_id
        self.finished = False
        # no reference cycle: dropping the stream runs this at once, not at a GC pass
        self._cancel_when_dropped = weakref.finalize(self, client._cancel, request_id)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        kind, body = await self.client._wait(self.request_id)
        event = decode_event(kind, body)
        if isinstance(event, TERMINAL):
            self.finished = True
            self.client._queues.pop(self.request_id, None)
            self._cancel_when_dropped.detach()
        return event

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self._cancel_when_dropped()

    async def text(self) -> str:
        parts: list[str] = []
        async for event in self:
            if isinstance(event, Tokens):
                parts.extend(event.pieces)
            elif isinstance(event, Failed):
                raise event.exception()
        return "".join(parts)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncClient:
    """Create with ``await AsyncClient.connect(address)``."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._own_context = context is None
        self.context = context or zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        configure_dealer(self.socket)
        self.socket.connect(address)
        self._next_id = 1
        self._queues: dict[int, asyncio.Queue[_Item]] = {}
        self._last_heard = time.monotonic()
        self._waiting = 0
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

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
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _read(self) -> None:
        socket = self.socket
        queues = self._queues
        while True:
            frames = await socket.recv_multipart()
            self._last_heard = time.monotonic()
            if len(frames) != 2 or len(frames[0]) != 9:
                continue
            kind, request_id = HEADER.unpack(frames[0])
            queue = queues.get(request_id)
            if queue is not None:
                queue.put_nowait((kind, frames[1]))

    async def _watch(self) -> None:
        """Ping a silent broker while someone waits; fail the waiters if it stays silent."""
        ping_sent = 0.0
        while True:
            await asyncio.sleep(min(PING_AFTER_S, self.timeout_s) / 2)
            if not self._waiting:
                self._last_heard = time.monotonic()
                continue
            now = time.monotonic()
            silent = now - self._last_heard
            if silent >= self.timeout_s:
                error = BrokerUnreachable(
                    f"the balancer at {self.address} did not answer for {silent:.1f} s"
                )
                for queue in self._queues.values():
                    queue.put_nowait(error)
                self._last_heard = now
            elif silent >= PING_AFTER_S and now - ping_sent >= PING_AFTER_S:
                ping_sent = now
                with contextlib.suppress(zmq.ZMQError):
                    await self.socket.send_multipart(
                        encode(Kind.PING, 0, {"version": PROTOCOL_VERSION}), zmq.NOBLOCK
                    )

    def _new_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        self._queues[request_id] = asyncio.Queue()
        return request_id

    async def _send(self, frames: list[bytes]) -> None:
        try:
            await self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again as exc:
            raise BrokerUnreachable(f"cannot send to the balancer at {self.address}") from exc

    async def _wait(self, request_id: int) -> tuple[int, bytes]:
        queue = self._queues[request_id]
        if queue.empty() and not self._waiting:
            self._last_heard = time.monotonic()
        self._waiting += 1
        try:
            item = await queue.get()
        finally:
            self._waiting -= 1
        if isinstance(item, BaseException):
            raise item
        return item

    def _cancel(self, request_id: int) -> None:
        if self._queues.pop(request_id, None) is not None and not self._closed:
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart(encode(Kind.CANCEL, request_id, {}), zmq.NOBLOCK)

    async def _query(self, kind: Kind, body: dict[str, Any], expected: Kind) -> Any:
        request_id = self._new_id()
        try:
            await self._send(encode(kind, request_id, body))
            reply_kind, reply = await self._wait(request_id)
        finally:
            self._queues.pop(request_id, None)
        if reply_kind != expected:
            raise query_failure(reply_kind, reply, expected)
        return unpack_body(reply)

    async def ping(self) -> None:
        await self._query(Kind.PING, {"version": PROTOCOL_VERSION}, Kind.PONG)

    async def submit(self, request: dict[str, Any]) -> AsyncStream:
        request_id = self._new_id()
        await self._send([HEADER.pack(Kind.SUBMIT, request_id), pack_body(request)])
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
        return (await self._query(Kind.GET_AGENTS, {}, Kind.AGENTS))["agents"]  # type: ignore[no-any-return]

    async def buffered_requests(self) -> int:
        return (await self._query(Kind.GET_BUFFERED, {}, Kind.BUFFERED))["count"]  # type: ignore[no-any-return]

    async def desired_state(self) -> dict[str, Any]:
        return (await self._query(Kind.GET_DESIRED_STATE, {}, Kind.STATE))["state"]  # type: ignore[no-any-return]

    async def applicable_state(self) -> dict[str, Any] | None:
        return (await self._query(Kind.GET_APPLICABLE_STATE, {}, Kind.STATE))["state"]  # type: ignore[no-any-return]

    async def agent_info(self, agent_id: str, what: str) -> Any:
        """``model_metadata`` or ``chat_template_override`` of an agent (``None`` if it
        has none); ``RequestFailed`` 404 for an unknown agent, 504 if it does not answer."""
        return (
            await self._query(
                Kind.GET_AGENT_INFO, {"agent_id": agent_id, "what": what}, Kind.AGENT_INFO
            )
        )["value"]

    async def metrics(self) -> dict[str, Any]:
        """Counters and histograms of the broker, with the agents and the buffered count."""
        return await self._query(Kind.GET_METRICS, {}, Kind.METRICS)  # type: ignore[no-any-return]

    async def put_desired_state(self, state: dict[str, Any]) -> None:
        await self._query(Kind.PUT_DESIRED_STATE, {"state": state}, Kind.ACK)

    async def close(self) -> None:
        if self._closed:
            return
        for request_id in list(self._queues):
            self._cancel(request_id)
        self._closed = True
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
        return f"<AsyncClient {self.address} open_requests={len(self._queues)}>"
