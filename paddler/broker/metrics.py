"""What the broker counts for ``/metrics``: it sees every request and every frame.

Histograms use fixed buckets (seconds) and cumulative counts, as Prometheus expects.
Per-token work is one ``bisect`` and two additions; a text frame adds its tokens to
``output_tokens`` (one addition per frame). Label sets are bounded: request
outcomes take the documented values (``REQUEST_OUTCOMES``) or ``other``, and per-agent
series exist only while their agent does. ``LogBudget`` bounds what the broker writes
about what it counts (dropped frames, handler bugs): a few lines per source and minute.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any

from paddler.protocol.kinds import Kind

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Histogram:
    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.total += value

    def snapshot(self) -> dict[str, Any]:
        cumulative = []
        running = 0
        for count in self.counts:
            running += count
            cumulative.append(running)
        return {
            "buckets": list(self.buckets),
            "cumulative": cumulative,
            "count": self.count,
            "sum": self.total,
        }


REQUEST_OUTCOMES = frozenset(
    {
        # the request's own end
        "done",
        "counted",  # a count_only request: its prompt counted, nothing generated
        "cancelled",  # by its client, or its client went away
        # the broker's errors
        "InvalidRequest",
        "ProtocolError",
        "DuplicateRequestId",
        "BufferOverflow",
        "BufferedRequestTimeout",
        "InferenceItemTimeout",
        "AgentLost",
        "ShuttingDown",
        "InternalError",
        # the agents' errors (``paddler.agent.engine`` lists the engine's; ``sink.error``
        # and ``GrammarError`` calls in paddler/agent name the rest)
        "Cancelled",
        "AgentUnavailable",
        "AgentEngineRestarted",
        "EngineFault",
        "ChatTemplateError",
        "PromptTooLong",
        "GrammarSyntaxError",
        "GrammarInitializationFailed",
        "GrammarRejectedModelOutput",
        "EmbeddingsDisabled",
        "EmbeddingsUnavailable",
        "DecodeFailed",
        "KvCacheExhausted",
        "SamplerError",
        "DetokenizationFailed",
        "InvalidContinuation",
    }
)
"""Every value the ``outcome`` label of ``paddler_requests_total`` takes besides
``other``: the kinds of error paddler itself ends a request with. A kind an agent
makes up counts as ``other``, so no peer can grow the label set."""

OTHER_OUTCOME = "other"


def outcome_label(kind: object) -> str:
    """``kind`` if it is a documented outcome, else ``other``."""
    return kind if isinstance(kind, str) and kind in REQUEST_OUTCOMES else OTHER_OUTCOME


class BrokerMetrics:
    def __init__(self) -> None:
        self.queue_wait = Histogram()
        self.time_to_first_token = Histogram()
        self.inter_token = Histogram()
        self.requests: Counter[str] = Counter()
        """Submitted requests by outcome (one each): ``REQUEST_OUTCOMES`` or ``other``."""
        self.tokens_by_agent: Counter[str] = Counter()
        self.requests_by_agent: Counter[str] = Counter()
        """Per agent label, only while an agent with that label is registered."""
        self.dropped_frames = 0
        """Malformed or unexpected frames dropped (every one, logged or not)."""
        self.continuations = 0
        """Streams that moved to another agent after losing theirs."""
        self.prefix_matches = 0
        """Dispatches (``prefix`` policy) to an agent holding part of the prompt."""
        self.output_tokens = 0
        """Generated tokens forwarded to clients, counted as they stream (each text,
        reasoning or tool-call frame's token ids), not when their request ends."""

    def count_outcome(self, kind: object) -> None:
        """One submitted request ended: ``done``, ``cancelled`` or an error kind."""
        self.requests[outcome_label(kind)] += 1

    def count_agent_end(self, agent: str, kind: int, value: Any) -> None:
        """Count a request ``agent`` ended with a DONE or ERROR frame whose body is
        ``value`` (``None`` if it could not be decoded)."""
        self.requests_by_agent[agent] += 1
        if kind == Kind.DONE and isinstance(value, dict):
            usage = value.get("usage")
            if isinstance(usage, dict):
                tokens = usage.get("content_tokens", 0)
                if isinstance(tokens, int) and not isinstance(tokens, bool):
                    self.tokens_by_agent[agent] += tokens

    def forget_agent(self, agent: str) -> None:
        """The last agent labelled ``agent`` left: its series go with it."""
        self.requests_by_agent.pop(agent, None)
        self.tokens_by_agent.pop(agent, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "queue_wait_seconds": self.queue_wait.snapshot(),
            "time_to_first_token_seconds": self.time_to_first_token.snapshot(),
            "inter_token_seconds": self.inter_token.snapshot(),
            "requests": dict(self.requests),
            "tokens_by_agent": dict(self.tokens_by_agent),
            "requests_by_agent": dict(self.requests_by_agent),
            "dropped_frames": self.dropped_frames,
            "continuations": self.continuations,
            "prefix_matches": self.prefix_matches,
            "output_tokens_streamed": self.output_tokens,
        }


OTHER_SOURCES = "other peers"
"""The entry sources share once ``LogBudget``'s table is full."""


class _Window:
    __slots__ = ("held_back", "logged", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.held_back = 0


class LogBudget:
    """How many lines one source (a peer, a handler) may write per window.

    The first ``lines_per_window`` lines of a source in a window are logged; the rest
    are only counted, and ``ended`` gives the count when the window is over, for one
    summary line. At most ``max_sources`` sources have a window of their own; past
    that they share one (``OTHER_SOURCES``), so a flood of peers that each reconnect
    with a new identity cannot grow the table. Times come in as arguments.
    """

    def __init__(
        self, lines_per_window: int = 5, window_s: float = 60.0, max_sources: int = 256
    ) -> None:
        self.lines_per_window = lines_per_window
        self.window_s = window_s
        self.max_sources = max_sources
        self._windows: dict[str, _Window] = {}

    def allow(self, source: str, now: float) -> bool:
        """Whether this line of ``source`` may be written (else it is counted)."""
        window = self._windows.get(source)
        if window is None:
            if len(self._windows) >= self.max_sources:
                source = OTHER_SOURCES
                window = self._windows.get(source)
            if window is None:
                window = self._windows[source] = _Window(now)
        if window.logged < self.lines_per_window:
            window.logged += 1
            return True
        window.held_back += 1
        return False

    def ended(self, now: float) -> list[tuple[str, int]]:
        """Sources whose window is over and how many lines each held back (only those
        that held some back); their windows are dropped, the next line opens a new one."""
        over = [s for s, w in self._windows.items() if now - w.start >= self.window_s]
        held_back = [(source, self._windows.pop(source).held_back) for source in over]
        return [(source, count) for source, count in held_back if count]

    def __len__(self) -> int:
        return len(self._windows)
