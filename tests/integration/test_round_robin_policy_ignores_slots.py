from __future__ import annotations

import asyncio
from collections import Counter

from paddler.client import AsyncClient, Dispatched, Done


def test_round_robin_sends_requests_in_turn_and_agents_queue_what_they_cannot_start(
    make_cluster,
) -> None:
    cluster = make_cluster(dispatch_policy="round-robin", max_buffered_requests=0)
    cluster.start_balancer()
    cluster.start_agent("small", slots=1, step_ms=5)
    cluster.start_agent("large", slots=3, step_ms=5)
    cluster.wait_for_agents(cluster.client(), 2)
    served: Counter[str] = Counter()

    async def run() -> None:
        async with await AsyncClient.connect(cluster.clients_addr) as client:

            async def one(index: int) -> None:
                stream = await client.continue_from_raw_prompt(f"r{index}", max_tokens=10)
                async for event in stream:
                    if isinstance(event, Dispatched):
                        served[event.agent_name or ""] += 1
                    elif not isinstance(event, Done) and not hasattr(event, "pieces"):
                        raise AssertionError(event)

            await asyncio.gather(*(one(i) for i in range(8)))

    asyncio.run(run())
    # no buffer, no overflow: every request went straight out, half to each agent
    assert served == {"small": 4, "large": 4}
    assert "queued a dispatch beyond the free slots" in cluster.agents["small"].log()
