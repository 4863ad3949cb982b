"""Paddler's management service: agents, buffered requests, desired state, agent
details, and Prometheus metrics. Keep it on a private address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import falcon
import falcon.asgi

from paddler.client import AsyncClient
from paddler.errors import BrokerUnreachable, ConfigurationError
from paddler.http import sse
from paddler.http.agents_json import agents_body
from paddler.http.common import (
    ERROR_REPLY,
    ClosingStream,
    HttpDeps,
    dumps,
    make_app,
    read_json,
    until_disconnect,
)
from paddler.http.metrics import METRICS_CONTENT_TYPE, render_metrics
from paddler.http.metrics_history import MetricsHistory
from paddler.http.openapi import JSON, OpenApiDocument, Operation, Reply
from paddler.protocol.desired_state import DesiredState as Desired
from paddler.protocol.messages import AgentSnapshot

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


def _json(resp: falcon.asgi.Response, value: Any) -> None:
    """``value`` as the JSON body, ``null`` included (``resp.media = None`` sends nothing)."""
    resp.content_type = falcon.MEDIA_JSON
    resp.text = dumps(value)


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


AGENTS_JSON = Reply(
    'Paddler\'s agents list: {"agents": [AgentSnapshot, ...]}', JSON, {"type": "object"}
)
BUFFERED_JSON = Reply(
    'Requests waiting for a free slot: {"buffered_requests_current": n}',
    JSON,
    {"type": "object"},
)
EVENT_STREAM = Reply(
    "Server-sent events: the value at once, then on every change (keep-alive comments)",
    sse.CONTENT_TYPE,
    {"type": "string"},
)


class Agents(_Snapshot):
    value = staticmethod(_agents_value)
    OPERATIONS = {"get": Operation("Every registered agent", replies={200: AGENTS_JSON})}


class AgentsStream(_SnapshotStream):
    value = staticmethod(_agents_value)
    OPERATIONS = {"get": Operation("The agents list as it changes", replies={200: EVENT_STREAM})}


class Buffered(_Snapshot):
    value = staticmethod(_buffered_value)
    OPERATIONS = {"get": Operation("How many requests wait", replies={200: BUFFERED_JSON})}


class BufferedStream(_SnapshotStream):
    value = staticmethod(_buffered_value)
    OPERATIONS = {"get": Operation("The buffered count as it changes", replies={200: EVENT_STREAM})}


class DesiredState(_Base):
    OPERATIONS = {
        "get": Operation(
            "What every agent should run", replies={200: Reply("The desired state", JSON, Desired)}
        ),
        "put": Operation(
            "Store and apply a desired state (missing fields take their defaults)",
            Desired,
            {204: Reply("Stored and pushed to every agent")},
        ),
    }

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = await self.call(lambda c: c.desired_state())

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        state = await read_json(req, self.deps.max_body_bytes)
        if not isinstance(state, dict):
            raise ConfigurationError("body", "the desired state must be a JSON object")
        await self.call(lambda c: c.put_desired_state(state))
        resp.status = falcon.HTTP_204


class ApplicableState(_Base):
    OPERATIONS = {
        "get": Operation(
            "The desired state agents apply (null until one was put)",
            replies={200: Reply("The desired state, or null", JSON, {"type": ["object", "null"]})},
        )
    }

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _json(resp, await self.call(lambda c: c.applicable_state()))


class AgentInfo(_Base):
    """``/api/v1/agent/{agent_id}/model_metadata`` and ``.../chat_template_override``:
    the agent answers through the broker (404 unknown agent, 504 no answer)."""

    def __init__(self, deps: HttpDeps, what: str) -> None:
        super().__init__(deps)
        self.what = what
        self.OPERATIONS = {
            "get": Operation(
                f"The agent's {what.replace('_', ' ')}, asked through the balancer",
                replies={
                    200: Reply(f"The {what.replace('_', ' ')} (null: none)", JSON, {}),
                },
            )
        }

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: str
    ) -> None:
        _json(resp, await self.call(lambda c: c.agent_info(agent_id, self.what)))


class Metrics(_Base):
    OPERATIONS = {
        "get": Operation(
            "Prometheus metrics (text format 0.0.4)",
            replies={200: Reply("The exposition", METRICS_CONTENT_TYPE, {"type": "string"})},
        )
    }

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        snapshot = await self.call(lambda c: c.metrics())
        resp.content_type = METRICS_CONTENT_TYPE
        resp.text = render_metrics(snapshot)


class MetricsStream(_Base):
    """``/api/v1/metrics/stream``: the chart points of ``MetricsHistory``, the kept ones
    at once, then each new one (every ``SAMPLE_INTERVAL_S``)."""

    OPERATIONS = {
        "get": Operation(
            "Chart points of the balancer's metrics: the last 15 minutes, then live",
            replies={
                200: Reply(
                    'Server-sent events: first {"interval_s", "window_s", "points": [...]} '
                    'with every point kept, then {"points": [point]} every couple of '
                    "seconds. A point: t (Unix s), dt_s, tokens_per_s, requests_per_s "
                    "({outcome: rate}), ttft_p50_s, ttft_p99_s (null without first tokens), "
                    "buffered, slots_processing, slots_total, agents ([{name, busy, total}])",
                    sse.CONTENT_TYPE,
                    {"type": "string"},
                )
            },
        )
    }

    def __init__(self, deps: HttpDeps, history: MetricsHistory) -> None:
        super().__init__(deps)
        self.history = history

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        history = self.history
        history.ensure_running()

        async def points() -> AsyncGenerator[bytes, None]:
            position = history.appended
            yield sse.event(
                {
                    "interval_s": history.interval_s,
                    "window_s": history.window_s,
                    "points": history.since(position - len(history.points)),
                }
            )
            while True:
                await history.wait_after(position, SSE_KEEPALIVE_S)
                new = history.since(position)
                position = history.appended
                yield sse.event({"points": new}) if new else sse.KEEP_ALIVE

        chunks = points()
        sse.set_headers(resp)
        resp.stream = ClosingStream(until_disconnect(req, chunks, lambda: None), chunks)


def create_app(deps: HttpDeps) -> falcon.asgi.App[Any, Any]:
    app = make_app(deps)
    base = _Base(deps)
    history = MetricsHistory(lambda: base.call(lambda c: c.metrics()))
    deps.on_startup.append(history.start)
    deps.on_shutdown.append(history.stop)
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
    app.add_route("/api/v1/metrics/stream", MetricsStream(deps, history))
    app.add_route("/openapi.json", OpenApiDocument(app, "paddler management", ERROR_REPLY))
    return app
