"""The engine side of an agent: a thread that owns the engine and loops over steps.

It talks to the I/O side over an inproc PAIR socket with protocol frames:
commands in (DISPATCH, CANCEL, DESIRED_STATE, DEREGISTER = stop), events out
(TOKENS, DONE, ERROR ready to forward verbatim, and AGENT_STATUS).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import zmq

from paddler.agent.engine import Engine
from paddler.errors import ProtocolError
from paddler.protocol.codec import HEADER, encode, pack_body, unpack_body
from paddler.protocol.kinds import Kind
from paddler.protocol.messages import ErrorBody
from paddler.protocol.requests import dispatched_request

log = logging.getLogger("paddler.agent")

IDLE_POLL_MS = 100

_TOKENS_HEADER = int(Kind.TOKENS)


class _SocketSink:
    """Encodes engine events as frames on the PAIR socket."""

    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self.socket = socket

    def tokens(self, request_id: int, pieces: list[str]) -> None:
        self.socket.send_multipart([HEADER.pack(_TOKENS_HEADER, request_id), pack_body(pieces)])

    def embedding(self, request_id: int, result: dict[str, Any]) -> None:
        self.socket.send_multipart(encode(Kind.EMBEDDING, request_id, result))

    def done(self, request_id: int, usage: dict[str, int]) -> None:
        self.socket.send_multipart(encode(Kind.DONE, request_id, {"usage": usage}))

    def error(self, request_id: int, code: int, kind: str, description: str) -> None:
        self.socket.send_multipart(
            encode(Kind.ERROR, request_id, ErrorBody(code, kind, description).to_body())
        )


ENGINE_STACK_BYTES = 64 * 1024 * 1024
"""The engine thread's stack, whatever the platform's default (musl's is 128 KiB):
llama.cpp's grammar parser recurses, and the grammar limits in
``paddler.protocol.grammar_limits`` were measured against an 8 MiB stack."""


class EngineWorker(threading.Thread):
    def __init__(self, engine: Engine, context: zmq.Context[zmq.Socket[bytes]], endpoint: str):
        super().__init__(name="paddler-engine", daemon=True)
        self.engine = engine
        self.context = context
        self.endpoint = endpoint
        self.ready = threading.Event()

    def start(self) -> None:
        previous = threading.stack_size(ENGINE_STACK_BYTES)
        try:
            super().start()
        finally:
            threading.stack_size(previous)

    def _send_status(self, socket: zmq.Socket[bytes]) -> None:
        socket.send_multipart(encode(Kind.AGENT_STATUS, 0, self.engine.status().to_body()))

    def _command(self, socket: zmq.Socket[bytes], sink: _SocketSink, frames: list[bytes]) -> bool:
        """Handle one command; ``False`` to stop."""
        kind, request_id = HEADER.unpack(frames[0])
        engine = self.engine
        if kind == Kind.DISPATCH:
            try:
                request = dispatched_request(unpack_body(frames[1]))
            except ProtocolError as exc:
                sink.error(request_id, 400, "InvalidRequest", str(exc))
                return True
            engine.admit(request_id, request)
        elif kind == Kind.CANCEL:
            engine.cancel(request_id)
        elif kind == Kind.DESIRED_STATE:
            state = unpack_body(frames[1]).get("state")
            try:
                engine.apply_state(state)
            except Exception:  # the engine reports issues in its status; never die here
                log.exception("applying the desired state failed")
            self._send_status(socket)
        elif kind == Kind.AGENT_QUERY:
            what = unpack_body(frames[1]).get("what")
            try:
                value = engine.describe(what)
            except Exception:  # a question must never take the engine down
                log.exception("answering %r failed", what)
                value = None
            socket.send_multipart(encode(Kind.AGENT_ANSWER, request_id, {"value": value}))
        elif kind == Kind.DEREGISTER:
            return False
        return True

    def run(self) -> None:
        socket = self.context.socket(zmq.PAIR)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)
        sink = _SocketSink(socket)
        engine = self.engine
        engine.status_listener = lambda: self._send_status(socket)
        self.ready.set()
        try:
            while True:
                timeout = 0 if engine.active_count() else IDLE_POLL_MS
                running = True
                while socket.poll(timeout):
                    running = self._command(socket, sink, socket.recv_multipart())
                    if not running:
                        break
                    timeout = 0
                if not running:
                    break
                if engine.active_count():
                    engine.step(sink)
                if engine.take_status_change():
                    self._send_status(socket)
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("the engine loop failed")
        finally:
            try:
                engine.close()
            finally:
                socket.close(linger=0)
