"""Prometheus exposition of a broker metrics snapshot, through ``prometheus_client``.

A custom collector turns one snapshot (counters, histograms, agents, buffered
count) into metric families; each scrape renders them with ``generate_latest`` on
a registry of its own, so nothing is global and nothing piles up between scrapes.
Paddler's three gauges keep their names: ``paddler_slots_processing``,
``paddler_slots_total``, ``paddler_requests_buffered``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from paddler.protocol.messages import AgentSnapshot

METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""What ``generate_latest`` writes. Not ``CONTENT_TYPE_LATEST``: since prometheus_client
0.23 that names text format 1.0.0, which prometheus_client's own server only pairs
with output escaped for a scraper that asked for it (``choose_encoder``)."""

HISTOGRAMS = (
    (
        "paddler_queue_wait_seconds",
        "queue_wait_seconds",
        "Time from submission to dispatch to an agent.",
    ),
    (
        "paddler_time_to_first_token_seconds",
        "time_to_first_token_seconds",
        "Time from submission to the first token.",
    ),
    (
        "paddler_inter_token_latency_seconds",
        "inter_token_seconds",
        "Time between two token frames of a request.",
    ),
)
"""Exposed name, key in the broker's metrics snapshot, help text."""


class SnapshotCollector(Collector):
    """The Prometheus families of one broker metrics snapshot (``AsyncClient.metrics()``:
    ``agents``, ``buffered`` and the broker's ``metrics``). Built per scrape: the
    broker holds the counts, this only says them."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.agents = [AgentSnapshot.from_body(agent) for agent in snapshot["agents"]]
        self.buffered: int = snapshot["buffered"]
        self.metrics: dict[str, Any] = snapshot["metrics"]

    def collect(self) -> Iterator[Metric]:
        agents = self.agents
        metrics = self.metrics
        yield GaugeMetricFamily(
            "paddler_slots_processing",
            "Slots serving a request, all agents.",
            value=sum(agent.slots_processing for agent in agents),
        )
        yield GaugeMetricFamily(
            "paddler_slots_total",
            "Slots of all agents.",
            value=sum(agent.slots_total for agent in agents),
        )
        yield GaugeMetricFamily(
            "paddler_requests_buffered", "Requests waiting for a free slot.", value=self.buffered
        )
        yield GaugeMetricFamily("paddler_agents", "Registered agents.", value=len(agents))
        yield self._per_agent(
            "paddler_agent_slots_processing",
            "Slots serving a request, per agent.",
            lambda agent: agent.slots_processing,
        )
        yield self._per_agent(
            "paddler_agent_slots_total", "Slots per agent.", lambda agent: agent.slots_total
        )
        yield self._per_agent(
            "paddler_agent_ready",
            "1 when the agent has a model and takes requests.",
            lambda agent: 1 if agent.ready else 0,
        )
        # CounterMetricFamily names the family without ``_total`` and the samples with it
        yield _counter(
            "paddler_requests", "Finished requests by outcome.", "outcome", metrics["requests"]
        )
        yield _counter(
            "paddler_agent_requests",
            "Requests an agent ended.",
            "agent",
            metrics["requests_by_agent"],
        )
        yield _counter(
            "paddler_generated_tokens",
            "Tokens generated, per agent.",
            "agent",
            metrics["tokens_by_agent"],
        )
        yield CounterMetricFamily(
            "paddler_output_tokens_streamed",
            "Generated tokens forwarded to clients, counted as they stream (all agents).",
            value=metrics.get("output_tokens_streamed", 0),
        )
        yield CounterMetricFamily(
            "paddler_dropped_frames",
            "Malformed frames the broker dropped.",
            value=metrics.get("dropped_frames", 0),
        )
        yield CounterMetricFamily(
            "paddler_continuations",
            "Streams that continued on another agent after their agent was lost.",
            value=metrics.get("continuations", 0),
        )
        for name, key, help_text in HISTOGRAMS:
            yield _histogram(name, help_text, metrics[key])

    def _per_agent(
        self, name: str, help_text: str, value: Callable[[AgentSnapshot], float]
    ) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, help_text, labels=("agent", "id"))
        for agent in self.agents:
            family.add_metric((agent.label, agent.id), value(agent))
        return family


def _counter(name: str, help_text: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=(label,))
    for key, count in sorted(counts.items()):
        family.add_metric((key,), count)
    return family


def _histogram(name: str, help_text: str, histogram: dict[str, Any]) -> HistogramMetricFamily:
    """``histogram`` as ``paddler.broker.metrics.Histogram.snapshot`` gives it: bounds, and
    cumulative counts with one more for ``+Inf``."""
    cumulative = histogram["cumulative"]
    # bounds as ``%g`` ("1", "0.025"): the ``le`` labels paddler has always exposed
    buckets = [
        (f"{bound:g}", count)
        for bound, count in zip(histogram["buckets"], cumulative, strict=False)
    ]
    buckets.append(("+Inf", cumulative[-1]))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=histogram["sum"])


def render_metrics(snapshot: dict[str, Any]) -> str:
    """The Prometheus text exposition of a broker metrics snapshot, through a registry
    of its own (nothing process-wide: every scrape says what the broker says now)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry).decode()
