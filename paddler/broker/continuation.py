"""Continuation: a request that streamed text and lost its agent continues on another.

The broker keeps the ids of the tokens each request's text frames carried (their
third frame, appended unread). When the agent is lost (or gives a started request
back), the request waits here, ahead of the buffer, for a ready agent with the model
it was streamed with and a free slot (the least loaded first); it is dispatched
there with its prompt plus those tokens (``continuation`` in the body), at most
``--max-continuations`` times. A request no agent takes within
``--buffered-request-timeout`` fails with the 502 ``AgentLost`` it got before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from paddler.broker.records import RequestRecord
from paddler.protocol.codec import MAX_BODY_BYTES, TOKEN_ID, make_header, pack_body, unpack_body
from paddler.protocol.kinds import Kind
from paddler.protocol.requests import CONTINUATION

if TYPE_CHECKING:
    from paddler.broker.core import BrokerCore

log = logging.getLogger("paddler.broker")


class Continuations:
    def __init__(self, broker: BrokerCore) -> None:
        self.broker = broker
        self.waiting: dict[int, RequestRecord] = {}
        """Streamed requests whose agent was lost, waiting (ahead of the buffer) for
        an agent with the same model and a free slot, oldest first."""

    def add(self, record: RequestRecord, now: float, why: str) -> bool:
        """Queue a streamed request whose agent is lost to continue on another (its
        slot already released); ``False`` if it cannot (no token ids, or out of
        continuations): then it fails as before."""
        broker = self.broker
        token_ids = record.token_ids
        if (
            not token_ids
            or len(token_ids) % TOKEN_ID.size
            or record.continuations >= broker.settings.max_continuations
        ):
            return False
        record.agent = None
        record.continuations += 1
        record.continue_by = now + broker.settings.buffered_request_timeout_s
        record.lost_reason = why
        self.waiting[record.request_id] = record
        broker.metrics.continuations += 1
        return True

    def agent_for(self, record: RequestRecord) -> bytes | None:
        """A ready agent with a free slot and the model ``record`` was streamed with,
        the least loaded first; ``None`` if there is none now."""
        broker = self.broker
        registry = broker.registry
        best: bytes | None = None
        best_load = 0
        for identity, info in broker.agents.items():
            if info.status.model_path != record.model_path or not registry.is_ready(identity):
                continue
            load = registry.in_flight(identity)
            if load < registry.slots_total(identity) and (best is None or load < best_load):
                best, best_load = identity, load
        return best

    def dispatch(self, now: float) -> None:
        """Dispatch each waiting request an agent can take now, oldest first."""
        broker = self.broker
        for record in list(self.waiting.values()):
            agent = self.agent_for(record)
            if agent is None:
                continue
            del self.waiting[record.request_id]
            assert record.token_ids is not None  # checked by ``add``
            body = unpack_body(record.body)
            body[CONTINUATION] = {"token_ids": bytes(record.token_ids)}
            frame = pack_body(body)
            if len(frame) > MAX_BODY_BYTES:
                broker._fail(
                    record,
                    502,
                    "AgentLost",
                    f"{record.lost_reason} while generating; the request is too large to "
                    "continue elsewhere",
                )
                broker._forget(record)
                continue
            broker.registry.acquire(agent)
            record.agent = agent
            record.last_activity = now
            broker.in_flight.add(record.request_id, agent)
            broker._send_agent(agent, [make_header(Kind.DISPATCH, record.request_id), frame])
            info = broker.agents[agent]
            waited_s = now - (record.continue_by - broker.settings.buffered_request_timeout_s)
            broker._tell_dispatched(record, agent, info, waited_s)
            log.info(
                "request %d continues on agent %s (%s) after %d tokens (continuation %d of "
                "at most %d)",
                record.request_id,
                info.agent_id,
                info.name,
                len(record.token_ids) // TOKEN_ID.size,
                record.continuations,
                broker.settings.max_continuations,
            )

    def expire(self, now: float) -> None:
        """Fail the waiting requests no agent took in time."""
        broker = self.broker
        for record in [r for r in self.waiting.values() if now >= r.continue_by]:
            broker._fail(
                record,
                502,
                "AgentLost",
                f"{record.lost_reason} while generating; no agent with its model was free "
                f"to continue it within {broker.settings.buffered_request_timeout} ms",
            )
            broker._forget(record)
