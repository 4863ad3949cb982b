"""The broker's answers to a client's questions about the cluster: ping, the agents
list, the buffered count, the desired state (read and write), metrics, questions
to one agent about itself (forwarded, answered within a deadline), and the responses
the OpenAI Responses API keeps (put, get, delete)."""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, Any

from paddler.broker.records import error_frames
from paddler.broker.store import MAX_RESPONSE_ID, ResponseTooLarge, StoredChanged
from paddler.errors import ConfigurationError, ProtocolError
from paddler.protocol.codec import HEADER, encode, unpack_body
from paddler.protocol.desired_state import validate_desired_state
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.messages import (
    DeleteResponse,
    GetAgentInfo,
    GetResponse,
    Ping,
    PutDesiredState,
    PutResponse,
)

if TYPE_CHECKING:
    from paddler.broker.state import Broker

log = logging.getLogger("paddler.broker")

AGENT_QUERY_TIMEOUT_S = 5.0
"""How long an agent may take to answer a question about itself."""


_STORED_RESPONSE_BODIES: dict[int, type[PutResponse | GetResponse | DeleteResponse]] = {
    Kind.PUT_RESPONSE: PutResponse,
    Kind.GET_RESPONSE: GetResponse,
    Kind.DELETE_RESPONSE: DeleteResponse,
}


class ClientQueries:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.queries: dict[int, tuple[bytes, int, bytes, float]] = {}
        """Agent questions waiting: query id -> (client, client request id, agent, deadline)."""

    def _reply(self, identity: bytes, frames: list[bytes]) -> None:
        self.broker._send_client(identity, frames)

    def answer(self, identity: bytes, kind: int, request_id: int, body: bytes, now: float) -> bool:
        """Answer a question of kind ``kind``; ``False`` if ``kind`` is not a question.
        ``ProtocolError`` for a malformed body."""
        broker = self.broker
        if kind == Kind.PING:
            version = Ping.from_body(unpack_body(body)).version
            if version != PROTOCOL_VERSION:
                self._reply(
                    identity,
                    error_frames(
                        request_id,
                        400,
                        "ProtocolVersionMismatch",
                        f"client speaks protocol version {version}, this balancer "
                        f"speaks version {PROTOCOL_VERSION}",
                    ),
                )
            else:
                self._reply(identity, encode(Kind.PONG, request_id, {"version": PROTOCOL_VERSION}))
        elif kind == Kind.GET_AGENTS:
            self._reply(
                identity,
                encode(
                    Kind.AGENTS,
                    request_id,
                    {"agents": [agent.to_body() for agent in broker.agent_snapshots()]},
                ),
            )
        elif kind == Kind.GET_BUFFERED:
            self._reply(identity, encode(Kind.BUFFERED, request_id, {"count": broker.waiting()}))
        elif kind == Kind.GET_DESIRED_STATE:
            state = broker.desired_state
            if state is None:
                state = validate_desired_state({})
            self._reply(identity, encode(Kind.STATE, request_id, {"state": state}))
        elif kind == Kind.GET_APPLICABLE_STATE:
            self._reply(identity, encode(Kind.STATE, request_id, {"state": broker.desired_state}))
        elif kind == Kind.GET_AGENT_INFO:
            self._ask_agent(identity, request_id, unpack_body(body), now)
        elif kind == Kind.GET_METRICS:
            self._reply(
                identity,
                encode(
                    Kind.METRICS,
                    request_id,
                    {
                        "metrics": broker.metrics.snapshot(),
                        "agents": [agent.to_body() for agent in broker.agent_snapshots()],
                        "buffered": broker.waiting(),
                    },
                ),
            )
        elif kind == Kind.PUT_DESIRED_STATE:
            raw = PutDesiredState.from_body(unpack_body(body)).state
            try:
                broker.put_desired_state(raw)
            except ConfigurationError as exc:
                self._reply(
                    identity, error_frames(request_id, 400, "InvalidDesiredState", str(exc))
                )
            else:
                self._reply(identity, encode(Kind.ACK, request_id, {}))
        elif kind in _STORED_RESPONSE_BODIES:
            self._stored_response(identity, kind, request_id, unpack_body(body))
        else:
            return False
        return True

    def _stored_response(self, identity: bytes, kind: int, request_id: int, body: Any) -> None:
        """Put, get or delete a stored response (``paddler.broker.store.ResponseStore``):
        one short statement on the broker's loop. A response too large is a 413, an
        unknown id a 404, a put whose ``expected`` body is no longer the kept one a 409,
        a failing database a 503; none of them stops the broker."""
        message = _STORED_RESPONSE_BODIES[kind].from_body(body)
        response_id = message.id
        if not 0 < len(response_id) <= MAX_RESPONSE_ID:
            raise ProtocolError(f"{message.NAME}: id must be 1 to {MAX_RESPONSE_ID} characters")
        store = self.broker.responses
        unknown = error_frames(
            request_id, 404, "UnknownResponse", f"no stored response {response_id!r}"
        )
        try:
            if isinstance(message, PutResponse):
                store.put(response_id, message.body, message.expected)
                reply = encode(Kind.ACK, request_id, {})
            elif kind == Kind.GET_RESPONSE:
                found = store.get(response_id)
                if found is None:
                    reply = unknown
                else:
                    reply = encode(Kind.STORED_RESPONSE, request_id, {"body": found})
            else:
                reply = encode(Kind.ACK, request_id, {}) if store.delete(response_id) else unknown
        except ResponseTooLarge as exc:
            reply = error_frames(request_id, 413, "ResponseTooLarge", str(exc))
        except KeyError:
            reply = unknown
        except StoredChanged as exc:
            reply = error_frames(request_id, 409, "StoredChanged", str(exc))
        except sqlite3.Error as exc:
            log.warning("the stored responses' database failed: %s", exc)
            reply = error_frames(
                request_id, 503, "ResponseStoreFailed", f"the state database failed: {exc}"
            )
        self._reply(identity, reply)

    def _ask_agent(self, client: bytes, client_request_id: int, body: Any, now: float) -> None:
        """Ask an agent about itself (model metadata, chat template override)."""
        question = GetAgentInfo.from_body(body)
        agent_id, what = question.agent_id, question.what
        identity = next((i for i, a in self.broker.agents.items() if a.agent_id == agent_id), None)
        if identity is None:
            self._reply(
                client,
                error_frames(client_request_id, 404, "UnknownAgent", f"no agent {agent_id!r}"),
            )
            return
        query_id = self.broker.new_id()
        self.queries[query_id] = (client, client_request_id, identity, now + AGENT_QUERY_TIMEOUT_S)
        self.broker._send_agent(identity, encode(Kind.AGENT_QUERY, query_id, {"what": what}))

    def agent_answer(self, identity: bytes, query_id: int, body: bytes) -> None:
        """An agent's answer: forwarded to the client that asked."""
        query = self.queries.get(query_id)
        if query is None or query[2] != identity:
            return
        del self.queries[query_id]
        self._reply(query[0], [HEADER.pack(Kind.AGENT_INFO, query[1]), body])

    def expire(self, now: float) -> None:
        """Answer 504 to the questions an agent left unanswered too long."""
        for query_id, (client, client_request_id, _, deadline) in list(self.queries.items()):
            if now >= deadline:
                del self.queries[query_id]
                self._reply(
                    client,
                    error_frames(
                        client_request_id,
                        504,
                        "AgentTimeout",
                        f"the agent did not answer within {AGENT_QUERY_TIMEOUT_S:g} s",
                    ),
                )
