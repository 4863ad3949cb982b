"""What a request stream yields, decoded from the broker's frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paddler.errors import ProtocolError, RequestFailed
from paddler.protocol.codec import unpack_body
from paddler.protocol.kinds import Kind
from paddler.protocol.messages import DispatchedBody, DoneBody, ErrorBody, Usage, token_pieces
from paddler.protocol.tool_calls import ToolCallOutcome


@dataclass(frozen=True, slots=True)
class Dispatched:
    """The request left the buffer for an agent. It comes again mid-stream when the
    request continues on another agent after losing its own (``queued_ms``: how long
    it waited for that one); the stream itself goes on without a seam."""

    agent_id: str
    agent_name: str | None
    queued_ms: int


@dataclass(frozen=True, slots=True)
class Tokens:
    """Text pieces one agent step produced for this request."""

    pieces: list[str]


@dataclass(frozen=True, slots=True)
class Reasoning:
    """Reasoning text a thinking model wrote in one step (markers left out); only for
    conversations with ``enable_thinking`` on a model whose template has markers."""

    pieces: list[str]


@dataclass(frozen=True, slots=True)
class ToolCallText:
    """Text of a tool call the model wrote in one step, markers included (as the
    model wrote it); only for requests with ``tools`` and ``tool_choice`` not
    ``none``. Its parsed form follows in a ``ToolCalls`` event when the block ends."""

    pieces: list[str]


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """What one tool-call block of the answer parsed to (``ToolCallOutcome``): the
    calls, or why there are none (the block could not be parsed, its calls do not
    match the tools' schemas, or its format is not one the model's template uses)."""

    outcome: ToolCallOutcome


@dataclass(frozen=True, slots=True)
class Logprobs:
    """Log-probabilities of the tokens whose text the next ``Tokens`` carries, as
    OpenAI's entries (``token``, ``logprob``, ``bytes``, ``top_logprobs``); only for
    requests that asked (``logprobs``)."""

    entries: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Embedding:
    """One document's result, externally tagged as in Paddler's API:
    ``{"Embedding": {...}}`` or ``{"DocumentExceedsBatchSize": {...}}``."""

    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Done:
    usage: Usage
    stop_sequence: str | None = None
    """The stop string (one of the request's ``stop``) that ended the answer, if one did."""


@dataclass(frozen=True, slots=True)
class Failed:
    code: int
    kind: str
    description: str

    def exception(self) -> RequestFailed:
        return RequestFailed(self.code, self.kind, self.description)


Event = (
    Dispatched
    | Tokens
    | Reasoning
    | ToolCallText
    | ToolCalls
    | Logprobs
    | Embedding
    | Done
    | Failed
)


def decode_event(kind: int, body: bytes) -> Event:
    """The event of one stream frame; a malformed one becomes ``Failed`` (502)."""
    try:
        if kind == Kind.TOKENS:
            return Tokens(token_pieces(unpack_body(body)))
        if kind == Kind.REASONING:
            return Reasoning(token_pieces(unpack_body(body)))
        if kind == Kind.TOOL_CALL:
            return ToolCallText(token_pieces(unpack_body(body)))
        value: Any = unpack_body(body)
        if kind == Kind.DONE:
            done = DoneBody.from_body(value)
            return Done(Usage.from_body(done.usage), done.stop_sequence)
        if kind == Kind.ERROR:
            error = ErrorBody.from_body(value)
            return Failed(error.code, error.kind, error.description)
        if kind == Kind.TOOL_CALLS:
            return ToolCalls(ToolCallOutcome.from_body(value))
        if kind == Kind.LOGPROBS:
            if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
                raise ProtocolError("Logprobs: body must be a list of maps")
            return Logprobs(value)
        if kind == Kind.EMBEDDING:
            if not isinstance(value, dict) or len(value) != 1:
                raise ProtocolError("Embedding: body must be a map with one variant")
            return Embedding(value)
        if kind == Kind.DISPATCHED:
            dispatched = DispatchedBody.from_body(value)
            return Dispatched(dispatched.agent_id, dispatched.agent_name, dispatched.queued_ms)
    except ProtocolError as exc:
        return Failed(502, "ProtocolError", f"malformed frame from the balancer: {exc}")
    return Failed(502, "ProtocolError", f"unexpected message kind {kind} in a stream")


TERMINAL = (Done, Failed)
