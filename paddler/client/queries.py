"""The broker's queries as data: what a client sends, what answers it, and which
part of the answer the caller gets. No sockets here: both clients send these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from paddler.errors import ConfigurationError, PaddlerError, RequestFailed
from paddler.protocol.codec import unpack_body
from paddler.protocol.kinds import PROTOCOL_VERSION, Kind
from paddler.protocol.messages import ErrorBody

T = TypeVar("T")


def query_failure(kind: int, body: bytes, expected: Kind) -> PaddlerError:
    """The exception for a query answered with something else than ``expected``."""
    if kind == Kind.ERROR:
        error = ErrorBody.from_body(unpack_body(body))
        if error.kind == "InvalidDesiredState":
            field, _, message = error.description.partition(": ")
            return ConfigurationError(field, message)
        return RequestFailed(error.code, error.kind, error.description)
    return RequestFailed(502, "ProtocolError", f"expected {expected.name}, got kind {kind}")


@dataclass(frozen=True, slots=True)
class Query(Generic[T]):
    """One question to the broker: ``kind`` with ``body``, answered by ``expected``.

    The caller gets the reply's ``field`` (the whole reply when ``field`` is None).
    """

    kind: Kind
    body: dict[str, Any]
    expected: Kind
    field: str | None = None

    def answer(self, message: tuple[int, bytes]) -> T:
        """The answer in the reply ``(kind, body)``; the broker's error raised as ours."""
        kind, body = message
        if kind != self.expected:
            raise query_failure(kind, body, self.expected)
        value = unpack_body(body)
        if self.field is None:
            return cast(T, value)
        if not isinstance(value, dict) or self.field not in value:
            raise RequestFailed(
                502, "ProtocolError", f"{self.expected.name} without a {self.field!r} field"
            )
        return cast(T, value[self.field])


PING: Query[Any] = Query(Kind.PING, {"version": PROTOCOL_VERSION}, Kind.PONG)
AGENTS: Query[list[dict[str, Any]]] = Query(Kind.GET_AGENTS, {}, Kind.AGENTS, "agents")
BUFFERED_REQUESTS: Query[int] = Query(Kind.GET_BUFFERED, {}, Kind.BUFFERED, "count")
DESIRED_STATE: Query[dict[str, Any]] = Query(Kind.GET_DESIRED_STATE, {}, Kind.STATE, "state")
APPLICABLE_STATE: Query[dict[str, Any] | None] = Query(
    Kind.GET_APPLICABLE_STATE, {}, Kind.STATE, "state"
)
METRICS: Query[dict[str, Any]] = Query(Kind.GET_METRICS, {}, Kind.METRICS)


def agent_info(agent_id: str, what: str) -> Query[Any]:
    return Query(
        Kind.GET_AGENT_INFO, {"agent_id": agent_id, "what": what}, Kind.AGENT_INFO, "value"
    )


def put_desired_state(state: dict[str, Any]) -> Query[Any]:
    return Query(Kind.PUT_DESIRED_STATE, {"state": state}, Kind.ACK)


def put_response(response_id: str, body: bytes, expected: bytes | None = None) -> Query[Any]:
    """Keep ``body`` as the stored response ``response_id`` (OpenAI's Responses API);
    with ``expected``, only in place of that body (404 if none is kept, 409 if another)."""
    fields: dict[str, Any] = {"id": response_id, "body": body}
    if expected is not None:
        fields["expected"] = expected
    return Query(Kind.PUT_RESPONSE, fields, Kind.ACK)


def get_response(response_id: str) -> Query[bytes]:
    return Query(Kind.GET_RESPONSE, {"id": response_id}, Kind.STORED_RESPONSE, "body")


def delete_response(response_id: str) -> Query[Any]:
    return Query(Kind.DELETE_RESPONSE, {"id": response_id}, Kind.ACK)
