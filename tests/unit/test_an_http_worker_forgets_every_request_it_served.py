"""An HTTP worker forgets every request it served. After NDJSON and WebSocket requests
that finish, fail, are stopped, or whose client leaves mid-stream, the worker's broker
client keeps nothing for them (no frames, no waiter), every request left unfinished was
cancelled at the broker, and no task of theirs is left running: a worker that serves for
days holds what it held after its first requests (the soak benchmark watches the same
from outside, as RSS). Through ``falcon.testing`` with the real ``BrokerLink`` and
``AsyncClient``, against the scripted ZeroMQ broker of ``test_client_scenarios``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import falcon.testing
from falcon.testing.client import _AsyncContextManager

from paddler.http import inference
from paddler.http.asgi import DISCONNECTED
from paddler.http.common import HttpDeps
from paddler.http.link import BrokerLink
from paddler.protocol.codec import encode
from paddler.protocol.kinds import Kind
from tests.unit.test_client_scenarios import WAIT_S, ScriptedBroker, error, generation

ROUNDS = 15
PATH = "/api/v1/continue_from_raw_prompt"


def _answer(request_id: int, body: Any) -> list[list[bytes]]:
    """``finish``: a whole stream; ``fail``: a token, then an error; ``hang``: a token,
    then nothing until it is cancelled."""
    prompt = body.get("raw_prompt")
    if prompt == "finish":
        return generation(request_id, ["a", "b"], ["c"])
    if prompt == "fail":
        return [
            encode(Kind.TOKENS, request_id, ["a"]),
            error(request_id, 500, "EngineFault", "boom"),
        ]
    return generation(request_id, ["a"])[:2]  # Dispatched and one token: no Done


def _ws_request(request_id: str, prompt: str) -> dict[str, Any]:
    body = {"ContinueFromRawPrompt": {"raw_prompt": prompt, "max_tokens": 9}}
    return {"Request": {"id": request_id, "request": body}}


async def _until(condition: Any, what: str) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not in time: {what}")


async def _ndjson_left_mid_stream(conductor: falcon.testing.ASGIConductor) -> None:
    gone = asyncio.Event()
    request = conductor.simulate_request(
        "POST",
        PATH,
        json={"raw_prompt": "hang", "max_tokens": 9},
        extras={DISCONNECTED: gone},
        _stream_result=True,
    )
    async with _AsyncContextManager(request) as result:
        seen = b""
        while b"ContentToken" not in seen:
            seen += await asyncio.wait_for(result.stream.read(), WAIT_S)
        gone.set()  # the client closes the connection


async def _websocket_requests(conductor: falcon.testing.ASGIConductor) -> None:
    """One request finished, one stopped, one open when the socket closes."""
    async with conductor.simulate_ws("/api/v1/inference_socket") as ws:
        await ws.send_json(_ws_request("done", "finish"))
        while "Done" not in json.dumps(await ws.receive_json()):
            pass
        await ws.send_json(_ws_request("stopped", "hang"))
        await ws.receive_json()
        await ws.send_json({"Notification": {"StopRespondingTo": "stopped"}})
        await ws.send_json(_ws_request("left", "hang"))
        await ws.receive_json()


def test_after_finished_failed_stopped_and_abandoned_requests_nothing_is_kept() -> None:
    broker = ScriptedBroker()
    broker.answers[Kind.SUBMIT] = _answer
    link = BrokerLink(broker.address, timeout_s=WAIT_S)
    app = inference.create_app(HttpDeps(link))

    async def scenario() -> None:
        async with falcon.testing.ASGIConductor(app) as conductor:
            client = await link.client()
            background = asyncio.all_tasks()  # the test's, and the client's reader and watchdog
            for _ in range(ROUNDS):
                finished = await conductor.simulate_post(
                    PATH, json={"raw_prompt": "finish", "max_tokens": 9}
                )
                assert '"Done"' in finished.text
                failed = await conductor.simulate_post(
                    PATH, json={"raw_prompt": "fail", "max_tokens": 9}
                )
                assert '"code":500' in failed.text
                await _ndjson_left_mid_stream(conductor)
                await _websocket_requests(conductor)
            # three of the six requests of a round were left unfinished: each was cancelled
            await _until(
                lambda: len(broker.received(Kind.CANCEL)) >= 3 * ROUNDS,
                "a CANCEL for every request left unfinished",
            )
            await _until(lambda: asyncio.all_tasks() <= background, "every request's task ended")
            assert client._core.open_requests == 0
            assert client._waiters == {}
            assert len(broker.received(Kind.SUBMIT)) == 6 * ROUNDS
            assert len(broker.received(Kind.CANCEL)) == 3 * ROUNDS
        await link.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        broker.close()
