"""The I/O side of an agent: one DEALER to the broker, heartbeats, status.

It registers with an identity of its own (a new one for each connection: see
``_register``), forwards dispatched requests and cancels to
the engine worker, forwards the worker's token frames to the broker with only
their request ids rewritten (a step's frames in one ``BATCH``),
re-registers by itself when the broker goes silent (a restart), and on SIGTERM
stops taking work, lets running requests finish (or cancels them after
``--shutdown-timeout``) and deregisters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from types import FrameType

import zmq

from paddler.agent.engine import Engine
from paddler.agent.settings import AgentSettings
from paddler.agent.worker import EngineWorker
from paddler.curve import client_keys, secure_client
from paddler.errors import ProtocolError
from paddler.protocol.codec import (
    HEADER,
    MAX_BODY_BYTES,
    batched,
    encode,
    messages_of,
    unpack_body,
)
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.messages import (
    AgentQuery,
    AgentStatus,
    DesiredStateBody,
    ErrorBody,
    Registered,
)

log = logging.getLogger("paddler.agent")

DEFAULT_HEARTBEAT_S = 1.0
LIVENESS_INTERVALS = 3.5
REGISTER_RETRY_S = 1.0
GIL_SWITCH_INTERVAL_S = 0.0005
_TERMINAL = (int(Kind.DONE), int(Kind.ERROR))


class RegistrationRejected(Exception):
    pass


class AgentService:
    def __init__(
        self, settings: AgentSettings, engine: Engine, identity: bytes | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.curve_keys = client_keys(
            settings.broker_public_key, settings.curve_secret_key, "--curve-secret-key"
        )
        self.base_identity = identity or f"agent-{uuid.uuid4().hex[:12]}".encode()
        self.identity = self.base_identity
        """The identity of the current connection: the base one, then with ``/2``,
        ``/3``... for each reconnection."""
        self._connections = 0
        self.context = zmq.Context()
        self._endpoint = f"inproc://engine-{id(self)}"
        self.pipe = self.context.socket(zmq.PAIR)
        self.pipe.setsockopt(zmq.LINGER, 0)
        self.pipe.bind(self._endpoint)
        self.worker = EngineWorker(engine, self.context, self._endpoint)
        self.dealer: zmq.Socket[bytes] | None = None
        self.status: AgentStatus = engine.status()
        self.active: dict[int, int] = {}
        """The requests of this session in flight: the engine's id of each (the
        engine's ids are the agent's own: a balancer that restarted numbers its
        requests from 1 again, while the engine may still be ending an abandoned
        request of the last session with the same number)."""
        self._broker_ids: dict[int, int] = {}
        """The other way round: the broker's id of each engine id in flight."""
        self._next_engine_id = 1
        self.held: dict[int, bytes] = {}
        """What each slot's kept KV cells hold (packed fingerprints), as last reported."""
        self.registered = False
        self.draining = False
        self.heartbeat_s = DEFAULT_HEARTBEAT_S
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._last_register = 0.0
        self._stop = threading.Event()
        self._drain_deadline = 0.0
        self.exit_code = 0

    # ------------------------------------------------------------------ socket

    def _connect(self) -> None:
        if self.dealer is not None:
            self.dealer.close(linger=0)
        dealer = self.context.socket(zmq.DEALER)
        if self.curve_keys is not None:
            secure_client(dealer, *self.curve_keys)
        dealer.setsockopt(zmq.IDENTITY, self.identity)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 100_000)
        dealer.setsockopt(zmq.RCVHWM, 100_000)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_BODY_BYTES + 4096)
        dealer.connect(self.settings.broker_addr)
        self.dealer = dealer

    def _send(self, frames: list[bytes]) -> None:
        assert self.dealer is not None
        try:
            self.dealer.send_multipart(frames, zmq.NOBLOCK)
            self._last_sent = time.monotonic()
        except zmq.Again:
            log.debug("broker not reachable; frame dropped")

    def _status_body(self) -> dict[str, object]:
        status = AgentStatus(**{**self.status.to_body()})
        status.ready = status.ready and not self.draining
        return status.to_body()

    def _register(self, now: float) -> None:
        """(Re)connect and register; requests of an earlier session are abandoned."""
        for engine_id in self.active.values():
            self.pipe.send_multipart(encode(Kind.CANCEL, engine_id, {}))
        self.active.clear()
        self._broker_ids.clear()
        # A new connection gets a new identity: frames the old one sent may still be
        # read by the broker after the new one registered (two TCP connections keep
        # no order between them), and under the same identity they would count as
        # the frames of a request the broker sends again to this agent.
        self._connections += 1
        if self._connections > 1:
            self.identity = self.base_identity + f"/{self._connections}".encode()
        self._connect()
        self.registered = False
        self._last_register = now
        self._last_heard = now
        self._send(
            encode(
                Kind.REGISTER,
                0,
                {
                    "version": PROTOCOL_VERSION,
                    "name": self.settings.name,
                    "status": self._status_body(),
                },
            )
        )

    # --------------------------------------------------------------- messages

    def _from_broker(self, frames: list[bytes], now: float) -> None:
        self._last_heard = now
        if len(frames) != 2 or len(frames[0]) != 9:
            log.warning("dropped a malformed frame from the broker")
            return
        kind, request_id = HEADER.unpack(frames[0])
        try:
            if kind == Kind.DISPATCH:
                if self.draining:
                    self._send(
                        encode(
                            Kind.ERROR,
                            request_id,
                            ErrorBody(503, "AgentUnavailable", "agent shutting down").to_body(),
                        )
                    )
                    return
                if len(self.active) >= self.engine.slots_total:
                    # only a slot-unaware dispatch policy (round robin) does this: the
                    # engine queues the request until a slot frees
                    log.info("queued a dispatch beyond the free slots (request %d)", request_id)
                if request_id in self.active:
                    raise ProtocolError(f"request {request_id} was dispatched already")
                engine_id = self._next_engine_id
                self._next_engine_id += 1
                self.active[request_id] = engine_id
                self._broker_ids[engine_id] = request_id
                self.pipe.send_multipart([HEADER.pack(kind, engine_id), frames[1]])
            elif kind == Kind.CANCEL:
                cancelled = self.active.get(request_id)
                if cancelled is not None:
                    self.pipe.send_multipart([HEADER.pack(kind, cancelled), frames[1]])
            elif kind == Kind.HEARTBEAT:
                pass
            elif kind == Kind.AGENT_QUERY:
                AgentQuery.from_body(unpack_body(frames[1]))
                self.pipe.send_multipart(frames)
            elif kind == Kind.REGISTERED:
                interval_ms = Registered.from_body(unpack_body(frames[1])).heartbeat_interval_ms
                self.heartbeat_s = max(0.05, interval_ms / 1000.0)
                self.registered = True
                log.info("registered with the balancer at %s", self.settings.broker_addr)
                if self.held:  # a new session of the balancer knows nothing of them
                    held = [[slot, packed] for slot, packed in sorted(self.held.items())]
                    self._send(encode(Kind.SLOT_PREFIXES, 0, {"held": held}))
            elif kind == Kind.DESIRED_STATE:
                DesiredStateBody.from_body(unpack_body(frames[1]))
                self.pipe.send_multipart(frames)
            elif kind == Kind.REREGISTER:
                log.info("the balancer does not know this agent (restarted?); registering again")
                self._register(now)
            elif kind == Kind.ERROR and request_id == 0:
                error = ErrorBody.from_body(unpack_body(frames[1]))
                log.error("the balancer refused this agent: %s", error.description)
                raise RegistrationRejected(error.description)
            else:
                raise ProtocolError(f"kind {kind} is not valid from the broker")
        except ProtocolError as exc:
            log.warning("dropped a frame from the broker: %s", exc)

    def _from_engine(self, frames: list[bytes]) -> None:
        """One message from the engine (a ``BATCH`` for a step's events): mapped to the
        broker's ids and sent on as one message again."""
        out: list[list[bytes]] = []
        for message in messages_of(frames):
            self._engine_message(message, out)
        for message in batched(out):
            self._send(message)

    def _engine_message(self, frames: list[bytes], out: list[list[bytes]]) -> None:
        kind, request_id = HEADER.unpack(frames[0])
        if kind == Kind.AGENT_STATUS:
            self.status = AgentStatus.from_body(unpack_body(frames[1]))
            out.append(encode(Kind.AGENT_STATUS, 0, self._status_body()))
            return
        if kind == Kind.AGENT_ANSWER:
            out.append(frames)
            return
        if kind == Kind.SLOT_PREFIXES:
            for slot, packed in unpack_body(frames[1])["held"]:
                self.held[slot] = packed
            out.append(frames)
            return
        broker_id = self._broker_ids.get(request_id)
        if broker_id is None:
            return  # a request abandoned at re-registration
        if kind in _TERMINAL:
            del self._broker_ids[request_id]
            del self.active[broker_id]
        frames[0] = HEADER.pack(kind, broker_id)
        out.append(frames)

    # -------------------------------------------------------------------- loop

    def stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info(
                "received %s: finishing running requests, then leaving", signal.Signals(signum).name
            )
            self.stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _begin_drain(self, now: float) -> None:
        self.draining = True
        self._drain_deadline = now + self.settings.shutdown_timeout / 1000.0
        self._send(encode(Kind.AGENT_STATUS, 0, self._status_body()))

    def run(self) -> int:
        # The engine thread and this I/O thread share the GIL: hand it over often so
        # frames and heartbeats never wait behind a burst of engine steps.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.worker.start()
        self.worker.ready.wait(5)
        self._register(time.monotonic())
        poller = zmq.Poller()
        poller.register(self.pipe, zmq.POLLIN)
        cancelled_all = False
        try:
            while True:
                assert self.dealer is not None
                dealer = self.dealer
                poller.register(dealer, zmq.POLLIN)
                events = dict(poller.poll(50))
                now = time.monotonic()
                if self.pipe in events:
                    for _ in range(1024):
                        try:
                            self._from_engine(self.pipe.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                if dealer in events:
                    for _ in range(1024):
                        if self.dealer is not dealer:
                            break  # re-registered on a new socket
                        try:
                            self._from_broker(dealer.recv_multipart(zmq.NOBLOCK), now)
                        except zmq.Again:
                            break
                if self.dealer is not dealer:
                    poller.unregister(dealer)
                if not self.worker.is_alive():
                    log.error("the engine stopped; the agent leaves")
                    self.exit_code = 1
                    break
                if self._stop.is_set() and not self.draining:
                    self._begin_drain(now)
                if self.draining:
                    if not self.active:
                        break
                    if now >= self._drain_deadline and not cancelled_all:
                        cancelled_all = True
                        for engine_id in list(self.active.values()):
                            self.pipe.send_multipart(encode(Kind.CANCEL, engine_id, {}))
                    if now >= self._drain_deadline + 2.0:
                        break
                if now - self._last_sent >= self.heartbeat_s:
                    self._send(encode(Kind.HEARTBEAT, 0, {}))
                silent = now - self._last_heard
                if silent > self.heartbeat_s * LIVENESS_INTERVALS and (
                    now - self._last_register > REGISTER_RETRY_S
                ):
                    log.warning("no word from the balancer for %.1f s; reconnecting", silent)
                    self._register(now)
        except RegistrationRejected:
            self.exit_code = 2
        finally:
            self._send(encode(Kind.DEREGISTER, 0, {}))
            self.close()
        return self.exit_code

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.pipe.send_multipart(encode(Kind.DEREGISTER, 0, {}), zmq.NOBLOCK)
        self.worker.join(timeout=10)
        if self.dealer is not None:
            self.dealer.close(linger=500)
        self.pipe.close(linger=0)
        self.context.term()


def agent_identity(name: str | None) -> bytes:
    """A stable identity for this process: readable, unique per process."""
    base = (name or "agent").replace(" ", "-")[:40]
    return f"{base}-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
