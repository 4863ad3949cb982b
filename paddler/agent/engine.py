"""The narrow interface between an agent's I/O side and its inference engine.

An engine is driven by one thread only (the engine worker). Each ``step`` runs
one decode step for every request it holds and reports what happened through an
``EventSink``: the text pieces each request produced in that step (one call per
request per step: that is the coalescing), its end with usage, or its error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

from paddler.protocol.messages import AgentStatus


class EventSink(Protocol):
    def tokens(self, request_id: int, pieces: list[str]) -> None: ...

    def embedding(self, request_id: int, result: dict[str, Any]) -> None: ...

    def done(self, request_id: int, usage: dict[str, int]) -> None: ...

    def error(self, request_id: int, code: int, kind: str, description: str) -> None: ...


CANCELLED_CODE = 499
"""Code of the error an engine reports for a request it ended on cancel."""


class Engine(ABC):
    """What an agent needs from an inference engine."""

    slots_total: int
    status_listener: Callable[[], None] | None = None
    """Set by the worker: call it (from the engine thread) to report the status at
    once, e.g. download progress while ``apply_state`` runs."""

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

    def take_status_change(self) -> bool:
        """``True`` once after the status changed outside ``apply_state`` (downloads)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing native
        """Free native resources; called once, from the engine thread."""
