"""Clients of the broker over ZeroMQ: ``Client`` (sync) and ``AsyncClient`` (asyncio).

Both are thin drivers of one ``ClientCore`` (``paddler.client.core``), which holds
every rule of the client protocol and does no I/O."""

from paddler.client.aio import AsyncClient, AsyncStream
from paddler.client.events import (
    Dispatched,
    Done,
    Embedding,
    Event,
    Failed,
    Logprobs,
    Reasoning,
    Tokens,
    ToolCalls,
    ToolCallText,
)
from paddler.client.sync import Client, Stream

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Client",
    "Dispatched",
    "Done",
    "Embedding",
    "Event",
    "Failed",
    "Logprobs",
    "Reasoning",
    "Stream",
    "Tokens",
    "ToolCallText",
    "ToolCalls",
]
