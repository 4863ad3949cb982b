"""What the broker keeps about each agent and each request, and where frames go."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from paddler.protocol.codec import encode
from paddler.protocol.kinds import Kind
from paddler.protocol.messages import AgentStatus, ErrorBody


class Target(IntEnum):
    AGENTS = 0
    CLIENTS = 1


Outgoing = tuple[Target, bytes, list[bytes]]


def error_frames(request_id: int, code: int, kind: str, description: str) -> list[bytes]:
    return encode(Kind.ERROR, request_id, ErrorBody(code, kind, description).to_body())


@dataclass(slots=True)
class AgentInfo:
    identity: bytes
    agent_id: str
    name: str | None
    status: AgentStatus
    last_heard: float
    key_fingerprint: str | None = None
    """With curve: the fingerprint of the public key the agent authenticated with."""


@dataclass(slots=True)
class RequestRecord:
    request_id: int
    client: bytes
    client_request_id: int
    body: bytes
    """The normalized request, packed once; sent again on re-dispatch."""
    agent: bytes | None = None
    started: bool = False
    """At least one token frame reached the client: the request cannot be re-dispatched."""
    cancelled: bool = False
    """The client is gone or was answered; waiting for the agent to confirm the end."""
    outcome: str | None = None
    """How the request ended for its client, counted once in ``paddler_requests_total``
    (``done``, ``cancelled`` or an error kind); ``None`` while it is open."""
    last_activity: float = 0.0
    buffered_at: float = 0.0
    submitted_at: float = 0.0
