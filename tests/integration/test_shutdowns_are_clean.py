from __future__ import annotations

import signal
import time

from paddler.client import Client, Dispatched, Done, Failed, Tokens
from paddler.testing.cluster import wait_until


def test_an_agent_on_sigterm_finishes_its_work_then_deregisters(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    agent = cluster.start_agent("leaving", slots=1, step_ms=20)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    stream = client.continue_from_raw_prompt("finish me", max_tokens=30)
    events = iter(stream)
    assert isinstance(next(events), Dispatched)
    assert isinstance(next(events), Tokens)
    agent.signal(signal.SIGTERM)
    rest = list(events)
    assert isinstance(rest[-1], Done) and rest[-1].usage.content_tokens == 30
    assert agent.wait(10) == 0
    wait_until(lambda: client.agents() == [], timeout_s=2.0, what="agent deregistered")


def test_an_agent_on_sigterm_cancels_what_does_not_finish_in_time(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    agent = cluster.start_agent("leaving", slots=1, step_ms=20, shutdown_timeout=300)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    stream = client.continue_from_raw_prompt("endless", max_tokens=100_000)
    events = iter(stream)
    assert isinstance(next(events), Dispatched)
    agent.signal(signal.SIGTERM)
    rest = list(events)
    assert isinstance(rest[-1], Failed) and rest[-1].kind == "Cancelled"
    assert agent.wait(10) == 0


def test_the_balancer_on_sigterm_ends_live_streams_with_503_and_exits(make_cluster) -> None:
    cluster = make_cluster()
    balancer = cluster.start_balancer()
    cluster.start_agent("a", slots=1, step_ms=20)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    live = client.continue_from_raw_prompt("live", max_tokens=100_000)
    events = iter(live)
    assert isinstance(next(events), Dispatched)
    buffered = client.continue_from_raw_prompt("buffered", max_tokens=5)
    wait_until(lambda: client.buffered_requests() == 1, what="one buffered")

    balancer.signal(signal.SIGTERM)
    started = time.monotonic()
    for stream in (live, buffered):
        last = list(stream)[-1]
        assert isinstance(last, Failed)
        assert (last.code, last.description) == (503, "balancer is shutting down")
    assert balancer.wait(5) == 0
    assert time.monotonic() - started < 5


def test_a_client_of_an_unreachable_broker_raises_a_timeout(tmp_path) -> None:
    import asyncio

    import pytest

    from paddler.client import AsyncClient
    from paddler.errors import BrokerUnreachable
    from paddler.testing.cluster import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="did not answer"):
        Client(address, timeout_s=0.5)
    assert time.monotonic() - started < 3

    async def connect() -> None:
        await AsyncClient.connect(address, timeout_s=0.5)

    with pytest.raises(BrokerUnreachable):
        asyncio.run(connect())
