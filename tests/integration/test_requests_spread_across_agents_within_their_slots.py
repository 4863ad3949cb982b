from __future__ import annotations

import asyncio
from collections import Counter

from paddler.client import AsyncClient, Dispatched, Done
from paddler.testing.cluster import LocalCluster


async def _run(
    cluster: LocalCluster, count: int, slots: dict[str, int]
) -> tuple[Counter[str], int]:
    served: Counter[str] = Counter()
    peak_violations = 0
    async with await AsyncClient.connect(cluster.clients_addr, timeout_s=10) as client:

        async def one(index: int) -> None:
            stream = await client.continue_from_raw_prompt(f"request {index}", max_tokens=20)
            async for event in stream:
                if isinstance(event, Dispatched):
                    served[event.agent_name or ""] += 1
                elif not isinstance(event, Done) and not hasattr(event, "pieces"):
                    raise AssertionError(f"request {index} failed: {event}")

        async def watch() -> None:
            nonlocal peak_violations
            while True:
                for agent in await client.agents():
                    if agent["slots_processing"] > agent["slots_total"]:
                        peak_violations += 1
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(one(i) for i in range(count)))
        watcher.cancel()
        for agent in await client.agents():
            assert agent["slots_processing"] == 0
            assert agent["slots_total"] == slots[agent["name"]]
    return served, peak_violations


def test_requests_spread_across_agents_and_never_exceed_their_slots(make_cluster) -> None:
    cluster = make_cluster(max_buffered_requests=100)
    cluster.start_balancer()
    slots = {"a1": 1, "a2": 2, "a3": 3}
    for name, n in slots.items():
        cluster.start_agent(name, slots=n, step_ms=10)
    cluster.wait_for_agents(cluster.client(), 3)

    served, violations = asyncio.run(_run(cluster, 30, slots))

    assert violations == 0
    assert sum(served.values()) == 30
    assert set(served) == {"a1", "a2", "a3"}
    # the agent with more slots takes more of the work
    assert served["a3"] > served["a1"]
    for process in cluster.agents.values():
        assert "queued a dispatch beyond the free slots" not in process.log()
