from __future__ import annotations

from paddler.client import Dispatched, Done, Tokens
from paddler.testing.cluster import wait_until


def test_a_cancelled_request_frees_its_slot(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.start_agent("one", slots=1, step_ms=10)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    with client.continue_from_raw_prompt("long", max_tokens=100_000) as stream:
        events = iter(stream)
        assert isinstance(next(events), Dispatched)
        assert isinstance(next(events), Tokens)
        assert client.agents()[0]["slots_processing"] == 1
    # leaving the block cancelled it
    wait_until(lambda: client.agents()[0]["slots_processing"] == 0, what="slot freed")
    events = list(client.continue_from_raw_prompt("next", max_tokens=2))
    assert isinstance(events[-1], Done)


def test_leaving_the_loop_early_cancels_the_request(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.start_agent("one", slots=1, step_ms=10)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    for event in client.continue_from_raw_prompt("long", max_tokens=100_000):
        if isinstance(event, Tokens):
            break
    wait_until(lambda: client.agents()[0]["slots_processing"] == 0, what="slot freed")


def test_a_cancelled_buffered_request_leaves_the_buffer(make_cluster) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.start_agent("one", slots=1, step_ms=10)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    running = client.continue_from_raw_prompt("long", max_tokens=100_000)
    assert isinstance(next(iter(running)), Dispatched)
    waiting = client.continue_from_raw_prompt("waits", max_tokens=5)
    wait_until(lambda: client.buffered_requests() == 1, what="one buffered")
    waiting.cancel()
    wait_until(lambda: client.buffered_requests() == 0, what="buffer empty")
    running.cancel()
    wait_until(lambda: client.agents()[0]["slots_processing"] == 0, what="slot freed")
