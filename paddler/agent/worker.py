"""The engine side of an agent: a thread that owns the engine and loops over steps.

It talks to the I/O side over an inproc PAIR socket with protocol frames:
commands in (DISPATCH, CANCEL, DESIRED_STATE, DEREGISTER = stop), events out
(TOKENS with their token ids, DONE, ERROR ready to forward verbatim, and AGENT_STATUS),
a pass of the engine loop's events in one ``BATCH``.

It also supervises the engine. The engine isolates a fault of one request itself;
an exception that escapes ``Engine.step`` (or any other engine call of the loop)
means the engine's state cannot be trusted. Then the worker reports the issue
``{"EngineFailed": {"error": ..., "restarting": true}}`` with ``ready`` false, ends
every request it had admitted with 503 ``AgentEngineRestarted``, and rebuilds the
engine from the last desired state (``Engine.reset``); the agent stays registered.
After ``max_restarts`` failures within ``restart_window_s`` it stops trying: the
engine's native state is freed, the issue stays (``"restarting": false``), requests
dispatched meanwhile end with 503 ``AgentUnavailable`` (the broker sends them
elsewhere), and only a new desired state brings the engine back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from paddler.agent.engine import Engine
from paddler.errors import ProtocolError
from paddler.protocol.codec import (
    HEADER,
    batched,
    encode,
    pack_body,
    pack_token_ids,
    unpack_body,
)
from paddler.protocol.kinds import Kind
from paddler.protocol.messages import AgentStatus, ErrorBody
from paddler.protocol.prefixes import pack_fingerprints
from paddler.protocol.requests import dispatched_request

log = logging.getLogger("paddler.agent")

IDLE_POLL_MS = 100

_TOKENS_HEADER = int(Kind.TOKENS)
_REASONING_HEADER = int(Kind.REASONING)
_TOOL_CALL_HEADER = int(Kind.TOOL_CALL)


MAX_RESTARTS = 3
"""Engine restarts allowed within ``RESTART_WINDOW_S``; one more failure leaves the
engine down until a new desired state arrives."""

RESTART_WINDOW_S = 60.0


class _SocketSink:
    """Encodes engine events as frames for the PAIR socket, and keeps the ids of the
    requests admitted and not yet ended (the worker ends them if the engine dies).

    Events wait in ``pending`` until ``flush`` (the engine calls it before each
    decode, the loop after each pass), which sends them as one ``BATCH``: a step's
    tokens of every slot cost the I/O thread one wakeup, not one each. ``send_now``
    keeps the order (pending first)."""

    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self.socket = socket
        self.open: set[int] = set()
        self.pending: list[list[bytes]] = []
        self.before_flush: Callable[[], None] | None = None
        """Adds what must go out with the events (the slots' new prefixes: see
        ``EngineWorker._queue_held``)."""

    def flush(self) -> None:
        if self.before_flush is not None:
            self.before_flush()
        if self.pending:
            pending = self.pending
            self.pending = []
            for frames in batched(pending):
                self.socket.send_multipart(frames)

    def send_now(self, frames: list[bytes]) -> None:
        self.flush()
        self.socket.send_multipart(frames)

    def _text(
        self, header: int, request_id: int, pieces: list[str], token_ids: Sequence[int] | None
    ) -> None:
        frames = [HEADER.pack(header, request_id), pack_body(pieces)]
        if token_ids is not None:
            frames.append(pack_token_ids(token_ids))
        self.pending.append(frames)

    def tokens(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        self._text(_TOKENS_HEADER, request_id, pieces, token_ids)

    def reasoning(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        self._text(_REASONING_HEADER, request_id, pieces, token_ids)

    def tool_call(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        self._text(_TOOL_CALL_HEADER, request_id, pieces, token_ids)

    def tool_calls(self, request_id: int, outcome: dict[str, Any]) -> None:
        self.pending.append(encode(Kind.TOOL_CALLS, request_id, outcome))

    def logprobs(self, request_id: int, entries: list[dict[str, Any]]) -> None:
        self.pending.append(encode(Kind.LOGPROBS, request_id, entries))

    def embedding(self, request_id: int, result: dict[str, Any]) -> None:
        self.pending.append(encode(Kind.EMBEDDING, request_id, result))

    def done(
        self, request_id: int, usage: dict[str, int], stop_sequence: str | None = None
    ) -> None:
        self.open.discard(request_id)
        body: dict[str, Any] = {"usage": usage}
        if stop_sequence is not None:
            body["stop_sequence"] = stop_sequence
        self.pending.append(encode(Kind.DONE, request_id, body))

    def error(self, request_id: int, code: int, kind: str, description: str) -> None:
        self.open.discard(request_id)
        self.pending.append(
            encode(Kind.ERROR, request_id, ErrorBody(code, kind, description).to_body())
        )


ENGINE_STACK_BYTES = 64 * 1024 * 1024
"""The engine thread's stack, whatever the platform's default (musl's is 128 KiB):
llama.cpp's grammar parser recurses, and the grammar limits in
``paddler.protocol.grammar_limits`` were measured against an 8 MiB stack."""


class EngineWorker(threading.Thread):
    def __init__(
        self,
        engine: Engine,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        *,
        max_restarts: int = MAX_RESTARTS,
        restart_window_s: float = RESTART_WINDOW_S,
    ):
        super().__init__(name="paddler-engine", daemon=True)
        self.engine = engine
        self.context = context
        self.endpoint = endpoint
        self.ready = threading.Event()
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.restarts = 0
        """Engine restarts so far."""
        self._failures: deque[float] = deque()
        self._issue: dict[str, Any] | None = None
        """Reported with the engine's status while the engine is failed."""
        self._down: str | None = None
        """Why the engine stays down (too many failures), or ``None``."""
        self._desired_state: dict[str, Any] | None = None
        """The last desired state received: what a restart loads."""
        self._stopping = False

    def start(self) -> None:
        previous = threading.stack_size(ENGINE_STACK_BYTES)
        try:
            super().start()
        finally:
            threading.stack_size(previous)

    def _send_status(self, sink: _SocketSink) -> None:
        try:
            status = self.engine.status()
        except Exception:  # a broken engine still has an agent that reports
            log.exception("the engine cannot tell its status")
            status = AgentStatus(slots_total=self.engine.slots_total)
        if self._issue is not None:
            status.ready = False
            status.issues = [*status.issues, self._issue]
        sink.send_now(encode(Kind.AGENT_STATUS, 0, status.to_body()))

    def _queue_held(self, sink: _SocketSink) -> None:
        """What the slots whose kept cells changed hold now (``SLOT_PREFIXES``), in
        the batch of the ends that changed them: the balancer knows where a
        conversation's prefix is before its client hears the turn ended and sends
        the next one."""
        if self._down is not None:
            return  # no engine to ask
        held = self.engine.take_held()
        if held:
            chains = sorted(held.items())
            body = {"held": [[slot, pack_fingerprints(chain)] for slot, chain in chains]}
            sink.pending.append(encode(Kind.SLOT_PREFIXES, 0, body))

    def _command(self, sink: _SocketSink, frames: list[bytes]) -> bool:
        """Handle one command; ``False`` to stop."""
        kind, request_id = HEADER.unpack(frames[0])
        engine = self.engine
        if kind == Kind.DISPATCH:
            try:
                request = dispatched_request(unpack_body(frames[1]))
            except ProtocolError as exc:
                sink.error(request_id, 400, "InvalidRequest", str(exc))
                return True
            sink.open.add(request_id)
            engine.admit(request_id, request)
        elif kind == Kind.CANCEL:
            engine.cancel(request_id)
        elif kind == Kind.DESIRED_STATE:
            state = unpack_body(frames[1]).get("state")
            self._desired_state = state
            # the engine reports a model it cannot get or load as an issue in its
            # status; an exception here is a fault of the engine: restart it
            engine.apply_state(state)
            self._send_status(sink)
        elif kind == Kind.AGENT_QUERY:
            what = unpack_body(frames[1]).get("what")
            try:
                value = engine.describe(what)
            except Exception:  # a question must never take the engine down
                log.exception("answering %r failed", what)
                value = None
            sink.send_now(encode(Kind.AGENT_ANSWER, request_id, {"value": value}))
        elif kind == Kind.DEREGISTER:
            self._stopping = True
            return False
        return True

    def run(self) -> None:
        socket = self.context.socket(zmq.PAIR)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)
        sink = _SocketSink(socket)
        engine = self.engine
        engine.status_listener = lambda: self._send_status(sink)
        sink.before_flush = lambda: self._queue_held(sink)
        self.ready.set()
        try:
            self._supervise(socket, sink)
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("the engine worker failed")
        finally:
            try:
                if self._down is None:
                    engine.close()
            finally:
                socket.close(linger=0)

    def _supervise(self, socket: zmq.Socket[bytes], sink: _SocketSink) -> None:
        """Run the engine loop until told to stop; restart the engine when it fails."""
        while not self._stopping:
            try:
                if self._down is None:
                    self._serve(socket, sink)
                else:
                    self._serve_down(socket, sink)
                continue
            except zmq.ZMQError:
                raise  # the socket, not the engine: nothing to restart
            except Exception as exc:
                failure = exc
            self._recover(socket, sink, failure)

    def _serve(self, socket: zmq.Socket[bytes], sink: _SocketSink) -> None:
        """The engine loop: commands between steps; returns when told to stop."""
        engine = self.engine
        while True:
            timeout = 0 if engine.active_count() else IDLE_POLL_MS
            while socket.poll(timeout):
                try:
                    if not self._command(sink, socket.recv_multipart()):
                        sink.flush()
                        return
                except ProtocolError as exc:  # a bad command, not a broken engine
                    log.warning("dropped a command to the engine: %s", exc)
                timeout = 0
            if engine.active_count():
                engine.step(sink)
            if engine.take_status_change():
                self._send_status(sink)
            sink.flush()

    def _recover(self, socket: zmq.Socket[bytes], sink: _SocketSink, failure: Exception) -> None:
        """End every open request, then rebuild the engine from the last desired state
        (again if that fails too), or leave it down after too many failures."""
        while True:
            error = f"{type(failure).__name__}: {failure}"
            log.error("the engine failed: %s", error, exc_info=failure)
            now = time.monotonic()
            self._failures.append(now)
            while now - self._failures[0] > self.restart_window_s:
                self._failures.popleft()
            restarting = len(self._failures) <= self.max_restarts
            self._issue = {"EngineFailed": {"error": error, "restarting": restarting}}
            self._send_status(sink)
            self._end_open(sink, error)
            if not restarting:
                self._give_up(error)
                self._send_status(sink)
                return
            log.warning(
                "restarting the engine (%d failures in the last %.0f s): "
                "reloading the last desired state",
                len(self._failures),
                self.restart_window_s,
            )
            try:
                self.engine.reset(self._desired_state)
            except zmq.ZMQError:
                raise
            except Exception as exc:
                failure = exc
                continue
            self.restarts += 1
            self._issue = None
            self._send_status(sink)
            log.info("the engine restarted (%d restarts so far)", self.restarts)
            return

    def _end_open(self, sink: _SocketSink, error: str) -> None:
        for request_id in sorted(sink.open):
            sink.error(
                request_id,
                503,
                "AgentEngineRestarted",
                f"the agent's engine failed ({error}) and restarts; this request ended",
            )
        sink.open.clear()
        sink.flush()

    def _give_up(self, error: str) -> None:
        log.error(
            "the engine failed %d times within %.0f s; it stays down until a new desired "
            "state arrives",
            len(self._failures),
            self.restart_window_s,
        )
        self._down = error
        try:
            self.engine.close()
        except Exception:
            log.exception("freeing the failed engine failed")

    def _serve_down(self, socket: zmq.Socket[bytes], sink: _SocketSink) -> None:
        """No engine: answer commands until a new desired state brings it back."""
        while True:
            if not socket.poll(IDLE_POLL_MS):
                continue
            frames = socket.recv_multipart()
            kind, request_id = HEADER.unpack(frames[0])
            if kind == Kind.DESIRED_STATE:
                try:
                    state = unpack_body(frames[1]).get("state")
                except ProtocolError as exc:
                    log.warning("dropped a command to the engine: %s", exc)
                    continue
                log.info("a new desired state: starting the engine again")
                self._desired_state = state
                self._failures.clear()
                self._down = None
                self._issue = None
                self.engine.reset(state)  # a failure here is a new one
                self.restarts += 1
                self._send_status(sink)
                return
            if kind == Kind.DISPATCH:
                sink.error(
                    request_id,
                    503,
                    "AgentUnavailable",
                    f"the agent's engine is down after repeated failures ({self._down})",
                )
                sink.flush()
            elif kind == Kind.AGENT_QUERY:
                sink.send_now(encode(Kind.AGENT_ANSWER, request_id, {"value": None}))
            elif kind == Kind.DEREGISTER:
                self._stopping = True
                return
