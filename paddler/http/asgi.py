"""The ASGI application gunicorn serves: one per worker, routing by listening port.

gunicorn binds the inference, management and OpenAI addresses on one set of
workers; ``PortRouter`` sends each connection to the app of the port it came in
on, so management routes are never reachable on the inference address.

It also gives every HTTP request a ``disconnected`` event (in the scope, under
``paddler.disconnected``): once the request body is read, a task waits for the
client to go away, so a streaming responder can cancel its broker request at
once, even while it is waiting in the buffer and has nothing to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("paddler.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DISCONNECTED = "paddler.disconnected"


class _DisconnectWatch:
    """A ``receive`` that notices the client leaving after the body was read."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.disconnected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def receive(self) -> Message:
        if self._task is not None:  # the app itself listens for the disconnect
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected.set()
        elif not message.get("more_body", False):
            self._task = asyncio.get_running_loop().create_task(self._watch())
        return message

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class PortRouter:
    def __init__(
        self,
        apps_by_port: dict[int, ASGIApp],
        on_startup: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.apps_by_port = apps_by_port
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        server = scope.get("server")
        app = self.apps_by_port.get(int(server[1])) if server and server[1] else None
        if app is None:
            if kind == "http":
                await send(
                    {
                        "type": "http.response.start",
                        "status": 404,
                        "headers": [(b"content-type", b"text/plain")],
                    }
                )
                await send({"type": "http.response.body", "body": b"Not Found"})
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            await app(scope, receive, send)
            return
        watch = _DisconnectWatch(receive)
        scope[DISCONNECTED] = watch.disconnected
        try:
            await app(scope, watch.receive, send)
        finally:
            await watch.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.on_startup is not None:
                        await self.on_startup()
                except Exception as exc:
                    log.exception("HTTP worker startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.on_shutdown is not None:
                    await self.on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
