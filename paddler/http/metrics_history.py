"""The last 15 minutes of the balancer's metrics, for the web admin panel's charts.

The management worker asks the broker for its metrics snapshot (the one ``/metrics``
renders) every ``SAMPLE_INTERVAL_S`` and keeps one chart point per sample: rates from
the counters' deltas (output tokens/s, requests/s by outcome), time to first token
p50/p99 from the histogram's delta, and the gauges as they are (buffered requests,
slots busy per agent). ``GET /api/v1/metrics/stream`` sends the points kept, then each
new one. No outside Prometheus needed; nothing here grows: at most ``MAX_POINTS``
points of at most ``MAX_CHART_AGENTS`` agents each.

A counter that went down (the broker restarted, an agent left and came back) counts
from zero again, as Prometheus's ``rate`` does. Output tokens/s comes from
``output_tokens_streamed`` (``paddler_output_tokens_streamed_total``), which the broker
counts as it forwards each text frame, so a long request shows in every sample it
streams through, not only in the one where it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from paddler.errors import BrokerUnreachable
from paddler.protocol.messages import AgentSnapshot

log = logging.getLogger("paddler.http")

SAMPLE_INTERVAL_S = 2.0
WINDOW_S = 15 * 60.0
MAX_POINTS = int(WINDOW_S / SAMPLE_INTERVAL_S)
MAX_CHART_AGENTS = 32
"""Agents charted one by one; the others are summed as ``OTHER_AGENTS``."""
OTHER_AGENTS = "(others)"
OUTPUT_TOKENS = "output_tokens_streamed"
"""The broker's counter of generated tokens, added to as each text frame streams."""


def grown(current: int, previous: int) -> int:
    """How much a counter grew; one that went down counts from zero again."""
    return current - previous if current >= previous else current


def counter_delta(current: Mapping[str, int], previous: Mapping[str, int]) -> dict[str, int]:
    """How much each counter grew (``grown``), those that did."""
    delta: dict[str, int] = {}
    for key, value in current.items():
        more = grown(value, previous.get(key, 0))
        if more:
            delta[key] = more
    return delta


def histogram_delta(current: dict[str, Any], previous: dict[str, Any] | None) -> list[int]:
    """The cumulative bucket counts observed since ``previous`` (all of ``current``
    when there is none, or when the histogram was reset)."""
    now = list(current["cumulative"])
    if previous is None or len(previous["cumulative"]) != len(now):
        return now
    delta = [a - b for a, b in zip(now, previous["cumulative"], strict=True)]
    return now if any(d < 0 for d in delta) else delta


def quantile(q: float, bounds: Sequence[float], cumulative: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram (upper ``bounds``, ``cumulative`` counts with
    one more for +Inf), interpolated linearly in its bucket as Prometheus's
    ``histogram_quantile`` does; ``None`` without observations. In the +Inf bucket it
    is the highest bound."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0
    for bound, count in zip(bounds, cumulative, strict=False):
        if count >= rank:
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return float(bounds[-1]) if bounds else None


def _agents(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    agents = sorted(
        (AgentSnapshot.from_body(agent) for agent in snapshot["agents"]),
        key=AgentSnapshot.sort_key,
    )
    charted = [
        {"name": agent.label, "busy": agent.slots_processing, "total": agent.slots_total}
        for agent in agents[:MAX_CHART_AGENTS]
    ]
    rest = agents[MAX_CHART_AGENTS:]
    if rest:
        charted.append(
            {
                "name": OTHER_AGENTS,
                "busy": sum(agent.slots_processing for agent in rest),
                "total": sum(agent.slots_total for agent in rest),
            }
        )
    return charted


def chart_point(
    previous: dict[str, Any], current: dict[str, Any], elapsed_s: float, at: float
) -> dict[str, Any]:
    """One chart point from two broker metrics snapshots ``elapsed_s`` apart."""
    elapsed_s = max(elapsed_s, 1e-3)
    before, now = previous["metrics"], current["metrics"]
    tokens = grown(now.get(OUTPUT_TOKENS, 0), before.get(OUTPUT_TOKENS, 0))
    requests = counter_delta(now["requests"], before["requests"])
    ttft = now["time_to_first_token_seconds"]
    observed = histogram_delta(ttft, before.get("time_to_first_token_seconds"))
    agents = _agents(current)
    return {
        "t": round(at, 3),
        "dt_s": round(elapsed_s, 3),
        "tokens_per_s": round(tokens / elapsed_s, 3),
        "requests_per_s": {
            outcome: round(count / elapsed_s, 3) for outcome, count in sorted(requests.items())
        },
        "ttft_p50_s": quantile(0.5, ttft["buckets"], observed),
        "ttft_p99_s": quantile(0.99, ttft["buckets"], observed),
        "buffered": current["buffered"],
        "slots_processing": sum(agent["busy"] for agent in agents),
        "slots_total": sum(agent["total"] for agent in agents),
        "agents": agents,
    }


Fetch = Callable[[], Awaitable[dict[str, Any]]]


class MetricsHistory:
    """Chart points of the last ``window_s``, one per ``interval_s``, sampled by a task
    of the worker that serves management (started with it, or by the first stream)."""

    def __init__(
        self,
        fetch: Fetch,
        interval_s: float | None = None,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fetch = fetch
        self.interval_s = interval_s or SAMPLE_INTERVAL_S
        self.window_s = window_s
        self.clock = clock
        self.points: deque[dict[str, Any]] = deque(maxlen=max(1, int(window_s / self.interval_s)))
        self.appended = 0
        """Points appended since the start (a stream's position)."""
        self._last: tuple[float, dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None

    def __repr__(self) -> str:
        running = self._task is not None and not self._task.done()
        return (
            f"MetricsHistory({len(self.points)} points, every {self.interval_s:g} s, "
            f"{'running' if running else 'stopped'})"
        )

    async def sample(self) -> dict[str, Any] | None:
        """Ask the broker once; the new point, or ``None`` (the first sample, or no
        answer: a gap in the charts)."""
        try:
            snapshot = await self.fetch()
        except BrokerUnreachable as exc:
            log.debug("metrics sample skipped: %s", exc)
            self._last = None
            return None
        at = self.clock()
        last, self._last = self._last, (at, snapshot)
        if last is None:
            return None
        point = chart_point(last[1], snapshot, at - last[0], at)
        self.points.append(point)
        self.appended += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return point

    def since(self, position: int) -> list[dict[str, Any]]:
        """The points appended after ``position`` that are still kept."""
        new = min(self.appended - position, len(self.points))
        return list(self.points)[len(self.points) - new :] if new > 0 else []

    async def wait_after(self, position: int, timeout_s: float) -> None:
        """Until a point is appended after ``position``, or ``timeout_s`` passed."""
        if self.appended > position:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    def ensure_running(self) -> None:
        """Start sampling in this event loop unless a task already samples in it."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._changed = None
        self._task = loop.create_task(self._run())

    async def start(self) -> None:
        self.ensure_running()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample()
            except Exception:  # a bug here must not end the charts: log it, go on
                log.exception("metrics sample failed")
            next_at += self.interval_s
            now = loop.time()
            if next_at < now:  # fell behind (a frozen broker): sample from now on
                next_at = now + self.interval_s
            await asyncio.sleep(next_at - now)
