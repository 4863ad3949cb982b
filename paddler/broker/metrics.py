"""What the broker counts for ``/metrics``: it sees every request and every frame.

Histograms use fixed buckets (seconds) and cumulative counts, as Prometheus expects.
Per-token work is one ``bisect`` and two additions.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any

from paddler.errors import ProtocolError
from paddler.protocol.codec import unpack_body
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


class BrokerMetrics:
    def __init__(self) -> None:
        self.queue_wait = Histogram()
        self.time_to_first_token = Histogram()
        self.inter_token = Histogram()
        self.requests: Counter[str] = Counter()
        """Finished requests by outcome: ``done`` or the error kind."""
        self.tokens_by_agent: Counter[str] = Counter()
        self.requests_by_agent: Counter[str] = Counter()
        self.dropped_frames = 0
        """Malformed or unexpected frames logged and dropped."""

    def count_end(self, agent: str, kind: int, body: bytes) -> None:
        """Count a request ``agent`` ended with a DONE or ERROR frame (bodies of ends
        are small: decoding them costs little)."""
        self.requests_by_agent[agent] += 1
        try:
            value = unpack_body(body)
        except ProtocolError:
            return
        if not isinstance(value, dict):
            return
        if kind == Kind.DONE:
            self.requests["done"] += 1
            usage = value.get("usage")
            if isinstance(usage, dict):
                tokens = usage.get("content_tokens", 0)
                if isinstance(tokens, int):
                    self.tokens_by_agent[agent] += tokens
        else:
            error_kind = value.get("kind")
            self.requests[error_kind if isinstance(error_kind, str) else "Error"] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "queue_wait_seconds": self.queue_wait.snapshot(),
            "time_to_first_token_seconds": self.time_to_first_token.snapshot(),
            "inter_token_seconds": self.inter_token.snapshot(),
            "requests": dict(self.requests),
            "tokens_by_agent": dict(self.tokens_by_agent),
            "requests_by_agent": dict(self.requests_by_agent),
            "dropped_frames": self.dropped_frames,
        }
