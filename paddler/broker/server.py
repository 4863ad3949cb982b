"""The broker's socket loop: two ROUTER sockets, timers and signals around ``Broker``."""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from paddler.broker.metrics import LogBudget
from paddler.broker.settings import BrokerSettings
from paddler.broker.state import Broker, Target
from paddler.curve import (
    AGENTS_DOMAIN,
    CLIENTS_DOMAIN,
    KEY_HELP,
    CurveServer,
    KeyFolder,
    is_loopback_address,
    load_keypair,
)
from paddler.errors import ConfigurationError
from paddler.protocol.codec import MAX_BODY_BYTES, batched, is_batch
from paddler.protocol.kinds import Kind

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
FAULTS_LOGGED_PER_HANDLER = 5
"""Handler failures (bugs) logged with their traceback per handler and minute; the
rest are counted and summed up in one line a minute."""
FAULT_LOG_WINDOW_S = 60.0
SUBMIT_KIND = bytes([Kind.SUBMIT])


ZMQ_HEARTBEAT_IVL_MS = 1000
ZMQ_HEARTBEAT_TIMEOUT_MS = 3000
"""Connection-level heartbeats: a dead peer's connection closes within seconds, so
the identity it held is free for the peer's next connection."""


def configure_router(socket: zmq.Socket[bytes]) -> None:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # No ROUTER_HANDOVER: a second connection claiming an identity in use is refused,
    # so nobody can take over an agent's (or a client's) requests by its id.
    socket.setsockopt(zmq.SNDHWM, SEND_HWM)
    socket.setsockopt(zmq.RCVHWM, RECV_HWM)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.HEARTBEAT_IVL, ZMQ_HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMQ_HEARTBEAT_TIMEOUT_MS)


def check_network_exposure(settings: BrokerSettings) -> None:
    """Refuse a non-loopback address without curve, unless explicitly allowed."""
    if settings.curve_secret_key or settings.allow_insecure_network:
        return
    for flag, address in (
        ("--agents-addr", settings.agents_addr),
        ("--clients-addr", settings.clients_addr),
    ):
        if not is_loopback_address(address):
            raise ConfigurationError(
                flag,
                f"{address} may be reached from the network, and without curve anyone who "
                "reaches it can register agents or submit requests; turn curve on "
                f"(--curve-secret-key, --authorized-agent-keys; {KEY_HELP}) "
                "or pass --allow-insecure-network",
            )


def curve_server(
    settings: BrokerSettings, context: zmq.Context[Any], extra_client_keys: Iterable[bytes]
) -> CurveServer | None:
    """The authenticator of a balancer with ``--curve-secret-key`` (else ``None``)."""
    if not settings.curve_secret_key:
        if settings.authorized_agent_keys or settings.authorized_client_keys:
            raise ConfigurationError(
                "--curve-secret-key", "is needed for --authorized-agent-keys/-client-keys"
            )
        return None
    keypair = load_keypair(settings.curve_secret_key, "--curve-secret-key")
    if not settings.authorized_agent_keys:
        raise ConfigurationError(
            "--authorized-agent-keys",
            "is needed with curve: a folder of the agents' public keys (no agent could join)",
        )
    folders = {}
    for flag, value in (
        ("--authorized-agent-keys", settings.authorized_agent_keys),
        ("--authorized-client-keys", settings.authorized_client_keys),
    ):
        if value is not None and not Path(value).is_dir():
            raise ConfigurationError(flag, f"{value} is not a folder")
        folders[flag] = Path(value) if value else None
    return CurveServer(
        context,
        keypair,
        KeyFolder(folders["--authorized-agent-keys"]),
        KeyFolder(folders["--authorized-client-keys"], extra_client_keys),
    )


class BrokerServer:
    """Binds the sockets and runs ``Broker`` until ``stop()`` or a signal."""

    def __init__(
        self,
        settings: BrokerSettings,
        broker: Broker | None = None,
        extra_client_keys: Iterable[bytes] = (),
    ) -> None:
        """``extra_client_keys``: public keys allowed on the client socket besides the
        folder's (the balancer's own HTTP workers)."""
        check_network_exposure(settings)
        extra_client_keys = tuple(extra_client_keys)  # read twice: allow-list and trust
        self.settings = settings
        self._stop = threading.Event()
        self._linger_ms = 0
        self.failed = False
        self.faults = LogBudget(FAULTS_LOGGED_PER_HANDLER, FAULT_LOG_WINDOW_S)
        """Handler failures logged so far: a bug is logged, never silently swallowed,
        and a bug that fires on every message cannot fill the disk."""
        self.context = zmq.Context()
        self.curve = curve_server(settings, self.context, extra_client_keys)
        self.broker = broker if broker is not None else Broker(settings)
        if self.curve is not None:  # the workers' key: requests validated where they entered
            self.broker.trusted_clients = frozenset(extra_client_keys)
        self.agents = self.context.socket(zmq.ROUTER)
        self.clients = self.context.socket(zmq.ROUTER)
        for socket in (self.agents, self.clients):
            configure_router(socket)
        if self.curve is not None:
            self.curve.secure(self.agents, AGENTS_DOMAIN)
            self.curve.secure(self.clients, CLIENTS_DOMAIN)
        try:
            self.agents.bind(settings.agents_addr)
            self.clients.bind(settings.clients_addr)
        except zmq.ZMQError:
            self.close()
            raise

    @property
    def public_key(self) -> bytes | None:
        """The broker's public key (Z85) when curve is on."""
        return self.curve.keypair.public if self.curve is not None else None

    def stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _receive(self, socket: zmq.Socket[bytes], agents_side: bool) -> tuple[list[bytes], Any]:
        """One message; with curve, a message from an agent also gives the public key
        its connection authenticated with (ZeroMQ's ``User-Id`` of the frame): an
        agent is its key, every message of it is checked against the key it
        registered with (``AgentSide.on_agent_message``)."""
        if self.curve is None:
            return socket.recv_multipart(zmq.NOBLOCK), None
        parts = socket.recv_multipart(zmq.NOBLOCK, copy=False)
        frames = [part.bytes for part in parts]
        key = None
        if len(parts) > 1 and (agents_side or frames[1][:1] == SUBMIT_KIND):
            user = parts[1].get("User-Id")
            key = user.encode() if isinstance(user, str) else b""
        return frames, key

    def _drain(self, socket: zmq.Socket[bytes], agents_side: bool) -> None:
        broker = self.broker
        now = time.monotonic()
        for _ in range(BURST):
            try:
                frames, key = self._receive(socket, agents_side)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    raise
                self._fault("a receive", "", now)  # one bad message: the loop goes on
                return
            if len(frames) < 2:
                broker._drop("peer", b"", "message without identity or content", now)
                continue
            identity, message = frames[0], frames[1:]
            if agents_side and is_batch(message):
                for each in broker.agent_batch(identity, message, now):
                    self._handle(True, identity, each, key, now)
            else:
                self._handle(agents_side, identity, message, key, now)
            if len(broker.outbox) > BURST:
                self._flush()

    def _handle(
        self, agents_side: bool, identity: bytes, frames: list[bytes], key: Any, now: float
    ) -> None:
        """One message (identity removed); a bug in its handler ends only its request."""
        broker = self.broker
        try:
            if agents_side:
                broker.on_agent_message(identity, frames, now, key)
            else:
                broker.on_client_message(identity, frames, now, key)
        except Exception:  # a bug must not take the cluster down: log it, end its request
            side = "an agent" if agents_side else "a client"
            self._fault(f"a message from {side}", identity.hex()[:16], now)
            self._guard(
                "ending the request of a failed message",
                identity.hex()[:16],
                now,
                broker.handler_failed,
                agents_side,
                identity,
                frames,
                now,
            )

    def _flush(self) -> None:
        """Send what the handlers queued; each client's messages as few ``BATCH``
        messages as its bytes allow (a step of an agent's streams is often several
        requests of one HTTP worker), in order."""
        broker = self.broker
        while broker.outbox:
            outbox = broker.outbox
            broker.outbox = []
            to_clients: dict[bytes, list[list[bytes]]] = {}
            for target, identity, frames in outbox:
                if target is Target.CLIENTS:
                    queued = to_clients.get(identity)
                    if queued is None:
                        to_clients[identity] = [frames]
                    else:
                        queued.append(frames)
                else:
                    self._send(self.agents, target, identity, frames)
            for identity, messages in to_clients.items():
                for frames in batched(messages):
                    if not self._send(self.clients, Target.CLIENTS, identity, frames):
                        break

    def _send(
        self, socket: zmq.Socket[bytes], target: Target, identity: bytes, frames: list[bytes]
    ) -> bool:
        """Send one message; ``False`` if its peer is gone (then forgotten)."""
        broker = self.broker
        try:
            socket.send_multipart([identity, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            now = time.monotonic()
            if exc.errno == zmq.ETERM:
                raise  # the context is closing: the loop ends
            if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                # not a peer gone: this message is lost (its request times out if it
                # was a dispatch or an end), the peer stays, the loop goes on
                self._fault("a send", identity.hex()[:16], now)
                return True
            if target is Target.AGENTS:
                if identity in broker.agents:
                    self._guard(
                        "removing an unreachable agent",
                        identity.hex()[:16],
                        now,
                        broker.remove_agent,
                        identity,
                        now,
                        "became unreachable",
                    )
            else:
                log.info("client %s unreachable; cancelling its requests", identity.hex())
                self._guard(
                    "cancelling the requests of an unreachable client",
                    identity.hex()[:16],
                    now,
                    broker.client_lost,
                    identity,
                    now,
                )
            return False

    def _fault(self, what: str, peer: str, now: float) -> None:
        """Log the exception being handled, with its traceback, unless ``what`` (one
        budget per handler, whatever the peer) already logged its share of the minute;
        ``_tick`` sums up the rest."""
        if self.faults.allow(what, now):
            where = f"{what} ({peer})" if peer else what
            log.exception("bug while handling %s; the broker goes on", where)

    def _guard(
        self, what: str, peer: str, now: float, handler: Callable[..., None], *args: Any
    ) -> None:
        """Run one handler of the loop; a bug in it is logged and the loop goes on."""
        try:
            handler(*args)
        except Exception:  # a bug must not take the cluster down
            self._fault(what, peer, now)

    def _tick(self, now: float) -> None:
        """The broker's timers, guarded like every handler, and the sum of the
        handler failures not logged one by one."""
        self._guard("the timers", "", now, self.broker.tick, now)
        for handler, count in self.faults.ended(now):
            log.error(
                "%d more bugs while handling %s in the last %g s (not logged one by one)",
                count,
                handler,
                self.faults.window_s,
            )

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
                    self._tick(now)
                    next_tick = now + TICK_S
                    if watch is not None and not watch():
                        log.error("a companion process stopped; the balancer stops")
                        self.failed = True
                        self._stop.set()
                self._guard("sending", "", now, self._flush)
            self._guard("the shutdown", "", time.monotonic(), broker.shutdown)
            self._flush()
            self._linger_ms = SHUTDOWN_LINGER_MS
        finally:
            self.close()

    def close(self) -> None:
        self.agents.close(linger=self._linger_ms)
        self.clients.close(linger=self._linger_ms)
        if self.curve is not None:
            self.curve.stop()
        self.context.term()
        self.broker.store.close()
        self.broker.responses.close()
