"""The broker's socket loop: two ROUTER sockets, timers and signals around ``Broker``."""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import zmq

from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker, Target
from paddler.protocol.codec import MAX_BODY_BYTES

log = logging.getLogger("paddler.broker")

MAX_MESSAGE_BYTES = MAX_BODY_BYTES + 4096
SEND_HWM = 100_000
"""Messages queued per peer before a send fails; a peer that far behind is treated as lost."""
RECV_HWM = 100_000
TICK_S = 0.05
"""Timers (liveness, deadlines, inter-token timeouts) are checked this often."""
SHUTDOWN_LINGER_MS = 1000
"""At shutdown, how long the sockets may take to deliver the last errors."""
BURST = 512
"""Messages taken from one socket before looking at the other and at the timers."""


def configure_router(socket: zmq.Socket[bytes]) -> None:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
    socket.setsockopt(zmq.SNDHWM, SEND_HWM)
    socket.setsockopt(zmq.RCVHWM, RECV_HWM)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)


class BrokerServer:
    """Binds the sockets and runs ``Broker`` until ``stop()`` or a signal."""

    def __init__(self, settings: BrokerSettings, broker: Broker | None = None) -> None:
        self.settings = settings
        self.broker = broker if broker is not None else Broker(settings)
        self._stop = threading.Event()
        self._linger_ms = 0
        self.failed = False
        self.context = zmq.Context()
        self.agents = self.context.socket(zmq.ROUTER)
        self.clients = self.context.socket(zmq.ROUTER)
        for socket in (self.agents, self.clients):
            configure_router(socket)
        try:
            self.agents.bind(settings.agents_addr)
            self.clients.bind(settings.clients_addr)
        except zmq.ZMQError:
            self.close()
            raise

    def stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _drain(self, socket: zmq.Socket[bytes], agents_side: bool) -> None:
        broker = self.broker
        handle = broker.on_agent_message if agents_side else broker.on_client_message
        now = time.monotonic()
        for _ in range(BURST):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                broker._drop("peer", b"", "message without identity or content")
                continue
            try:
                handle(frames[0], frames[1:], now)
            except Exception:  # a bug must not take the cluster down: log it and go on
                log.exception("failed to handle a message from %s", frames[0].hex()[:16])
            if len(broker.outbox) > BURST:
                self._flush()

    def _flush(self) -> None:
        broker = self.broker
        while broker.outbox:
            outbox = broker.outbox
            broker.outbox = []
            for target, identity, frames in outbox:
                socket = self.agents if target is Target.AGENTS else self.clients
                try:
                    socket.send_multipart([identity, *frames], zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    now = time.monotonic()
                    if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                        raise
                    if target is Target.AGENTS:
                        if identity in broker.agents:
                            broker.remove_agent(identity, now, reason="became unreachable")
                    else:
                        log.info("client %s unreachable; cancelling its requests", identity.hex())
                        broker.client_lost(identity, now)

    def run(self, watch: Callable[[], bool] | None = None) -> None:
        """Serve until ``stop()``, a signal, or ``watch()`` returning false (checked
        with the timers), then end open requests with 503 and close."""
        settings = self.settings
        log.info(
            "broker listening: agents on %s, clients on %s",
            settings.agents_addr,
            settings.clients_addr,
        )
        poller = zmq.Poller()
        poller.register(self.agents, zmq.POLLIN)
        poller.register(self.clients, zmq.POLLIN)
        broker = self.broker
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                timeout_ms = min(broker.next_timer_s(now), max(0.0, next_tick - now)) * 1000.0
                events = dict(poller.poll(int(timeout_ms)))
                if self.agents in events:
                    self._drain(self.agents, True)
                if self.clients in events:
                    self._drain(self.clients, False)
                now = time.monotonic()
                if now >= next_tick:
                    broker.tick(now)
                    next_tick = now + TICK_S
                    if watch is not None and not watch():
                        log.error("a companion process stopped; the balancer stops")
                        self.failed = True
                        self._stop.set()
                self._flush()
            broker.shutdown()
            self._flush()
            self._linger_ms = SHUTDOWN_LINGER_MS
        finally:
            self.close()

    def close(self) -> None:
        self.agents.close(linger=self._linger_ms)
        self.clients.close(linger=self._linger_ms)
        self.context.term()
        self.broker.store.close()
