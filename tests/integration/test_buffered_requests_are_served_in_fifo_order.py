from __future__ import annotations

import asyncio

from paddler.client import AsyncClient, Dispatched, Done


def test_buffered_requests_are_served_in_fifo_order(make_cluster) -> None:
    cluster = make_cluster(max_buffered_requests=20)
    cluster.start_balancer()
    cluster.start_agent("only", slots=1, step_ms=5)
    cluster.wait_for_agents(cluster.client(), 1)
    order: list[int] = []

    async def run() -> None:
        async with await AsyncClient.connect(cluster.clients_addr) as client:

            async def one(index: int, stream) -> None:
                async for event in stream:
                    if isinstance(event, Dispatched):
                        order.append(index)
                    elif isinstance(event, Done):
                        return

            streams = [
                await client.continue_from_raw_prompt(f"r{i}", max_tokens=8) for i in range(10)
            ]
            await asyncio.gather(*(one(i, s) for i, s in enumerate(streams)))

    asyncio.run(run())
    assert order == list(range(10))
