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
    key: bytes | None = None
    """With curve: that public key (Z85, as ZeroMQ gives it): every message of the
    agent must come with it."""


@dataclass(slots=True)
class RequestRecord:
    request_id: int
    client: bytes
    client_request_id: int
    body: bytes
    """The normalized request, packed once; sent again on re-dispatch."""
    agent: bytes | None = None
    started: bool = False
    """At least one token frame reached the client: the request can only continue
    elsewhere (from ``token_ids``), not start again."""
    cancelled: bool = False
    """The client is gone or was answered; waiting for the agent to confirm the end."""
    outcome: str | None = None
    """How the request ended for its client, counted once in ``paddler_requests_total``
    (``done``, ``counted``, ``cancelled`` or an error kind); ``None`` while it is open."""
    last_activity: float = 0.0
    buffered_at: float = 0.0
    submitted_at: float = 0.0
    token_ids: bytearray | None = None
    """The ids of the tokens whose text reached the client, packed as the agents send
    them (appended, never unpacked on the way): what a continuation starts from.
    ``None`` when the request cannot continue elsewhere (an embedding request,
    continuations off, or an agent that does not send ids)."""
    continuations: int = 0
    """How many times the request moved to another agent after losing its own."""
    model_path: str | None = None
    """The model of the agent that streams it: a continuation goes to an agent with
    the same model (the token ids mean nothing to another one)."""
    continue_by: float = 0.0
    """While waiting to continue: when it gives up (502 ``AgentLost``)."""
    fingerprints: list[int] | None = None
    """Under the ``prefix`` policy: the chain of its prompt (``paddler.protocol.prefixes``)."""
    lost_reason: str = ""
    """While waiting to continue: how its agent was lost (for the 502)."""
    counting: bool = False
    """A ``count_only`` request: it ends as ``counted``, not ``done``."""
