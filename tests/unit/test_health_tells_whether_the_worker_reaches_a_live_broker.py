"""``GET /health`` answers 200 ``OK`` only while the worker reaches a live broker, and
503 with the reason when the broker is silent, from a cached check: at most one ping
per second while ``/health`` is asked, none while the broker was just heard. Against
the scripted broker of the client scenarios (a real ZeroMQ ROUTER on loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import falcon.testing
import pytest

from paddler.http import inference, management, openai
from paddler.http.common import HttpDeps
from paddler.http.link import LIVE_WINDOW_S, PROBE_INTERVAL_S, PROBE_TIMEOUT_S, BrokerLink
from paddler.protocol.kinds import Kind
from tests.unit.test_client_scenarios import ScriptedBroker

DOWN_WITHIN_S = LIVE_WINDOW_S + PROBE_TIMEOUT_S + 1.0
"""How soon a silent broker must show in ``/health``."""


@pytest.fixture
def broker() -> Iterator[ScriptedBroker]:
    scripted = ScriptedBroker()
    try:
        yield scripted
    finally:
        scripted.close()


async def _health(conductor: falcon.testing.ASGIConductor) -> falcon.testing.Result:
    return await conductor.simulate_get("/health")


async def _until_status(conductor: Any, status: int, within_s: float) -> falcon.testing.Result:
    deadline = time.monotonic() + within_s
    while True:
        result = await asyncio.wait_for(_health(conductor), PROBE_TIMEOUT_S + 2)
        if result.status_code == status or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("service", [inference, management, openai])
def test_health_is_ok_at_once_on_a_fresh_worker_then_503_while_the_broker_is_silent(
    broker: ScriptedBroker, service: Any
) -> None:
    async def scenario() -> None:
        link = BrokerLink(broker.address, timeout_s=5.0)
        app = service.create_app(HttpDeps(link=link))
        try:
            async with falcon.testing.ASGIConductor(app) as conductor:
                # a worker that never spoke to the broker asks it, and says OK
                first = await asyncio.wait_for(_health(conductor), 1.0)
                assert (first.status_code, first.text) == (200, "OK")
                broker.silent.set()  # frozen: it receives, it answers nothing
                down = await _until_status(conductor, 503, DOWN_WITHIN_S)
                assert down.status_code == 503, down.text
                assert down.headers["Retry-After"] == "1"
                assert "not answering" in down.text and broker.address in down.text
                broker.silent.clear()
                up = await _until_status(conductor, 200, PROBE_INTERVAL_S + PROBE_TIMEOUT_S + 2)
                assert (up.status_code, up.text) == (200, "OK")
        finally:
            await link.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_worker_whose_first_check_went_unanswered_is_ok_once_the_broker_answers(
    broker: ScriptedBroker,
) -> None:
    """A broker slow to answer a fresh worker (a loaded machine) makes its first check
    fail: 503, but no longer than the next check takes once the broker answers."""

    async def scenario() -> None:
        broker.silent.set()
        link = BrokerLink(broker.address, timeout_s=5.0)
        app = inference.create_app(HttpDeps(link=link))
        try:
            async with falcon.testing.ASGIConductor(app) as conductor:
                first = await asyncio.wait_for(_health(conductor), PROBE_TIMEOUT_S + 2)
                assert first.status_code == 503, first.text
                assert "no answer" in first.text and broker.address in first.text
                broker.silent.clear()
                up = await _until_status(conductor, 200, PROBE_INTERVAL_S + 1)
                assert (up.status_code, up.text) == (200, "OK")
        finally:
            await link.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_health_that_is_asked_often_pings_at_most_once_a_second(broker: ScriptedBroker) -> None:
    async def scenario() -> None:
        link = BrokerLink(broker.address)
        app = inference.create_app(HttpDeps(link=link))
        try:
            async with falcon.testing.ASGIConductor(app) as conductor:
                started = time.monotonic()
                answers = 0
                while time.monotonic() - started < 2.5:
                    assert (await _health(conductor)).status_code == 200
                    answers += 1
                    await asyncio.sleep(0.01)
                assert answers > 50
        finally:
            await link.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    # the first check connects (its own ping) and pings; then at most one a second
    assert len(broker.received(Kind.PING)) <= 2 + 3


def test_health_without_a_broker_at_all_is_503_with_the_reason() -> None:
    async def scenario() -> None:
        nobody = ScriptedBroker()
        address = nobody.address
        nobody.close()  # the port is free again: nothing answers there
        link = BrokerLink(address)
        app = inference.create_app(HttpDeps(link=link))
        try:
            async with falcon.testing.ASGIConductor(app) as conductor:
                started = time.monotonic()
                result = await _health(conductor)
                assert time.monotonic() - started < PROBE_TIMEOUT_S + 1
                assert result.status_code == 503
                assert result.json["field"] is None
                assert result.json["error"].startswith("the balancer is not answering: ")
                # the next answer comes from the cache, at once
                started = time.monotonic()
                assert (await _health(conductor)).status_code == 503
                assert time.monotonic() - started < 0.5
        finally:
            await link.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
