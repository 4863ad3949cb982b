"""Paddler's management service: agents, buffered requests, desired state, agent
details, and Prometheus metrics. Keep it on a private address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import falcon
import falcon.asgi
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from paddler.broker.snapshot import AgentSnapshot
from paddler.client import AsyncClient
from paddler.errors import BrokerUnreachable, ConfigurationError
from paddler.http import sse
from paddler.http.agents_json import agents_body
from paddler.http.common import (
    ClosingStream,
    HttpDeps,
    dumps,
    make_app,
    read_json,
    until_disconnect,
)

STREAM_POLL_S = 0.1
"""How often a stream asks the broker for a fresh snapshot (sent only on change)."""
SSE_KEEPALIVE_S = 3.0
"""Clients read with 5 s timeouts (paddler-client): something every 3 s keeps them."""


class _Base:
    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def client(self) -> AsyncClient:
        return await self.deps.link.client()

    async def call(self, method: Callable[[AsyncClient], Awaitable[Any]]) -> Any:
        try:
            return await method(await self.client())
        except BrokerUnreachable:
            await self.deps.link.reset()
            raise


async def _agents_value(client: AsyncClient) -> dict[str, Any]:
    return agents_body([AgentSnapshot.from_body(agent) for agent in await client.agents()])


async def _buffered_value(client: AsyncClient) -> dict[str, Any]:
    return {"buffered_requests_current": await client.buffered_requests()}


class _Snapshot(_Base):
    """GET: one snapshot as JSON."""

    value: Callable[[AsyncClient], Awaitable[dict[str, Any]]]

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = await self.call(type(self).value)


class _SnapshotStream(_Base):
    """GET: server-sent events, a fresh snapshot on every change."""

    value: Callable[[AsyncClient], Awaitable[dict[str, Any]]]

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        value = type(self).value
        first = await self.call(value)  # fail with a status now if the broker is away

        async def changes() -> AsyncGenerator[bytes, None]:
            last = dumps(first)
            yield sse.event(last)
            quiet = 0.0
            while True:
                await asyncio.sleep(STREAM_POLL_S)
                try:
                    current = dumps(await self.call(value))
                except BrokerUnreachable:
                    continue
                if current != last:
                    last = current
                    quiet = 0.0
                    yield sse.event(current)
                else:
                    quiet += STREAM_POLL_S
                    if quiet >= SSE_KEEPALIVE_S:
                        quiet = 0.0
                        yield sse.KEEP_ALIVE

        chunks = changes()
        sse.set_headers(resp)
        resp.stream = ClosingStream(until_disconnect(req, chunks, lambda: None), chunks)


class Agents(_Snapshot):
    value = staticmethod(_agents_value)


class AgentsStream(_SnapshotStream):
    value = staticmethod(_agents_value)


class Buffered(_Snapshot):
    value = staticmethod(_buffered_value)


class BufferedStream(_SnapshotStream):
    value = staticmethod(_buffered_value)


class DesiredState(_Base):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = await self.call(lambda c: c.desired_state())

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        state = await read_json(req, self.deps.max_body_bytes)
        if not isinstance(state, dict):
            raise ConfigurationError("body", "the desired state must be a JSON object")
        await self.call(lambda c: c.put_desired_state(state))
        resp.status = falcon.HTTP_204


class ApplicableState(_Base):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = await self.call(lambda c: c.applicable_state())


class AgentInfo(_Base):
    """``/api/v1/agent/{agent_id}/model_metadata`` and ``.../chat_template_override``:
    the agent answers through the broker (404 unknown agent, 504 no answer)."""

    def __init__(self, deps: HttpDeps, what: str) -> None:
        super().__init__(deps)
        self.what = what

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: str
    ) -> None:
        resp.media = await self.call(lambda c: c.agent_info(agent_id, self.what))


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
            "paddler_dropped_frames",
            "Malformed frames the broker dropped.",
            value=metrics.get("dropped_frames", 0),
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


class Metrics(_Base):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        snapshot = await self.call(lambda c: c.metrics())
        resp.content_type = METRICS_CONTENT_TYPE
        resp.text = render_metrics(snapshot)


def create_app(deps: HttpDeps) -> falcon.asgi.App[Any, Any]:
    app = make_app(deps)
    app.add_route("/api/v1/agents", Agents(deps))
    app.add_route("/api/v1/agents/stream", AgentsStream(deps))
    app.add_route("/api/v1/buffered_requests", Buffered(deps))
    app.add_route("/api/v1/buffered_requests/stream", BufferedStream(deps))
    app.add_route("/api/v1/balancer_desired_state", DesiredState(deps))
    app.add_route("/api/v1/balancer_applicable_state", ApplicableState(deps))
    app.add_route("/api/v1/agent/{agent_id}/model_metadata", AgentInfo(deps, "model_metadata"))
    app.add_route(
        "/api/v1/agent/{agent_id}/chat_template_override",
        AgentInfo(deps, "chat_template_override"),
    )
    app.add_route("/metrics", Metrics(deps))
    return app
