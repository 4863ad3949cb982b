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

from paddler._core import InFlight, Registry, RequestBuffer
from paddler.broker.metrics import BrokerMetrics, LogBudget
from paddler.broker.queries import ClientQueries
from paddler.broker.records import AgentInfo, Outgoing, RequestRecord, Target, error_frames
from paddler.broker.settings import BrokerSettings
from paddler.broker.store import ResponseStore, StateStore
from paddler.curve import fingerprint
from paddler.errors import InvalidRequest, ProtocolError
from paddler.protocol.codec import (
    HEADER,
    MAX_BODY_BYTES,
    TOKEN_ID,
    encode,
    make_header,
    pack_body,
    unbatch,
    unpack_body,
)
from paddler.protocol.desired_state import validate_desired_state
from paddler.protocol.kinds import KNOWN_KINDS, PROTOCOL_VERSION, Kind
from paddler.protocol.messages import AgentSnapshot, AgentStatus, ErrorBody, Register

__all__ = ["Broker", "Outgoing", "Target"]
from paddler.protocol.prefixes import request_fingerprints, unpack_fingerprints
from paddler.protocol.requests import CONTINUATION, is_embedding_request, validate_request

log = logging.getLogger("paddler.broker")


REREGISTER_MEMORY = 4096
"""Unknown peers remembered as told to register again (past that, the memory restarts)."""

PREFIX_LOAD_SLACK = 2
"""Under the ``prefix`` policy, an agent holding a request's prefix takes it while it
has at most this many more requests in flight than the least loaded agent with a
free slot (SGLang's cache-aware router balances with a threshold of this kind)."""

LIVENESS_INTERVALS = 3
"""A peer silent for this many heartbeat intervals is dead."""

DROPS_LOGGED_PER_PEER = 5
"""Dropped frames logged one by one per peer and minute; the rest are summed up in
one line a minute (``dropped_frames`` in ``/metrics`` counts every one)."""
DROP_LOG_WINDOW_S = 60.0
DROP_LOG_PEERS = 256
"""Peers with a drop log window of their own; past that they share one."""

_TOKENS = int(Kind.TOKENS)
_REGISTER = int(Kind.REGISTER)
_EMBEDDING = int(Kind.EMBEDDING)
_LOGPROBS = int(Kind.LOGPROBS)
_STREAMED = (_TOKENS, int(Kind.REASONING), int(Kind.TOOL_CALL), _EMBEDDING)
_FORWARDED = (_LOGPROBS, int(Kind.TOOL_CALLS))
"""Sent with the text of a stream, and forwarded as they are."""
"""What agents stream to clients (text frames carry their token ids)."""
_DONE = int(Kind.DONE)
_ERROR = int(Kind.ERROR)
_TERMINAL = (_DONE, _ERROR)
_ELSEWHERE = frozenset({"AgentUnavailable", "AgentEngineRestarted"})
"""Errors with which an agent gives a request back: one that has not started goes
back to the head of the buffer, one that has streamed continues elsewhere."""
_BUG = "the balancer failed to handle this request (a bug, logged)"


def _label(info: AgentInfo) -> str:
    """An agent's label in per-agent series: its name, or its id without one."""
    return info.name or info.agent_id


class Broker:
    """Cluster state: registry, buffer, in-flight table, desired state."""

    def __init__(self, settings: BrokerSettings, store: StateStore | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else StateStore(settings.state_database)
        self.responses = ResponseStore(
            settings.state_database,
            max_count=settings.max_stored_responses,
            max_bytes=settings.max_stored_response_bytes,
            max_total_bytes=settings.stored_responses_bytes,
        )
        """Responses of the OpenAI Responses API kept with ``store: true``."""
        self.registry = Registry()
        self.buffer = RequestBuffer(settings.max_buffered_requests)
        self.in_flight = InFlight()
        self.agents: dict[bytes, AgentInfo] = {}
        self.requests: dict[int, RequestRecord] = {}
        self.by_client: dict[tuple[bytes, int], int] = {}
        self.continuing: dict[int, RequestRecord] = {}
        """Streamed requests whose agent was lost, waiting (ahead of the buffer) for
        an agent with the same model and a free slot, oldest first."""
        self.outbox: list[Outgoing] = []
        self.desired_state: dict[str, Any] | None = self.store.load()
        self._next_request_id = 1
        self._last_heartbeat_sent = 0.0
        self._last_tick: float | None = None
        self._reregister_asked: dict[bytes, float] = {}
        """Unknown peers told to register again, and when (once per interval each)."""
        self.liveness_s = settings.heartbeat_interval_s * LIVENESS_INTERVALS
        self.metrics = BrokerMetrics()
        self.round_robin = settings.dispatch_policy == "round-robin"
        self.prefix_policy = settings.dispatch_policy == "prefix"
        self.client_queries = ClientQueries(self)
        self.drop_log = LogBudget(DROPS_LOGGED_PER_PEER, DROP_LOG_WINDOW_S, DROP_LOG_PEERS)

    # ------------------------------------------------------------------ helpers

    def new_id(self) -> int:
        """A fresh id for a request or an agent question (never reused)."""
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id

    def _send_agent(self, identity: bytes, frames: list[bytes]) -> None:
        self.outbox.append((Target.AGENTS, identity, frames))

    def _send_client(self, identity: bytes, frames: list[bytes]) -> None:
        self.outbox.append((Target.CLIENTS, identity, frames))

    def _settle(self, record: RequestRecord, outcome: str) -> None:
        """The request's one outcome, counted once whatever ends it afterwards."""
        if record.outcome is None:
            if outcome == "done" and record.counting:
                outcome = "counted"  # a prompt counted (count_only), nothing generated
            record.outcome = outcome
            self.metrics.count_outcome(outcome)

    def _fail(self, record: RequestRecord, code: int, kind: str, description: str) -> None:
        """Answer the client with a terminal error (unless it was answered or is gone)."""
        if not record.cancelled:
            self._send_client(
                record.client, error_frames(record.client_request_id, code, kind, description)
            )
            record.cancelled = True
        self._settle(record, kind)

    def _forget(self, record: RequestRecord) -> None:
        """Take the request out of every table: the buffer, the in-flight table (its
        slot freed), the request table and the client's ids. Every request leaves
        through here, so the tables cannot disagree about it."""
        request_id = record.request_id
        self.buffer.remove(request_id)
        self.continuing.pop(request_id, None)
        self._release(record)
        if self.requests.get(request_id) is record:
            del self.requests[request_id]
        key = (record.client, record.client_request_id)
        if self.by_client.get(key) == request_id:
            del self.by_client[key]

    def _withdraw(self, record: RequestRecord, now: float) -> None:
        """The client will read nothing more of this request: a buffered one is
        forgotten; the agent of one in flight is told to stop, and its slot frees
        when the agent confirms the end (or after the inter-token timeout)."""
        record.cancelled = True
        if record.agent is None or record.request_id not in self.in_flight:
            self._forget(record)
        else:
            record.last_activity = now
            self._send_agent(
                record.agent, [make_header(Kind.CANCEL, record.request_id), pack_body({})]
            )

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self, record: RequestRecord, agent: bytes, now: float) -> None:
        record.agent = agent
        record.last_activity = now
        self.metrics.queue_wait.observe(now - record.buffered_at)
        self.in_flight.add(record.request_id, agent)
        self._send_agent(agent, [make_header(Kind.DISPATCH, record.request_id), record.body])
        info = self.agents.get(agent)
        record.model_path = info.status.model_path if info else None
        self._tell_dispatched(record, agent, info, now - record.buffered_at)

    def _tell_dispatched(
        self, record: RequestRecord, agent: bytes, info: AgentInfo | None, waited_s: float
    ) -> None:
        """Tell the client which agent serves its request now (again after a
        continuation) and how long it waited for it."""
        self._send_client(
            record.client,
            encode(
                Kind.DISPATCHED,
                record.client_request_id,
                {
                    "agent_id": info.agent_id if info else agent.hex(),
                    "agent_name": info.name if info else None,
                    "queued_ms": int(waited_s * 1000),
                },
            ),
        )

    def _choose(self, record: RequestRecord) -> bytes | None:
        """The agent for ``record``, its slot taken; ``None`` if none fits."""
        if self.round_robin:
            agent = self.registry.next_in_rotation()
            if agent is not None:
                self.registry.acquire(agent, True)
            return agent
        if record.fingerprints:
            agent, depth = self.registry.choose_prefix_and_acquire(
                record.fingerprints, PREFIX_LOAD_SLACK
            )
            if depth:
                self.metrics.prefix_matches += 1
            return agent
        return self.registry.choose_and_acquire()

    def dispatch_buffered(self, now: float) -> None:
        """Give free slots to the oldest waiters: continuations first."""
        if self.continuing:
            self._dispatch_continuations(now)
        buffer = self.buffer
        while True:
            request_id = buffer.peek()
            if request_id is None:
                return
            record = self.requests.get(request_id)
            if record is None or record.agent is not None or record.cancelled:
                # cannot happen while every request leaves through ``_forget``
                log.error("request %d was buffered but is not waiting; dropped it", request_id)
                buffer.remove(request_id)
                continue
            agent = self._choose(record)
            if agent is None:
                return
            buffer.pop()
            self._dispatch(record, agent, now)

    # ----------------------------------------------------------- continuation

    def _continue(self, record: RequestRecord, now: float, why: str) -> bool:
        """Queue a streamed request whose agent is lost to continue on another (its
        slot already released); ``False`` if it cannot (no token ids, or out of
        continuations): then it fails as before."""
        token_ids = record.token_ids
        if (
            not token_ids
            or len(token_ids) % TOKEN_ID.size
            or record.continuations >= self.settings.max_continuations
        ):
            return False
        record.agent = None
        record.continuations += 1
        record.continue_by = now + self.settings.buffered_request_timeout_s
        record.lost_reason = why
        self.continuing[record.request_id] = record
        self.metrics.continuations += 1
        return True

    def _agent_for(self, record: RequestRecord) -> bytes | None:
        """A ready agent with a free slot and the model ``record`` was streamed with,
        the least loaded first; ``None`` if there is none now."""
        registry = self.registry
        best: bytes | None = None
        best_load = 0
        for identity, info in self.agents.items():
            if info.status.model_path != record.model_path or not registry.is_ready(identity):
                continue
            load = registry.in_flight(identity)
            if load < registry.slots_total(identity) and (best is None or load < best_load):
                best, best_load = identity, load
        return best

    def _dispatch_continuations(self, now: float) -> None:
        for record in list(self.continuing.values()):
            agent = self._agent_for(record)
            if agent is None:
                continue
            del self.continuing[record.request_id]
            assert record.token_ids is not None  # checked by ``_continue``
            body = unpack_body(record.body)
            body[CONTINUATION] = {"token_ids": bytes(record.token_ids)}
            frame = pack_body(body)
            if len(frame) > MAX_BODY_BYTES:
                self._fail(
                    record,
                    502,
                    "AgentLost",
                    f"{record.lost_reason} while generating; the request is too large to "
                    "continue elsewhere",
                )
                self._forget(record)
                continue
            self.registry.acquire(agent)
            record.agent = agent
            record.last_activity = now
            self.in_flight.add(record.request_id, agent)
            self._send_agent(agent, [make_header(Kind.DISPATCH, record.request_id), frame])
            info = self.agents[agent]
            waited_s = now - (record.continue_by - self.settings.buffered_request_timeout_s)
            self._tell_dispatched(record, agent, info, waited_s)
            log.info(
                "request %d continues on agent %s (%s) after %d tokens (continuation %d of "
                "at most %d)",
                record.request_id,
                info.agent_id,
                info.name,
                len(record.token_ids) // TOKEN_ID.size,
                record.continuations,
                self.settings.max_continuations,
            )

    def _expire_continuations(self, now: float) -> None:
        for record in [r for r in self.continuing.values() if now >= r.continue_by]:
            self._fail(
                record,
                502,
                "AgentLost",
                f"{record.lost_reason} while generating; no agent with its model was free "
                f"to continue it within {self.settings.buffered_request_timeout} ms",
            )
            self._forget(record)

    # ------------------------------------------------------------ from agents

    def agent_batch(self, identity: bytes, frames: list[bytes], now: float) -> list[list[bytes]]:
        """The messages of a ``BATCH`` from an agent, to handle one by one; none (the
        batch dropped) if it is malformed. A registration in a batch is dropped: it
        needs the connection's key, which is the batch's."""
        try:
            messages = unbatch(frames)
        except ProtocolError as exc:
            self._drop("agent", identity, str(exc), now)
            return []
        kept = [message for message in messages if message[0][0] != _REGISTER]
        if len(kept) != len(messages):
            self._drop("agent", identity, "a registration inside a batch", now)
        return kept

    def on_agent_message(
        self, identity: bytes, frames: list[bytes], now: float, peer_key: bytes | None = None
    ) -> None:
        """One message from the agents socket (identity stripped). Never raises
        for bad input: malformed frames are logged and dropped. ``peer_key``: with
        curve, the public key the connection authenticated with (read for REGISTER)."""
        count = len(frames)
        if (count != 2 and count != 3) or len(frames[0]) != 9:
            self._drop("agent", identity, f"bad frame layout ({count} frames)", now)
            return
        kind, request_id = HEADER.unpack(frames[0])
        info = self.agents.get(identity)
        if info is not None:
            info.last_heard = now
        if kind in _STREAMED:  # the hot path: forward, rewrite the header
            record = self.requests.get(request_id)
            if record is None or record.agent != identity:
                return
            if not record.cancelled:
                if record.started:
                    self.metrics.inter_token.observe(now - record.last_activity)
                else:
                    record.started = True
                    self.metrics.time_to_first_token.observe(now - record.submitted_at)
                self._send_client(
                    record.client, [HEADER.pack(kind, record.client_request_id), frames[1]]
                )
                token_ids = record.token_ids
                if token_ids is not None:
                    if count == 3 and not len(frames[2]) & 3:  # whole int32 ids
                        token_ids += frames[2]
                    else:  # text without its tokens: the request cannot continue elsewhere
                        record.token_ids = None
            record.last_activity = now
            return
        if kind in _FORWARDED:  # with their tokens: forwarded as they are
            record = self.requests.get(request_id)
            if record is not None and record.agent == identity and not record.cancelled:
                self._send_client(
                    record.client, [HEADER.pack(kind, record.client_request_id), frames[1]]
                )
            return
        if count == 3:
            self._drop("agent", identity, "bad frame layout (3 frames, not tokens)", now)
            return
        try:
            if kind in _TERMINAL:
                self._on_terminal(identity, kind, request_id, frames[1], now)
            elif kind == Kind.REGISTER:
                self._on_register(identity, unpack_body(frames[1]), now, peer_key)
            elif info is None:
                # a frame from an agent we do not know (we restarted, or declared it
                # dead): one REREGISTER per interval, not one per stray frame
                asked = self._reregister_asked.get(identity)
                if kind in KNOWN_KINDS and (
                    asked is None or now - asked >= self.settings.heartbeat_interval_s
                ):
                    if len(self._reregister_asked) >= REREGISTER_MEMORY:
                        self._reregister_asked.clear()
                    self._reregister_asked[identity] = now
                    self._send_agent(identity, encode(Kind.REREGISTER, 0, {}))
            elif kind == Kind.HEARTBEAT:
                pass
            elif kind == Kind.SLOT_PREFIXES:
                self._on_held(info, unpack_body(frames[1]))
            elif kind == Kind.AGENT_STATUS:
                self._on_status(info, AgentStatus.from_body(unpack_body(frames[1])), now)
            elif kind == Kind.AGENT_ANSWER:
                self.client_queries.agent_answer(identity, request_id, frames[1])
            elif kind == Kind.DEREGISTER:
                log.info("agent %s (%s) deregistered", info.agent_id, info.name)
                self.remove_agent(identity, now, reason="deregistered")
            else:
                raise ProtocolError(f"kind {kind} is not valid from an agent")
        except ProtocolError as exc:
            self._drop("agent", identity, str(exc), now)

    def _drop(self, side: str, identity: bytes, reason: str, now: float) -> None:
        """Count a malformed or unexpected frame; log it unless its peer already
        used its lines of the minute (``tick`` then says how many were held back)."""
        self.metrics.dropped_frames += 1
        peer = f"{side} {identity.hex()[:16]}"
        if self.drop_log.allow(peer, now):
            log.warning("dropped a frame from %s: %s", peer, reason)

    def _log_held_back_drops(self, now: float) -> None:
        for peer, count in self.drop_log.ended(now):
            log.warning(
                "%d more frames dropped from %s in the last %g s",
                count,
                peer,
                self.drop_log.window_s,
            )

    def _on_register(
        self, identity: bytes, body: Any, now: float, peer_key: bytes | None = None
    ) -> None:
        register = Register.from_body(body)
        if register.version != PROTOCOL_VERSION:
            log.warning(
                "agent %s speaks protocol %s, this broker %s",
                identity.hex()[:16],
                register.version,
                PROTOCOL_VERSION,
            )
            self._send_agent(
                identity,
                error_frames(
                    0,
                    400,
                    "ProtocolVersionMismatch",
                    f"agent speaks protocol version {register.version}, this balancer speaks "
                    f"version {PROTOCOL_VERSION}; run the same paddler version on both",
                ),
            )
            return
        status = AgentStatus.from_body(register.status)
        key = fingerprint(peer_key) if peer_key else None
        known = self.agents.get(identity)
        if known is not None and known.key_fingerprint != key:
            # an agent is its key: another key cannot take over a registered agent's id
            log.warning(
                "refused a registration as agent %s with key %s: it registered with key %s",
                known.agent_id,
                key,
                known.key_fingerprint,
            )
            self._send_agent(
                identity,
                error_frames(
                    0, 403, "IdentityInUse", "this agent id is registered with another key"
                ),
            )
            return
        if known is not None:
            # The agent reconnected: what it had in flight is gone with its old session.
            self.remove_agent(identity, now, reason="re-registered")
        agent_id = identity.hex() if not identity.isascii() else identity.decode()
        self.agents[identity] = AgentInfo(identity, agent_id, register.name, status, now, key)
        self.registry.add(identity, status.slots_total, status.ready)
        log.info(
            "agent %s (%s) registered with %d slots%s",
            agent_id,
            register.name,
            status.slots_total,
            f", key {key}" if key else "",
        )
        self._send_agent(
            identity,
            encode(
                Kind.REGISTERED,
                0,
                {"agent_id": agent_id, "heartbeat_interval_ms": self.settings.heartbeat_interval},
            ),
        )
        if self.desired_state is not None:
            self._send_agent(identity, encode(Kind.DESIRED_STATE, 0, {"state": self.desired_state}))
        self.dispatch_buffered(now)

    def _on_held(self, info: AgentInfo, body: Any) -> None:
        """What some slots of an agent hold now: the prefix index learns it. The whole
        frame is checked before any of it is used."""
        held = body.get("held") if isinstance(body, dict) else None
        if not isinstance(held, list) or len(held) > max(1, info.status.slots_total):
            raise ProtocolError("SlotPrefixes.held: expected a list of at most one per slot")
        chains = []
        for entry in held:
            if not (
                isinstance(entry, list)
                and len(entry) == 2
                and type(entry[0]) is int
                and 0 <= entry[0] < max(1, info.status.slots_total)
                and isinstance(entry[1], bytes)
            ):
                raise ProtocolError("SlotPrefixes.held: expected [slot, fingerprints] pairs")
            chains.append((entry[0], unpack_fingerprints(entry[1])))
        for slot, chain in chains:
            self.registry.hold(info.identity, slot, chain)

    def _on_status(self, info: AgentInfo, status: AgentStatus, now: float) -> None:
        info.status = status
        self.registry.update(info.identity, status.slots_total, status.ready)
        self.dispatch_buffered(now)

    def _on_terminal(
        self, identity: bytes, kind: int, request_id: int, body: bytes, now: float
    ) -> None:
        """The agent ended a request (DONE or ERROR): its slot is free again."""
        record = self.requests.get(request_id)
        if record is None or record.agent != identity:
            return
        try:  # ends are small: decoding them costs little
            value = unpack_body(body)
            error = ErrorBody.from_body(value) if kind == _ERROR else None
        except ProtocolError as exc:
            value = error = None
            if kind == _ERROR:
                # the agent is done with it all the same: the client gets our error
                self._drop("agent", identity, str(exc), now)
                self._fail(
                    record,
                    502,
                    "ProtocolError",
                    "the agent ended the request with a malformed error",
                )
        if error is not None and error.kind in _ELSEWHERE and not record.cancelled:
            # the agent gave it back (draining, reloading, its engine restarted)
            restarted = error.kind == "AgentEngineRestarted"
            if not (restarted and record.continuations >= self.settings.max_continuations):
                self._release(record)
                record.agent = None
                if not record.started:  # try another one from the start
                    if restarted:  # a request that breaks engines moves a bounded number of times
                        record.continuations += 1
                    record.buffered_at = now
                    self.buffer.push_front(
                        request_id, now + self.settings.buffered_request_timeout_s
                    )
                    self.dispatch_buffered(now)
                    return
                if self._continue(record, now, f"agent gave it back ({error.kind})"):
                    self.dispatch_buffered(now)
                    return
        if not record.cancelled:
            self._send_client(record.client, [HEADER.pack(kind, record.client_request_id), body])
            record.cancelled = True
            self._settle(record, error.kind if error is not None else "done")
        info = self.agents.get(identity)
        if info is not None:
            self.metrics.count_agent_end(_label(info), kind, value)
        self._forget(record)
        self.dispatch_buffered(now)

    def _release(self, record: RequestRecord) -> None:
        agent = self.in_flight.remove(record.request_id)
        if agent is not None:
            self.registry.release(agent)

    def remove_agent(self, identity: bytes, now: float, reason: str) -> None:
        """An agent is gone: streamed requests continue on another agent (or fail with
        502 when they cannot), unstarted ones go back to the head of the buffer, its
        slots leave the registry, and its series leave the metrics (unless another
        agent has its label). Safe for any identity."""
        info = self.agents.pop(identity, None)
        self.registry.remove(identity)
        orphans = self.in_flight.of_agent(identity)
        redispatch: list[RequestRecord] = []
        failed = continued = 0
        for request_id in orphans:
            self.in_flight.remove(request_id)
            record = self.requests.get(request_id)
            if record is None:
                # cannot happen while every request leaves through ``_forget``
                log.error("request %d was in flight on a lost agent but is unknown", request_id)
                continue
            record.agent = None
            if record.cancelled:
                self._forget(record)
            elif record.started:
                if self._continue(record, now, f"agent {reason}"):
                    continued += 1
                    continue
                self._fail(record, 502, "AgentLost", f"agent {reason} while generating")
                self._forget(record)
                failed += 1
            else:
                redispatch.append(record)
        for record in reversed(redispatch):  # keep their order at the head of the buffer
            record.buffered_at = now
            if record.request_id not in self.buffer:
                self.buffer.push_front(
                    record.request_id, now + self.settings.buffered_request_timeout_s
                )
        if info is not None:
            label = _label(info)
            if all(_label(other) != label for other in self.agents.values()):
                self.metrics.forget_agent(label)
            if orphans or reason != "deregistered":
                log.warning(
                    "agent %s (%s) %s: %d requests continue elsewhere, %d failed, %d re-dispatched",
                    info.agent_id,
                    info.name,
                    reason,
                    continued,
                    failed,
                    len(redispatch),
                )
        self.dispatch_buffered(now)

    # ----------------------------------------------------------- from clients

    def on_client_message(self, identity: bytes, frames: list[bytes], now: float) -> None:
        if len(frames) != 2 or len(frames[0]) != 9:
            self._drop("client", identity, f"bad frame layout ({len(frames)} frames)", now)
            return
        kind, request_id = HEADER.unpack(frames[0])
        try:
            if kind == Kind.SUBMIT:
                self._on_submit(identity, request_id, frames[1], now)
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

    def _on_submit(self, client: bytes, client_request_id: int, body: bytes, now: float) -> None:
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
        try:
            request = validate_request(unpack_body(body))
        except InvalidRequest as exc:
            self.metrics.count_outcome("InvalidRequest")
            self._send_client(
                client, error_frames(client_request_id, 400, "InvalidRequest", str(exc))
            )
            return
        request_id = self.new_id()
        record = RequestRecord(
            request_id,
            client,
            client_request_id,
            pack_body(request),
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
            self._expire_continuations(now)
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
