"""Embedding batches fan out over the ready agents: one part each, run together."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator
from typing import Any

from paddler.client import AsyncClient, Dispatched, Event, Failed
from paddler.errors import BrokerUnreachable


def split(documents: list[dict[str, str]], ready_agents: int) -> list[list[dict[str, str]]]:
    size = max(1, math.ceil(len(documents) / max(ready_agents, 1)))
    return [documents[i : i + size] for i in range(0, len(documents), size)]


async def embed_fanned_out(
    client: AsyncClient, documents: list[dict[str, str]], normalization_method: Any
) -> AsyncGenerator[tuple[str | None, Event], None]:
    """``(agent name, event)`` for every event of every part as it comes (each part's
    ``Done`` or ``Failed`` included, ``Dispatched`` left out). Closing it cancels the
    parts still running."""
    ready = sum(1 for agent in await client.agents() if agent.get("ready"))
    queue: asyncio.Queue[tuple[str | None, Event | None]] = asyncio.Queue()

    async def run_part(part: list[dict[str, str]]) -> None:
        agent: str | None = None
        try:
            stream = await client.generate_embedding_batch(part, normalization_method)
        except BrokerUnreachable as exc:
            await queue.put((None, Failed(503, "BrokerUnreachable", str(exc))))
            await queue.put((None, None))
            return
        try:
            async for event in stream:
                if isinstance(event, Dispatched):
                    agent = event.agent_name
                else:
                    await queue.put((agent, event))
        except BrokerUnreachable as exc:
            await queue.put((agent, Failed(503, "BrokerUnreachable", str(exc))))
        finally:
            stream.cancel()
            await queue.put((agent, None))

    tasks = [asyncio.ensure_future(run_part(part)) for part in split(documents, ready)]
    try:
        running = len(tasks)
        while running:
            agent, event = await queue.get()
            if event is None:
                running -= 1
            else:
                yield agent, event
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
