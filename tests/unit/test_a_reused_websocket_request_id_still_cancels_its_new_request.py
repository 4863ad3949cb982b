"""On the inference WebSocket, a client may reuse a request id once its request was
stopped. The stopped request's task must not forget the new request under that id
when it finishes: a later stop, or the socket closing, still cancels the new one.
Through ``falcon.testing``'s WebSocket simulation, with a fake broker client."""

from __future__ import annotations

import asyncio
from typing import Any

import falcon.testing
import pytest

from paddler.client import Dispatched
from paddler.http import inference
from paddler.http.common import HttpDeps
from tests.unit.fake_broker import HANG, FakeClient, FakeLink, FakeStream

WAIT_S = 5.0


class SlowToStop(FakeStream):
    """A stream whose cancellation takes a moment (an agent finishing its step): the
    stopped request's task ends after the client has already reused its id."""

    async def __anext__(self) -> Any:
        try:
            return await super().__anext__()
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)
            raise


class Client(FakeClient):
    async def submit(self, request: dict[str, Any]) -> FakeStream:
        self.submitted.append(request)
        stream = SlowToStop([Dispatched("agent-x", "a1", 0), HANG])
        self.streams.append(stream)
        return stream


def _request(request_id: str) -> dict[str, Any]:
    body = {"ContinueFromRawPrompt": {"raw_prompt": "x", "max_tokens": 9}}
    return {"Request": {"id": request_id, "request": body}}


async def _until(condition: Any) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("then", ["stop", "disconnect"])
def test_a_reused_id_still_cancels_its_new_request(then: str) -> None:
    fake = Client()
    app = inference.create_app(HttpDeps(link=FakeLink(fake)))  # type: ignore[arg-type]

    async def scenario() -> None:
        async with falcon.testing.ASGIConductor(app) as conductor:
            async with conductor.simulate_ws("/api/v1/inference_socket") as ws:
                await ws.send_json(_request("a"))
                await _until(lambda: len(fake.streams) == 1)
                await ws.send_json({"Notification": {"StopRespondingTo": "a"}})
                await ws.send_json(_request("a"))  # the same id, at once
                await _until(lambda: len(fake.streams) == 2)
                await asyncio.sleep(0.4)  # the first request's task has ended by now
                assert fake.streams[0].cancelled and not fake.streams[1].cancelled
                if then == "stop":
                    await ws.send_json({"Notification": {"StopRespondingTo": "a"}})
                    await _until(lambda: fake.streams[1].cancelled)
            await _until(lambda: fake.streams[1].cancelled)

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
