"""What every HTTP app shares: reading JSON bodies with a size limit, errors as
responses by type, ``/health``, CORS, and the broker link in the request context."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import falcon
import falcon.asgi
from pydantic import BaseModel

from paddler.errors import (
    BrokerUnreachable,
    ConfigurationError,
    InvalidRequest,
    PaddlerError,
    RequestFailed,
)
from paddler.http.api_keys import UNAUTHORIZED_CLOSE_CODE, ApiKeyCheck, ApiKeys, Unauthorized
from paddler.http.asgi import DISCONNECTED
from paddler.http.link import BrokerLink
from paddler.http.openapi import JSON, Operation, Reply
from paddler.protocol.nesting import json_depth_exceeds, too_deep_message

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass
class HttpDeps:
    """What the apps need, built once per worker by ``paddler.http.app``."""

    link: BrokerLink
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    cors_origins: list[str] = field(default_factory=list)
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    """Keys the service requires (``Authorization: Bearer``); none: it is open."""
    panel: dict[str, Any] = field(default_factory=dict)
    """The web admin panel's settings (``paddler.http.admin.config.PanelSettings``)."""
    on_startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Run when the worker starts serving (the app adds its background tasks here)."""
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Run when the worker stops, before its broker link closes."""


class BodyTooLarge(PaddlerError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


async def read_json(req: falcon.asgi.Request, limit: int) -> Any:
    """The JSON body; ``BodyTooLarge`` past ``limit``, ``InvalidRequest`` if malformed
    or nested deeper than ``MAX_JSON_DEPTH`` (measured before parsing, which recurses)."""
    length = req.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(limit)
    data = await req.stream.read(limit + 1)
    if len(data) > limit:
        raise BodyTooLarge(limit)
    if not data:
        raise InvalidRequest("body", "a JSON object is required")
    if json_depth_exceeds(data):
        raise InvalidRequest("body", too_deep_message())
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("body", f"malformed JSON: {exc}") from exc


_LINE_BREAKERS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def dumps(value: Any) -> str:
    """Compact JSON on one line. U+2028, U+2029 and U+0085 are escaped: some
    clients (httpx's ``iter_lines``) split lines on them."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKERS)


def disconnected(req: falcon.asgi.Request) -> asyncio.Event:
    event = req.scope.get(DISCONNECTED)
    if isinstance(event, asyncio.Event):
        return event
    return asyncio.Event()  # falcon.testing without the router: never disconnects


async def until_disconnect(
    req: falcon.asgi.Request, events: AsyncIterator[Any], on_disconnect: Callable[[], None]
) -> AsyncGenerator[Any, None]:
    """Items of ``events`` until the client goes away; then ``on_disconnect()``.

    One watcher per response, not a race per item (a task and an ``asyncio.wait``
    per token cost a streaming worker more than the token itself): when the client
    leaves while the responder waits for its next event, that wait is cancelled;
    when it leaves while an item is being written, the loop stops before the next."""
    gone = disconnected(req)
    task = asyncio.current_task()
    waiting = False
    cancelled = False

    def on_gone(_: object) -> None:
        nonlocal cancelled
        if waiting and not cancelled and task is not None:
            cancelled = True
            task.cancel()

    watcher = asyncio.ensure_future(gone.wait())
    watcher.add_done_callback(on_gone)
    iterator = events.__aiter__()
    try:
        while not gone.is_set():
            waiting = True
            try:
                item = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not cancelled or task is None:
                    raise  # cancelled by someone else: not ours to swallow
                task.uncancel()
                break
            finally:
                waiting = False
            yield item
        on_disconnect()
    finally:
        watcher.remove_done_callback(on_gone)
        watcher.cancel()


class ClosingStream:
    """``resp.stream`` that Falcon closes (``close()``) however the response ends, so
    the broker requests behind it are cancelled at once, not when the generators are
    collected. ``also`` are generators to close too, in case the body never started."""

    def __init__(
        self, chunks: AsyncGenerator[bytes, None], *also: AsyncGenerator[Any, None]
    ) -> None:
        self._chunks = chunks
        self._also = also

    def __aiter__(self) -> ClosingStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def close(self) -> None:
        await self._chunks.aclose()
        for generator in self._also:
            await generator.aclose()


class ErrorBody(BaseModel):
    """Paddler's error answer: what is wrong, and the request field at fault (if one is)."""

    error: str
    field: str | None


ERROR_REPLY = Reply(
    "An error: 4xx for bad input, 5xx when the balancer cannot serve", JSON, ErrorBody
)


def _json_error(resp: falcon.asgi.Response, status: int, message: str, field: str | None) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = dumps(ErrorBody(error=message, field=field).model_dump())


async def _invalid_request(req: Any, resp: Any, ex: InvalidRequest, params: Any) -> None:
    _json_error(resp, 400, str(ex), ex.field)


async def _invalid_configuration(req: Any, resp: Any, ex: ConfigurationError, params: Any) -> None:
    _json_error(resp, 400, str(ex), ex.field)


async def _too_large(req: Any, resp: Any, ex: BodyTooLarge, params: Any) -> None:
    _json_error(resp, 413, str(ex), "body")


async def _unreachable(req: Any, resp: Any, ex: BrokerUnreachable, params: Any) -> None:
    _json_error(resp, 503, f"the balancer is not answering: {ex}", None)
    resp.set_header("Retry-After", "1")


async def _failed(req: Any, resp: Any, ex: RequestFailed, params: Any) -> None:
    _json_error(resp, ex.code if 400 <= ex.code < 600 else 502, ex.description, None)


async def _unauthorized(req: Any, resp: Any, ex: Unauthorized, params: Any, ws: Any = None) -> None:
    if ws is not None:  # before the handshake is accepted: the upgrade is refused
        await ws.close(UNAUTHORIZED_CLOSE_CODE)
        return
    _json_error(resp, 401, str(ex), None)
    resp.set_header("WWW-Authenticate", ex.challenge)


def add_error_handlers(app: falcon.asgi.App[Any, Any]) -> None:
    app.add_error_handler(InvalidRequest, _invalid_request)
    app.add_error_handler(ConfigurationError, _invalid_configuration)
    app.add_error_handler(BodyTooLarge, _too_large)
    app.add_error_handler(BrokerUnreachable, _unreachable)
    app.add_error_handler(RequestFailed, _failed)
    app.add_error_handler(Unauthorized, _unauthorized)


class Health:
    """``GET /health``: 200 ``OK`` while this worker hears a live broker; 503 with the
    reason (``BrokerUnreachable``'s answer) when it cannot reach one. Cheap: the link
    answers from when it last heard the broker, pinging it at most once a second."""

    OPERATIONS = {
        "get": Operation(
            "Health: OK while this worker reaches a live balancer",
            replies={200: Reply("OK", "text/plain")},
            description=(
                "503 with the reason when the worker cannot reach a live balancer (down, "
                "frozen or unreachable), from a check at most a second or two old"
            ),
        )
    }
    OPEN_WITHOUT_API_KEY = True

    def __init__(self, link: BrokerLink | None = None) -> None:
        # a stand-in link with no liveness check (the apps' test doubles) counts as live
        self._broker_down: Callable[[], Awaitable[str | None]] | None = getattr(
            link, "broker_down", None
        )

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if self._broker_down is not None:
            reason = await self._broker_down()
            if reason is not None:
                raise BrokerUnreachable(reason)
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "OK"


def make_app(deps: HttpDeps) -> falcon.asgi.App[Any, Any]:
    """A Falcon ASGI app with CORS for ``deps.cors_origins``, the API key check for
    ``deps.api_keys`` (after CORS, so a 401 still carries CORS headers), error handlers,
    ``/health``."""
    middleware: list[Any] = []
    if deps.cors_origins:
        middleware.append(
            falcon.CORSMiddleware(allow_origins=deps.cors_origins, allow_credentials="*")
        )
    if deps.api_keys:
        middleware.append(ApiKeyCheck(deps.api_keys))
    app: falcon.asgi.App[Any, Any] = falcon.asgi.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    add_error_handlers(app)
    app.add_route("/health", Health(deps.link))
    return app
