from __future__ import annotations

from paddler.client import Client, Done
from paddler.testing.cluster import wait_until


def test_a_restarted_broker_sees_its_agents_again_within_a_few_seconds(make_cluster) -> None:
    cluster = make_cluster()
    first = cluster.start_balancer("balancer-1")
    cluster.start_agent("a1", slots=1)
    cluster.start_agent("a2", slots=2)
    with Client(cluster.clients_addr) as client:
        cluster.wait_for_agents(client, 2)
    assert first.stop() == 0

    cluster.start_balancer("balancer-2")
    with Client(cluster.clients_addr, timeout_s=10) as client:
        agents = wait_until(
            lambda: (a := client.agents()) and len(a) == 2 and a,
            timeout_s=6.0,
            what="both agents registered again",
        )
        assert sorted(a["name"] for a in agents) == ["a1", "a2"]
        events = list(client.continue_from_raw_prompt("after restart", max_tokens=2))
        assert isinstance(events[-1], Done)
