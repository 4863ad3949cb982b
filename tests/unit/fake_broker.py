"""A scripted stand-in for the broker's ``AsyncClient`` and the worker's link, for
tests of the HTTP apps through ``falcon.testing`` (no sockets, no server)."""

from __future__ import annotations

import asyncio
from typing import Any

from paddler.errors import BrokerUnreachable, ConfigurationError, RequestFailed

HANG = object()
"""In a script: the stream stops here and never ends (until cancelled)."""

AGENT = {
    "id": "agent-x", "name": "a1", "slots_total": 4, "slots_processing": 1,
    "desired_slots_total": 4, "model_path": "/m.gguf", "issues": [],
    "state_application_status": "Applied", "uses_chat_template_override": False,
    "download_current": 0, "download_total": 0, "download_filename": None,
    "download_indeterminate": True, "ready": True,
}  # fmt: skip


class FakeStream:
    def __init__(self, events: list[Any], on_hang: asyncio.Event | None = None) -> None:
        self.events = list(events)
        self.on_hang = on_hang
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if not self.events:
            raise StopAsyncIteration
        event = self.events.pop(0)
        if event is HANG:
            if self.on_hang is not None:
                self.on_hang.set()
            await asyncio.Future()  # until cancelled
        return event

    def cancel(self) -> None:
        self.cancelled = True


class SilentStream(FakeStream):
    """Its events, then a broker that stops answering (``BrokerUnreachable``)."""

    async def __anext__(self) -> Any:
        if self.events:
            return self.events.pop(0)
        raise BrokerUnreachable("silent")


class FakeClient:
    """Scripted like the broker: ``submit`` returns the next script's events."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.script: list[list[Any]] = []
        self.streams: list[FakeStream] = []
        self.state: dict[str, Any] = dict(state or {"model": "None"})
        self.agent_list = [dict(AGENT)]
        self.put: list[dict[str, Any]] = []
        self.unreachable = False
        self.on_hang: asyncio.Event | None = None
        self.responses: dict[str, bytes] = {}
        """Stored responses (OpenAI's Responses API), as the broker keeps them."""
        self.max_response_bytes = 1 << 20

    def _check(self) -> None:
        if self.unreachable:
            raise BrokerUnreachable("fake broker is down")

    async def submit(self, request: dict[str, Any]) -> FakeStream:
        self._check()
        self.submitted.append(request)
        stream = FakeStream(self.script.pop(0) if self.script else [], self.on_hang)
        self.streams.append(stream)
        return stream

    async def generate_embedding_batch(self, documents: list[Any], method: Any) -> FakeStream:
        return await self.submit({"input_batch": documents, "normalization_method": method})

    async def agents(self) -> list[dict[str, Any]]:
        self._check()
        return self.agent_list

    async def buffered_requests(self) -> int:
        return 2

    async def desired_state(self) -> dict[str, Any]:
        self._check()
        return self.state

    async def applicable_state(self) -> dict[str, Any] | None:
        return None

    async def put_desired_state(self, state: dict[str, Any]) -> None:
        if "bad" in state:
            raise ConfigurationError("bad", "unknown field")
        self.put.append(state)

    async def agent_info(self, agent_id: str, what: str) -> Any:
        if agent_id != "agent-x":
            raise RequestFailed(404, "UnknownAgent", f"no agent {agent_id!r}")
        if what == "model_metadata":
            return {"metadata": {"general.name": "m"}}
        return None

    async def metrics(self) -> dict[str, Any]:
        histogram = {"buckets": [0.1, 1.0], "cumulative": [1, 2, 2], "count": 2, "sum": 0.6}
        return {
            "agents": [AGENT], "buffered": 2,
            "metrics": {"queue_wait_seconds": histogram, "time_to_first_token_seconds": histogram,
                        "inter_token_seconds": histogram, "requests": {"done": 2},
                        "tokens_by_agent": {"a1": 10}, "requests_by_agent": {"a1": 2}},
        }  # fmt: skip

    async def put_response(
        self, response_id: str, body: bytes, expected: bytes | None = None
    ) -> None:
        self._check()
        if expected is not None:
            if response_id not in self.responses:
                raise RequestFailed(404, "UnknownResponse", f"no stored response {response_id!r}")
            if self.responses[response_id] != expected:
                raise RequestFailed(409, "StoredChanged", "changed since it was read")
        if len(body) > self.max_response_bytes:
            raise RequestFailed(413, "ResponseTooLarge", "too large")
        self.responses[response_id] = body

    async def get_response(self, response_id: str) -> bytes:
        self._check()
        if response_id not in self.responses:
            raise RequestFailed(404, "UnknownResponse", f"no stored response {response_id!r}")
        return self.responses[response_id]

    async def delete_response(self, response_id: str) -> None:
        self._check()
        if self.responses.pop(response_id, None) is None:
            raise RequestFailed(404, "UnknownResponse", f"no stored response {response_id!r}")


class FakeLink:
    def __init__(self, client: FakeClient) -> None:
        self._client = client
        self.resets = 0

    async def client(self) -> FakeClient:
        return self._client

    async def reset(self) -> None:
        self.resets += 1
