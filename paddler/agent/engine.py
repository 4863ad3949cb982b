"""The narrow interface between an agent's I/O side and its inference engine.

An engine is driven by one thread only (the engine worker). Each ``step`` runs
one decode step for every request it holds and reports what happened through an
``EventSink``: the text pieces each request produced in that step (one call per
request per step: that is the coalescing), its end with usage, or its error.

Errors that come from the engine itself, not from what a request asked (those are
``InvalidRequest``, ``PromptTooLong``, ``ChatTemplateError``, the grammar kinds...):

- ``SamplerError`` (500): sampling a request's next token raised; that request ends.
- ``DetokenizationFailed`` (500): turning a request's token into text raised.
- ``EngineFault`` (500): any other exception while admitting, stepping or finishing
  one request; the description names the exception's class and message. Only that
  request ends: its slot and KV cells are freed and the others go on.
- ``KvCacheExhausted`` (503): ``llama_decode`` found no room in the KV cache even for
  a batch without prompt chunks; the request holding the most cells ends.
- ``DecodeFailed`` (500): ``llama_decode`` failed (any code but 0 and 1); the requests
  with tokens in that batch end, the others go on.
- ``AgentEngineRestarted`` (503): an exception escaped the engine loop; the worker
  ended every request the engine held and restarted it (``Engine.reset``). The
  broker continues a streamed one on another agent and dispatches the others again.
- ``AgentUnavailable`` (503): the agent cannot take the request now (no model,
  shutting down, engine down after repeated failures); the broker sends a request
  that has not started elsewhere.
- ``InvalidContinuation`` (400): a continued request's tokens do not fit this model
  (an id out of its vocabulary, an end-of-generation token, a token its grammar
  refuses) or its slot.

A request continued from another agent (``continuation`` in the dispatched request,
``paddler.protocol.requests.continued_tokens``) starts from its prompt plus the tokens
already generated: they are prefilled with the prompt, replayed through the request's
sampler chain (grammar state, penalties) and its text assembler (UTF-8 and stop
strings across the seam), count toward ``max_tokens`` and in ``content_tokens``, and
their text is not sent again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from paddler.errors import EngineError
from paddler.protocol.messages import AgentStatus


class EventSink(Protocol):
    def tokens(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        """The text a request produced in one step. ``token_ids``: the tokens whose
        text is now sent (including earlier ones that produced none, e.g. held back
        as the start of a stop string): an engine that gives them lets the broker
        continue the stream on another agent if this one is lost (``None``: it cannot)."""

    def reasoning(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        """Like ``tokens``, for text a thinking model wrote as its reasoning."""

    def tool_call(
        self, request_id: int, pieces: list[str], token_ids: Sequence[int] | None = None
    ) -> None:
        """Like ``tokens``, for the text of a tool call (markers included)."""

    def tool_calls(self, request_id: int, outcome: dict[str, Any]) -> None:
        """What a tool-call block that ended parsed to (``ToolCallOutcome.to_body``);
        only for requests with ``parse_tool_calls``."""

    def logprobs(self, request_id: int, entries: list[dict[str, Any]]) -> None:
        """Log-probabilities (OpenAI's entries) of the tokens whose text the next
        ``tokens`` call carries; only for requests that asked (``logprobs``)."""

    def embedding(self, request_id: int, result: dict[str, Any]) -> None: ...

    def done(
        self, request_id: int, usage: dict[str, int], stop_sequence: str | None = None
    ) -> None:
        """The request ended with its whole answer; ``stop_sequence``: the stop
        string that ended it, if one did."""

    def error(self, request_id: int, code: int, kind: str, description: str) -> None: ...

    def flush(self) -> None:
        """Everything reported so far may go out now: an engine calls it before a
        decode, so a step's text does not wait for the next one (the agent's sink
        sends what it gathered as one message)."""


"""Code of the error an engine reports for a request it ended on cancel."""


class Engine(ABC):
    """What an agent needs from an inference engine."""

    slots_total: int
    status_listener: Callable[[], None] | None = None
    """Set by the worker: call it (from the engine thread) to report the status at
    once, e.g. while a local model loads inside ``apply_state``. Downloads run on a
    thread of their own and report through the status the worker polls
    (``take_status_change``)."""

    @abstractmethod
    def apply_state(self, state: dict[str, Any] | None) -> None:
        """Load or swap the model and parameters of a desired state (may take long)."""

    @abstractmethod
    def status(self) -> AgentStatus:
        """What the agent reports: model, readiness, issues, download progress."""

    @abstractmethod
    def admit(self, request_id: int, request: dict[str, Any]) -> None:
        """Take a validated request; it starts at the next step."""

    @abstractmethod
    def cancel(self, request_id: int) -> None:
        """End a request at the next step boundary (reported as an error with
        ``CANCELLED_CODE``); unknown ids are ignored."""

    @abstractmethod
    def active_count(self) -> int:
        """Requests held: admitted and not yet ended."""

    @abstractmethod
    def step(self, sink: EventSink) -> None:
        """One decode step over every request held."""

    def describe(self, what: str) -> Any:
        """Answer a question about the engine: ``"model_metadata"`` gives
        ``{"metadata": {key: value}}`` and ``"chat_template_override"`` gives
        ``{"content": ...}``; ``None`` when there is nothing to tell."""
        return None

    def reset(self, state: dict[str, Any] | None) -> None:
        """Start again from nothing after an exception escaped the engine loop: drop
        every request without reporting it (the worker ends them), free every native
        handle, then apply ``state`` as a fresh engine would. Raising here counts as
        one more failure of the engine."""
        raise EngineError(f"{type(self).__name__} cannot restart after a fault")

    def take_held(self) -> dict[int, list[int]]:
        """Slots whose kept KV cells changed since the last call, with the prefix
        fingerprints of what each holds now (``paddler.protocol.prefixes``; empty:
        nothing). The worker reports them to the broker for prefix-aware dispatch."""
        return {}

    def take_status_change(self) -> bool:
        """``True`` once after the status changed outside ``apply_state`` (downloads)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing native
        """Free native resources; called from the engine thread when it stops, or when
        it gives up after repeated failures (``reset`` may follow)."""
