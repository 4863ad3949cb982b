from __future__ import annotations

import signal
import time

from paddler.client import Dispatched, Done, Failed, Tokens
from paddler.testing.cluster import wait_until


def test_with_continuations_off_an_agent_killed_mid_stream_gives_502(make_cluster) -> None:
    cluster = make_cluster(buffered_request_timeout=30_000, max_continuations=0)
    cluster.start_balancer()
    doomed = cluster.start_agent("doomed", slots=2, step_ms=20)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    streamed = client.continue_from_raw_prompt("streams", max_tokens=100_000)
    events = iter(streamed)
    assert isinstance(next(events), Dispatched)
    assert isinstance(next(events), Tokens)

    # A second agent process that takes long to give a first token holds the
    # next request unstarted; we stop it the same way.
    doomed.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    rest = list(events)
    assert isinstance(rest[-1], Failed)
    assert (rest[-1].code, rest[-1].kind) == (502, "AgentLost")
    assert time.monotonic() - killed_at < 5.0  # 3 heartbeat intervals and a tick
    wait_until(lambda: client.agents() == [], what="dead agent removed")


def test_unstarted_requests_of_a_killed_agent_are_served_by_another(make_cluster) -> None:
    cluster = make_cluster(buffered_request_timeout=30_000)
    cluster.start_balancer()
    doomed = cluster.start_agent("doomed", slots=2, step_ms=5, first_token_delay_ms=60_000)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)

    unstarted = [client.continue_from_raw_prompt(f"u{i}", max_tokens=3) for i in range(2)]
    for stream in unstarted:
        event = next(iter(stream))
        assert isinstance(event, Dispatched) and event.agent_name == "doomed"
    wait_until(lambda: client.agents()[0]["slots_processing"] == 2, what="both slots busy")

    doomed.signal(signal.SIGKILL)
    wait_until(lambda: client.agents() == [], what="dead agent removed")
    assert client.buffered_requests() == 2  # back in the buffer, not failed
    cluster.start_agent("rescuer", slots=1, step_ms=5)

    for stream in unstarted:
        events = list(stream)
        assert isinstance(events[0], Dispatched) and events[0].agent_name == "rescuer"
        assert isinstance(events[-1], Done)
        assert "".join(p for e in events if isinstance(e, Tokens) for p in e.pieces) == (
            "t0 t1 t2 "
        )
    agents = client.agents()
    assert [(a["name"], a["slots_processing"], a["slots_total"]) for a in agents] == [
        ("rescuer", 0, 1)
    ]


def test_a_stream_no_agent_can_continue_gets_502_after_the_buffered_request_timeout(
    make_cluster,
) -> None:
    cluster = make_cluster(buffered_request_timeout=1500, heartbeat_interval=200)
    cluster.start_balancer()
    doomed = cluster.start_agent("doomed", slots=1, step_ms=20)
    client = cluster.client()
    cluster.wait_for_agents(client, 1)
    events = iter(client.continue_from_raw_prompt("streams", max_tokens=100_000))
    assert isinstance(next(events), Dispatched)
    assert isinstance(next(events), Tokens)
    doomed.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: client.buffered_requests() == 1, what="waiting to continue")
    last = list(events)[-1]
    assert isinstance(last, Failed) and (last.code, last.kind) == (502, "AgentLost")
    assert "no agent with its model was free to continue it within 1500 ms" in last.description
    assert 1.5 <= time.monotonic() - killed_at < 6.0
    assert client.buffered_requests() == 0
