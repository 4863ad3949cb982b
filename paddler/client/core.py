"""The client protocol, written once and without I/O (the h11 / httpcore shape).

``ClientCore`` is everything a client of the broker decides: request ids, the
frames kept for each open request until its stream reads them, routing a received
message to its request, turning frames into events, the end of a stream, cancel
bookkeeping, and when a silent broker is pinged or given up on. It never touches a
socket or a clock: a driver hands it what it received with the time (``receive``),
sends the frames it returns (``submit``, ``query``, ``cancel``, ``tick``, ``close``)
and waits. ``paddler.client.sync`` drives it with blocking ``zmq`` calls and
``paddler.client.aio`` with ``zmq.asyncio``; those two only move frames and wait.

``StreamState`` is the part of a stream both drivers share: the request id, whether
it finished, and the cancel that runs when an unfinished stream is dropped.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from paddler.client.events import TERMINAL, Event, Failed, Tokens, decode_event
from paddler.client.queries import Query
from paddler.errors import BrokerUnreachable, ProtocolError, RequestFailed
from paddler.protocol.codec import HEADER, HEADER_SIZE, encode, is_batch, pack_body, unbatch
from paddler.protocol.kinds import CANCELLED_CODE, PROTOCOL_VERSION, Kind

DEFAULT_TIMEOUT_S = 5.0
PING_AFTER_S = 1.0
"""While a call waits, a broker silent this long is pinged (at most once per interval)."""

Message = tuple[int, bytes]
"""``(kind, body)`` of one message for a request, its body still packed."""


class ClientCore:
    """The state of one client connection, fed with what the socket received.

    Silence is measured only while someone waits: a wait that starts when nobody
    else waits starts a fresh ``timeout_s``. ``tick(now)`` should be called at least
    every ``tick_s`` while waiting.
    """

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, now: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.closed = False
        self._next_id = 1
        self._pending: dict[int, deque[Message]] = {}
        self._last_heard = now
        self._ping_sent = -math.inf
        self._waiting = 0

    # ------------------------------------------------------------ requests

    @property
    def open_requests(self) -> int:
        return len(self._pending)

    def _open(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        self._pending[request_id] = deque()
        return request_id

    def submit(self, request: dict[str, Any]) -> tuple[int, list[bytes]]:
        """Open a generation or embedding request: its id and the frames to send."""
        request_id = self._open()
        return request_id, [HEADER.pack(Kind.SUBMIT, request_id), pack_body(request)]

    def query(self, query: Query[Any]) -> tuple[int, list[bytes]]:
        """Open a query: its id and the frames to send. ``forget`` it once answered."""
        request_id = self._open()
        return request_id, encode(query.kind, request_id, query.body)

    def forget(self, request_id: int) -> None:
        """Drop a request without telling the broker (it ended, or was a query)."""
        self._pending.pop(request_id, None)

    def cancel(self, request_id: int) -> list[bytes] | None:
        """Drop a request; the CANCEL frames to send, or None if there is nothing to tell
        (the request already ended or was cancelled, or the client is closed)."""
        if self._pending.pop(request_id, None) is None or self.closed:
            return None
        return encode(Kind.CANCEL, request_id, {})

    def close(self) -> list[list[bytes]]:
        """Close the connection: the CANCEL frames of every request still open."""
        if self.closed:
            return []
        cancels = [encode(Kind.CANCEL, request_id, {}) for request_id in self._pending]
        self._pending.clear()
        self.closed = True
        return cancels

    # ------------------------------------------------------------- receiving

    def receive(self, frames: Sequence[bytes], now: float) -> int | None:
        """Keep one message from the broker for its request: the request id it was kept
        for, or None (a pong, a late frame of a finished request, a malformed message).
        Anything heard proves the broker alive."""
        self._last_heard = now
        if len(frames) != 2 or len(frames[0]) != HEADER_SIZE:
            return None
        kind: int
        request_id: int
        kind, request_id = HEADER.unpack(frames[0])
        queue = self._pending.get(request_id)
        if queue is None:
            return None
        queue.append((kind, bytes(frames[1])))
        return request_id

    def receive_all(self, frames: Sequence[bytes], now: float) -> list[int]:
        """``receive`` for a message that may be a ``BATCH`` of several: the ids of the
        requests that got one (a malformed batch is dropped whole)."""
        if not is_batch(frames):
            request_id = self.receive(frames, now)
            return [] if request_id is None else [request_id]
        self._last_heard = now
        try:
            messages = unbatch(frames)
        except ProtocolError:
            return []
        woken: list[int] = []
        for message in messages:
            request_id = self.receive(message, now)
            if request_id is not None:
                woken.append(request_id)
        return woken

    def next_message(self, request_id: int) -> Message | None:
        """The oldest message kept for ``request_id``, None if there is none yet;
        ``RequestFailed`` 499 if the client no longer knows the request."""
        queue = self._pending.get(request_id)
        if queue is None:
            raise RequestFailed(CANCELLED_CODE, "Cancelled", "the request was cancelled")
        return queue.popleft() if queue else None

    def event(self, request_id: int, message: Message) -> Event:
        """The event of a stream's message; a terminal one ends the request."""
        event = decode_event(*message)
        if isinstance(event, TERMINAL):
            self.forget(request_id)
        return event

    # ----------------------------------------------------------------- timers

    @property
    def tick_s(self) -> float:
        """How often a waiting driver should call ``tick``."""
        return min(PING_AFTER_S, self.timeout_s) / 2

    def begin_wait(self, now: float) -> None:
        if not self._waiting:
            self._last_heard = now
        self._waiting += 1

    def end_wait(self) -> None:
        self._waiting -= 1

    def tick(self, now: float) -> list[bytes] | None:
        """The PING frames to send now, if any; ``BrokerUnreachable`` if the broker was
        silent for ``timeout_s`` while someone waited (the next wait starts afresh)."""
        if not self._waiting:
            self._last_heard = now
            return None
        silent = now - self._last_heard
        if silent >= self.timeout_s:
            self._last_heard = now
            raise BrokerUnreachable(
                f"the balancer at {self.address} did not answer for {silent:.1f} s"
            )
        if silent >= PING_AFTER_S and now - self._ping_sent >= PING_AFTER_S:
            self._ping_sent = now
            return encode(Kind.PING, 0, {"version": PROTOCOL_VERSION})
        return None

    def cannot_send(self) -> BrokerUnreachable:
        """The error for frames the socket refused (its queue to the broker is full)."""
        return BrokerUnreachable(f"cannot send to the balancer at {self.address}")

    def describe(self, name: str) -> str:
        return f"<{name} {self.address} open_requests={len(self._pending)}>"


class CoreDriver:
    """What both clients read from their core: the address and the timeout."""

    _core: ClientCore

    @property
    def address(self) -> str:
        return self._core.address

    @property
    def timeout_s(self) -> float:
        return self._core.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._core.timeout_s = value


class StreamState:
    """The events of one request, as far as no I/O is needed: the request id, whether
    the stream finished, and the cancel that runs when an unfinished stream is
    dropped. ``Stream`` and ``AsyncStream`` add the waiting."""

    def __init__(self, core: ClientCore, request_id: int, cancel: Callable[[int], None]) -> None:
        self.request_id = request_id
        self.finished = False
        self._core = core
        # no reference cycle: dropping the stream runs this at once, not at a GC pass
        self._cancel_when_dropped = weakref.finalize(self, cancel, request_id)

    def _take(self, message: Message) -> Event:
        event = self._core.event(self.request_id, message)
        if isinstance(event, TERMINAL):
            self.finished = True
            self._cancel_when_dropped.detach()
        return event

    def cancel(self) -> None:
        """Stop the request wherever it is (buffered or generating)."""
        if not self.finished:
            self.finished = True
            self._cancel_when_dropped()


def add_text(parts: list[str], event: Event) -> None:
    """Collect the text of ``event`` into ``parts``; raise the failure of a ``Failed``."""
    if isinstance(event, Tokens):
        parts.extend(event.pieces)
    elif isinstance(event, Failed):
        raise event.exception()
