"""``BrokerLink.reset`` drops only the client that failed, and the streams still open
on a dropped client end at once with ``BrokerUnreachable`` (a 503 in the HTTP
answers), never hanging and never as a "cancelled" 499. Against the scripted broker
of the client scenarios: a real ZeroMQ ROUTER on a free loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import falcon.testing
import pytest

from paddler.client import AsyncClient, Dispatched, Done, Tokens
from paddler.errors import BrokerUnreachable
from paddler.http import inference
from paddler.http.common import HttpDeps
from paddler.http.link import BrokerLink
from paddler.protocol.codec import encode
from paddler.protocol.kinds import Kind
from paddler.testing.cluster import wait_until
from tests.unit.test_client_scenarios import WAIT_S, ScriptedBroker, usage_body

PROMPT_S = 1.0
"""How long a stream of a dropped client may take to end: at once, with margin."""


@pytest.fixture
def broker() -> Iterator[ScriptedBroker]:
    scripted = ScriptedBroker()
    try:
        yield scripted
    finally:
        scripted.close()


def dispatched_only(request_id: int, body: Any) -> list[list[bytes]]:
    """The request reaches an agent and stays live: its tokens come when the test says."""
    return [
        encode(Kind.DISPATCHED, request_id, {"agent_id": "a", "agent_name": "a1", "queued_ms": 0})
    ]


def run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario, WAIT_S * 3))


async def _fail(client: AsyncClient, broker: ScriptedBroker) -> None:
    """A request on ``client`` sees the broker fall silent: ``BrokerUnreachable``."""
    broker.silent.set()
    try:
        stream = await client.submit({"raw_prompt": "lost"})
        with pytest.raises(BrokerUnreachable):
            await stream.__anext__()
    finally:
        broker.silent.clear()


@pytest.mark.parametrize("form", ["reset(failed_client)", "reset()"])
def test_a_late_reset_of_a_failed_client_leaves_its_replacement_and_its_streams(
    broker: ScriptedBroker, form: str
) -> None:
    broker.answers[Kind.SUBMIT] = dispatched_only

    async def scenario() -> None:
        link = BrokerLink(broker.address, timeout_s=1.0)

        async def reset(client: AsyncClient) -> None:
            await (link.reset(client) if form == "reset(failed_client)" else link.reset())

        try:
            failed = await link.client()
            await _fail(failed, broker)  # requests A and B both saw it
            await reset(failed)  # B drops it first ...
            fresh = await link.client()  # ... and the next request opens a new client
            assert fresh is not failed
            stream = await fresh.submit({"raw_prompt": "live"})
            assert isinstance(await stream.__anext__(), Dispatched)
            reader = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.05)
            # ... then A, late, resets what it saw fail
            await reset(failed)
            assert await link.client() is fresh
            (request_id, _), *_ = reversed(broker.received(Kind.SUBMIT))
            broker.send(
                encode(Kind.TOKENS, request_id, ["still", " here"]),
                encode(Kind.DONE, request_id, usage_body(2)),
            )
            assert await asyncio.wait_for(reader, WAIT_S) == Tokens(["still", " here"])
            assert isinstance(await asyncio.wait_for(stream.__anext__(), WAIT_S), Done)
        finally:
            await link.close()

    run(scenario())


def test_the_live_streams_of_a_dropped_client_end_at_once_with_broker_unreachable(
    broker: ScriptedBroker,
) -> None:
    broker.answers[Kind.SUBMIT] = dispatched_only

    async def scenario() -> None:
        link = BrokerLink(broker.address, timeout_s=30.0)  # no watchdog in the way
        try:
            client = await link.client()
            streams = [await client.submit({"raw_prompt": str(i)}) for i in range(3)]
            for stream in streams:
                assert isinstance(await stream.__anext__(), Dispatched)
            readers = [asyncio.ensure_future(stream.__anext__()) for stream in streams[:2]]
            await asyncio.sleep(0.05)
            assert not any(reader.done() for reader in readers)
            await link.reset(client)  # one request saw it fail
            started = asyncio.get_running_loop().time()
            results = await asyncio.wait_for(
                asyncio.gather(*readers, return_exceptions=True), PROMPT_S
            )
            assert [type(result) for result in results] == [BrokerUnreachable] * 2
            assert "dropped" in str(results[0])
            # a stream nobody was reading at that moment ends the same way when read
            with pytest.raises(BrokerUnreachable):
                await asyncio.wait_for(streams[2].__anext__(), PROMPT_S)
            assert asyncio.get_running_loop().time() - started < PROMPT_S
        finally:
            await link.close()

    run(scenario())
    # the broker frees their slots (its socket thread reads the CANCELs as they come)
    wait_until(lambda: len(broker.received(Kind.CANCEL)) == 3, timeout_s=WAIT_S, what="3 CANCELs")


def test_a_websocket_stream_on_a_dropped_client_ends_with_a_503_error(
    broker: ScriptedBroker,
) -> None:
    broker.answers[Kind.SUBMIT] = dispatched_only

    async def scenario() -> None:
        link = BrokerLink(broker.address, timeout_s=30.0)
        app = inference.create_app(HttpDeps(link=link))
        try:
            async with (
                falcon.testing.ASGIConductor(app) as conductor,
                conductor.simulate_ws("/api/v1/inference_socket") as ws,
            ):
                request = {"ContinueFromRawPrompt": {"raw_prompt": "x", "max_tokens": 9}}
                await ws.send_json({"Request": {"id": "r1", "request": request}})
                (request_id, _), *_ = await _until(lambda: broker.received(Kind.SUBMIT))
                broker.send(encode(Kind.TOKENS, request_id, ["a"]))
                token = await asyncio.wait_for(ws.receive_json(), WAIT_S)
                assert token["Response"]["response"] == {"GeneratedToken": {"ContentToken": "a"}}
                await link.reset(await link.client())  # another request saw it fail
                answer = await asyncio.wait_for(ws.receive_json(), PROMPT_S)
                assert answer["Error"]["request_id"] == "r1"
                assert answer["Error"]["error"]["code"] == 503
        finally:
            await link.close()

    run(scenario())


async def _until(condition: Any) -> Any:
    for _ in range(int(WAIT_S / 0.01)):
        if value := condition():
            return value
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")
