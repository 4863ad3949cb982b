"""The broker's tables and what every part of it shares: sending, ending a request
(every request leaves through ``_forget``, so the tables cannot disagree about it),
and dispatch (a free slot for the oldest waiter, by the configured policy).

``BrokerCore`` is the base of ``paddler.broker.state.Broker``: the agents' side of
the state machine is ``paddler.broker.agents``, continuation
``paddler.broker.continuation``, the clients' side ``paddler.broker.state``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from paddler._core import InFlight, Registry, RequestBuffer
from paddler.broker.continuation import Continuations
from paddler.broker.metrics import BrokerMetrics, LogBudget
from paddler.broker.records import AgentInfo, Outgoing, RequestRecord, Target, error_frames
from paddler.broker.settings import BrokerSettings
from paddler.broker.store import ResponseStore, StateStore
from paddler.protocol.codec import encode, make_header, pack_body
from paddler.protocol.kinds import Kind

if TYPE_CHECKING:
    from paddler.broker.queries import ClientQueries

log = logging.getLogger("paddler.broker")

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


class BrokerCore:
    """Cluster state: registry, buffer, in-flight table, desired state."""

    client_queries: ClientQueries

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
        self.continuations = Continuations(self)
        self.continuing = self.continuations.waiting
        """Streamed requests whose agent was lost, waiting to continue elsewhere."""
        self.outbox: list[Outgoing] = []
        self.desired_state: dict[str, Any] | None = self.store.load()
        self._next_request_id = 1
        self._last_heartbeat_sent = 0.0
        self._last_tick: float | None = None
        self._reregister_asked: dict[bytes, float] = {}
        self.trusted_clients: frozenset[bytes] = frozenset()
        """With curve: the keys of the balancer's own HTTP workers, whose requests were
        validated where they entered (``Broker._on_submit``)."""
        self._id_keys: dict[bytes, bytes] = {}
        """With curve: agent ids and the key each registered with (``AgentSide``)."""
        """Unknown peers told to register again, and when (once per interval each)."""
        self.liveness_s = settings.heartbeat_interval_s * LIVENESS_INTERVALS
        self.metrics = BrokerMetrics()
        self.round_robin = settings.dispatch_policy == "round-robin"
        self.prefix_policy = settings.dispatch_policy == "prefix"
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

    def _release(self, record: RequestRecord) -> None:
        agent = self.in_flight.remove(record.request_id)
        if agent is not None:
            self.registry.release(agent)

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
            self.continuations.dispatch(now)
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
