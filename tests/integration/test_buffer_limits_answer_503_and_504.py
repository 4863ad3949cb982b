from __future__ import annotations

import time

from paddler.client import Dispatched, Failed
from paddler.testing.cluster import wait_until


def test_a_full_buffer_answers_503_at_once(make_cluster) -> None:
    cluster = make_cluster(max_buffered_requests=2)
    cluster.start_balancer()
    cluster.start_agent("slow", slots=1, step_ms=50)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    running = client.continue_from_raw_prompt("busy", max_tokens=1000)
    assert isinstance(next(iter(running)), Dispatched)
    waiting = [client.continue_from_raw_prompt(f"w{i}", max_tokens=5) for i in range(2)]
    wait_until(lambda: client.buffered_requests() == 2, what="2 buffered")

    started = time.monotonic()
    overflow = list(client.continue_from_raw_prompt("one too many", max_tokens=5))
    assert time.monotonic() - started < 1.0
    assert overflow == [Failed(503, "BufferOverflow", "Buffered requests overflow")]
    assert client.buffered_requests() == 2
    running.cancel()
    for stream in waiting:
        assert stream.text() == "t0 t1 t2 t3 t4 "


def test_a_request_that_waits_too_long_gets_504(make_cluster) -> None:
    cluster = make_cluster(buffered_request_timeout=300)
    cluster.start_balancer()
    cluster.start_agent("slow", slots=1, step_ms=50)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    running = client.continue_from_raw_prompt("busy", max_tokens=1000)
    assert isinstance(next(iter(running)), Dispatched)
    started = time.monotonic()
    events = list(client.continue_from_raw_prompt("waits", max_tokens=5))
    waited = time.monotonic() - started
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert events[0].code == 504 and events[0].kind == "BufferedRequestTimeout"
    assert 0.25 <= waited < 3.0
    assert client.buffered_requests() == 0


def test_an_agent_that_stops_sending_tokens_gives_504(make_cluster) -> None:
    cluster = make_cluster(inference_item_timeout=400)
    cluster.start_balancer()
    cluster.start_agent("stalled", slots=1, step_ms=5, first_token_delay_ms=60_000)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    events = list(client.continue_from_raw_prompt("stall", max_tokens=5))
    assert isinstance(events[0], Dispatched)
    assert isinstance(events[-1], Failed)
    assert (events[-1].code, events[-1].kind) == (504, "InferenceItemTimeout")
    # the agent confirmed the cancel: its slot is free again
    wait_until(lambda: client.agents()[0]["slots_processing"] == 0, what="slot freed")
