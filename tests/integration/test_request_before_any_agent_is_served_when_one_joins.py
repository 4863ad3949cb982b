from __future__ import annotations

from paddler.client import Dispatched, Done, Tokens
from paddler.testing.cluster import wait_until


def test_a_request_sent_before_any_agent_exists_is_served_when_one_joins(make_cluster) -> None:
    cluster = make_cluster(buffered_request_timeout=20_000)
    cluster.start_balancer()
    client = cluster.client()
    stream = client.continue_from_raw_prompt("scale from zero", max_tokens=3)
    wait_until(lambda: client.buffered_requests() == 1, what="request buffered")

    cluster.start_agent("late", slots=1)
    events = list(stream)

    assert isinstance(events[0], Dispatched) and events[0].agent_name == "late"
    assert events[0].queued_ms > 0
    assert [e.pieces for e in events if isinstance(e, Tokens)] == [["t0 "], ["t1 "], ["t2 "]]
    assert isinstance(events[-1], Done) and events[-1].usage.content_tokens == 3
    assert client.buffered_requests() == 0
