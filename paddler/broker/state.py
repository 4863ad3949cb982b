"""The broker as a state machine you can drive without sockets.

``Broker`` is fed decoded-enough messages (an identity and the frames after it)
and the current monotonic time; it appends what must be sent to ``outbox`` as
``(Target, identity, frames)``. The socket loop in ``server.py`` only moves
frames between ZeroMQ and this object, and reports send failures back.

Token frames are forwarded without unpacking their bodies: only the 9-byte
header is rewritten with the client's own request id. Their third frame, the ids of
the tokens whose text they carry, is appended to the request's record (no
unpacking either): when the agent is lost, a request that already streamed text
continues on another agent from its prompt and those tokens (``continuing``: ahead
of the buffer, at most ``--max-continuations`` times), and its client sees nothing
but the rest of its stream.
"""

from __future__ import annotations

import logging
from typing import Any

from paddler.broker.agents import AgentSide
from paddler.broker.core import (
    DROP_LOG_PEERS,
    DROPS_LOGGED_PER_PEER,
    PREFIX_LOAD_SLACK,
    BrokerCore,
)
from paddler.broker.queries import ClientQueries
from paddler.broker.records import Outgoing, RequestRecord, Target, error_frames
from paddler.broker.settings import BrokerSettings
from paddler.broker.store import StateStore
from paddler.errors import InvalidRequest, ProtocolError
from paddler.protocol.codec import HEADER, encode, make_header, pack_body, unpack_body
from paddler.protocol.desired_state import validate_desired_state
from paddler.protocol.kinds import KNOWN_KINDS, Kind
from paddler.protocol.messages import AgentSnapshot
from paddler.protocol.prefixes import request_fingerprints
from paddler.protocol.requests import (
    CONTINUATION,
    dispatched_request,
    is_embedding_request,
    validate_request,
)

__all__ = [
    "DROPS_LOGGED_PER_PEER",
    "DROP_LOG_PEERS",
    "PREFIX_LOAD_SLACK",
    "Broker",
    "BrokerCore",
    "Outgoing",
    "Target",
]

log = logging.getLogger("paddler.broker")

_BUG = "the balancer failed to handle this request (a bug, logged)"


def submitted_request(body: bytes) -> dict[str, Any] | None:
    """A trusted client's request, checked for its wire shape only (as an agent checks
    a dispatch); ``None`` when it is not one (then it is validated as any other)."""
    try:
        request = dispatched_request(unpack_body(body))
    except ProtocolError:
        return None
    return None if CONTINUATION in request else request


class Broker(AgentSide):
    """The broker as a whole: its agents' side (``AgentSide``), its clients' side
    (here), the desired state, timers and snapshots."""

    def __init__(self, settings: BrokerSettings, store: StateStore | None = None) -> None:
        super().__init__(settings, store)
        self.client_queries = ClientQueries(self)

    # ----------------------------------------------------------- from clients

    def on_client_message(
        self, identity: bytes, frames: list[bytes], now: float, peer_key: bytes | None = None
    ) -> None:
        """One message from the clients socket (identity stripped); ``peer_key``: with
        curve, the key a SUBMIT's connection authenticated with."""
        if len(frames) != 2 or len(frames[0]) != 9:
            self._drop("client", identity, f"bad frame layout ({len(frames)} frames)", now)
            return
        kind, request_id = HEADER.unpack(frames[0])
        try:
            if kind == Kind.SUBMIT:
                trusted = peer_key is not None and peer_key in self.trusted_clients
                self._on_submit(identity, request_id, frames[1], now, trusted)
            elif kind == Kind.CANCEL:
                self.cancel(identity, request_id, now)
            elif not self.client_queries.answer(identity, kind, request_id, frames[1], now):
                raise ProtocolError(f"kind {kind} is not valid from a client")
        except ProtocolError as exc:
            self._drop("client", identity, str(exc), now)
            if kind in KNOWN_KINDS and kind != Kind.CANCEL:
                self._send_client(
                    identity, error_frames(request_id, 400, "ProtocolError", str(exc))
                )
                if kind == Kind.SUBMIT:
                    self.metrics.count_outcome("ProtocolError")

    def _on_submit(
        self, client: bytes, client_request_id: int, body: bytes, now: float, trusted: bool = False
    ) -> None:
        """``trusted``: from the balancer's own HTTP workers (their key, with curve),
        which validated the request where it entered: only its wire shape is checked
        and its frame goes on as it came. Any other client's request is validated here,
        its edge."""
        if (client, client_request_id) in self.by_client:
            self.metrics.count_outcome("DuplicateRequestId")
            self._send_client(
                client,
                error_frames(
                    client_request_id,
                    400,
                    "DuplicateRequestId",
                    f"request id {client_request_id} is already in use on this connection",
                ),
            )
            return
        request = submitted_request(body) if trusted else None
        if request is None:
            try:
                request = validate_request(unpack_body(body))
            except InvalidRequest as exc:
                self.metrics.count_outcome("InvalidRequest")
                self._send_client(
                    client, error_frames(client_request_id, 400, "InvalidRequest", str(exc))
                )
                return
            body = pack_body(request)
        request_id = self.new_id()
        record = RequestRecord(
            request_id,
            client,
            client_request_id,
            body,
            buffered_at=now,
            submitted_at=now,
            counting=bool(request.get("count_only")),
        )
        if self.settings.max_continuations and not is_embedding_request(request):
            record.token_ids = bytearray()
        if self.prefix_policy:
            record.fingerprints = request_fingerprints(request)
        if not len(self.buffer):
            agent = self._choose(record)
            if agent is not None:
                self.requests[request_id] = record
                self.by_client[(client, client_request_id)] = request_id
                self._dispatch(record, agent, now)
                return
        if not self.buffer.push(request_id, now + self.settings.buffered_request_timeout_s):
            self.metrics.count_outcome("BufferOverflow")
            self._send_client(
                client,
                error_frames(
                    client_request_id, 503, "BufferOverflow", "Buffered requests overflow"
                ),
            )
            return
        self.requests[request_id] = record
        self.by_client[(client, client_request_id)] = request_id

    def cancel(self, client: bytes, client_request_id: int, now: float) -> None:
        """The client no longer wants the request: drop it from the buffer, or tell
        the agent (its slot frees when the agent confirms the end)."""
        key = (client, client_request_id)
        request_id = self.by_client.get(key)
        if request_id is None:
            return
        record = self.requests.get(request_id)
        if record is None:  # cannot happen while every request leaves through ``_forget``
            del self.by_client[key]
            return
        self._settle(record, "cancelled")
        self._withdraw(record, now)

    def client_lost(self, client: bytes, now: float) -> None:
        """A send to this client failed: cancel everything it asked for (the outcome
        of each is ``cancelled``, as if the client had cancelled it)."""
        for (owner, client_request_id), _ in list(self.by_client.items()):
            if owner == client:
                self.cancel(client, client_request_id, now)

    # ------------------------------------------------------------ desired state

    def put_desired_state(self, raw: dict[str, Any]) -> None:
        state = validate_desired_state(raw)
        self.store.save(state)
        self.desired_state = state
        frames = encode(Kind.DESIRED_STATE, 0, {"state": state})
        for identity in self.agents:
            self._send_agent(identity, list(frames))

    # ------------------------------------------------------------------ timers

    def tick(self, now: float) -> None:
        """Heartbeats, liveness, buffered deadlines and inter-token timeouts."""
        if now - self._last_heartbeat_sent >= self.settings.heartbeat_interval_s:
            self._last_heartbeat_sent = now
            heartbeat = encode(Kind.HEARTBEAT, 0, {})
            for identity in self.agents:
                self._send_agent(identity, list(heartbeat))
        if (
            self._last_tick is not None
            and now - self._last_tick > self.settings.heartbeat_interval_s
        ):
            # the broker itself stalled (the machine, a pause): while it did not read,
            # its agents' heartbeats waited in the socket; that time is not their silence
            gap = now - self._last_tick
            if self.agents:
                log.warning("the broker did not run for %.1f s; its agents are excused", gap)
            for info in self.agents.values():
                info.last_heard = min(now, info.last_heard + gap)
        self._last_tick = now
        for identity, info in list(self.agents.items()):
            if now - info.last_heard > self.liveness_s:
                self.remove_agent(identity, now, reason="stopped answering")
        self.client_queries.expire(now)
        self._log_held_back_drops(now)
        if self.continuing:
            self.continuations.expire(now)
        for request_id in self.buffer.pop_expired(now):
            record = self.requests.get(request_id)
            if record is None:  # cannot happen while every request leaves through ``_forget``
                continue
            self._fail(
                record,
                504,
                "BufferedRequestTimeout",
                f"waited {self.settings.buffered_request_timeout} ms for a free slot",
            )
            self._forget(record)
        item_timeout = self.settings.inference_item_timeout_s
        for record in list(self.requests.values()):
            if record.agent is None or now - record.last_activity <= item_timeout:
                continue
            if record.cancelled:
                # the agent never confirmed the end: give its slot back
                self._forget(record)
                self.dispatch_buffered(now)
                continue
            self._fail(
                record,
                504,
                "InferenceItemTimeout",
                f"no token within {self.settings.inference_item_timeout} ms",
            )
            record.last_activity = now
            self._send_agent(
                record.agent, [make_header(Kind.CANCEL, record.request_id), pack_body({})]
            )

    def next_timer_s(self, now: float) -> float:
        """Seconds until ``tick`` has work, capped so liveness is checked often."""
        wait = self._last_heartbeat_sent + self.settings.heartbeat_interval_s - now
        deadline = self.buffer.next_deadline()
        if deadline is not None:
            wait = min(wait, deadline - now)
        return max(0.0, min(wait, 0.1))

    # --------------------------------------------------------------- snapshots

    def waiting(self) -> int:
        """Requests waiting for a free slot: buffered, or waiting to continue."""
        return len(self.buffer) + len(self.continuing)

    def agent_snapshots(self) -> list[AgentSnapshot]:
        """Every agent as the broker sees it, by name then id; ``slots_processing``
        is the broker's own count."""
        snapshots = [
            AgentSnapshot(
                **{**info.status.to_body(), "issues": list(info.status.issues)},
                id=info.agent_id,
                name=info.name,
                slots_processing=self.registry.in_flight(identity),
                key_fingerprint=info.key_fingerprint,
            )
            for identity, info in self.agents.items()
        ]
        snapshots.sort(key=AgentSnapshot.sort_key)
        return snapshots

    def shutdown(self) -> None:
        """Every open request ends with 503; agents are told to stop work. The tables
        end empty, so a send failing in the last flush (``remove_agent``) finds nothing."""
        for record in list(self.requests.values()):
            if record.agent is not None:
                self._send_agent(
                    record.agent, [make_header(Kind.CANCEL, record.request_id), pack_body({})]
                )
            self._fail(record, 503, "ShuttingDown", "balancer is shutting down")
            self._forget(record)

    def handler_failed(
        self, agents_side: bool, identity: bytes, frames: list[bytes], now: float
    ) -> None:
        """A handler raised on this message (a bug): the request or query it was
        about ends with 500 ``InternalError``, so its client is not left waiting and
        its slot is not held forever. Called by the socket loop, which logs the bug."""
        if len(frames) not in (2, 3) or len(frames[0]) != 9:
            return
        kind, request_id = HEADER.unpack(frames[0])
        if agents_side:
            record = self.requests.get(request_id)
            if record is None or record.agent != identity:
                return
        else:
            found = self.by_client.get((identity, request_id))
            record = self.requests.get(found) if found is not None else None
            if record is None:
                if kind == Kind.SUBMIT:
                    self.metrics.count_outcome("InternalError")
                if kind != Kind.CANCEL:  # a submit or a query: its client waits for an answer
                    self._send_client(
                        identity, error_frames(request_id, 500, "InternalError", _BUG)
                    )
                return
        self._fail(record, 500, "InternalError", _BUG)
        self._withdraw(record, now)

    def __repr__(self) -> str:
        return (
            f"<Broker agents={len(self.agents)} buffered={len(self.buffer)} "
            f"continuing={len(self.continuing)} in_flight={len(self.in_flight)} "
            f"{self.registry!r}>"
        )
