"""Paddler's management service: agents, buffered requests, desired state, agent
details, and Prometheus metrics. Keep it on a private address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import falcon
import falcon.asgi
from falcon.asgi import SSEvent

from paddler.client import AsyncClient
from paddler.errors import BrokerUnreachable, ConfigurationError
from paddler.http.common import HttpDeps, dumps, make_app, read_json, until_disconnect

STREAM_POLL_S = 0.1
"""How often a stream asks the broker for a fresh snapshot (sent only on change)."""
SSE_KEEPALIVE_S = 3.0
"""Clients read with 5 s timeouts (paddler-client): something every 3 s keeps them."""

PADDLER_AGENT_FIELDS = (
    "id",
    "name",
    "slots_total",
    "slots_processing",
    "desired_slots_total",
    "model_path",
    "issues",
    "state_application_status",
    "uses_chat_template_override",
    "download_current",
    "download_total",
    "download_filename",
    "download_indeterminate",
)


def agent_snapshot(agent: dict[str, Any]) -> dict[str, Any]:
    """Paddler's AgentSnapshot: exactly its fields (``ready`` is ours, for ``/metrics``)."""
    return {name: agent.get(name) for name in PADDLER_AGENT_FIELDS}


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
    return {"agents": [agent_snapshot(a) for a in await client.agents()]}


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

        async def changes() -> AsyncGenerator[SSEvent, None]:
            last = dumps(first)
            yield SSEvent(data=last.encode())
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
                    yield SSEvent(data=current.encode())
                else:
                    quiet += STREAM_POLL_S
                    if quiet >= SSE_KEEPALIVE_S:
                        quiet = 0.0
                        yield SSEvent(comment="keep-alive")

        async def until_gone() -> AsyncGenerator[SSEvent, None]:
            async for event in until_disconnect(req, changes(), lambda: None):
                yield event

        resp.sse = until_gone()


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


def _label(value: Any) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(snapshot: dict[str, Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of a broker metrics snapshot."""
    agents = snapshot["agents"]
    metrics = snapshot["metrics"]
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("paddler_slots_processing", "gauge", "Slots serving a request, all agents.")
    lines.append(f"paddler_slots_processing {sum(a['slots_processing'] for a in agents)}")
    family("paddler_slots_total", "gauge", "Slots of all agents.")
    lines.append(f"paddler_slots_total {sum(a['slots_total'] for a in agents)}")
    family("paddler_requests_buffered", "gauge", "Requests waiting for a free slot.")
    lines.append(f"paddler_requests_buffered {snapshot['buffered']}")
    family("paddler_agents", "gauge", "Registered agents.")
    lines.append(f"paddler_agents {len(agents)}")
    family("paddler_agent_slots_processing", "gauge", "Slots serving a request, per agent.")
    for agent in agents:
        labels = f'agent="{_label(agent["name"] or agent["id"])}",id="{_label(agent["id"])}"'
        lines.append(f"paddler_agent_slots_processing{{{labels}}} {agent['slots_processing']}")
    family("paddler_agent_slots_total", "gauge", "Slots per agent.")
    for agent in agents:
        labels = f'agent="{_label(agent["name"] or agent["id"])}",id="{_label(agent["id"])}"'
        lines.append(f"paddler_agent_slots_total{{{labels}}} {agent['slots_total']}")
    family("paddler_agent_ready", "gauge", "1 when the agent has a model and takes requests.")
    for agent in agents:
        labels = f'agent="{_label(agent["name"] or agent["id"])}",id="{_label(agent["id"])}"'
        lines.append(f"paddler_agent_ready{{{labels}}} {1 if agent.get('ready') else 0}")
    family("paddler_requests_total", "counter", "Finished requests by outcome.")
    for outcome, count in sorted(metrics["requests"].items()):
        lines.append(f'paddler_requests_total{{outcome="{_label(outcome)}"}} {count}')
    family("paddler_agent_requests_total", "counter", "Requests an agent ended.")
    for agent, count in sorted(metrics["requests_by_agent"].items()):
        lines.append(f'paddler_agent_requests_total{{agent="{_label(agent)}"}} {count}')
    family("paddler_generated_tokens_total", "counter", "Tokens generated, per agent.")
    for agent, count in sorted(metrics["tokens_by_agent"].items()):
        lines.append(f'paddler_generated_tokens_total{{agent="{_label(agent)}"}} {count}')
    family("paddler_dropped_frames_total", "counter", "Malformed frames the broker dropped.")
    lines.append(f"paddler_dropped_frames_total {metrics.get('dropped_frames', 0)}")
    for name, key, help_text in (
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
    ):
        histogram = metrics[key]
        family(name, "histogram", help_text)
        for bound, count in zip(histogram["buckets"], histogram["cumulative"], strict=False):
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {histogram["cumulative"][-1]}')
        lines.append(f"{name}_sum {histogram['sum']}")
        lines.append(f"{name}_count {histogram['count']}")
    return "\n".join(lines) + "\n"


class Metrics(_Base):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        snapshot = await self.call(lambda c: c.metrics())
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
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
