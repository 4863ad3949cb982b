"""Paddler's inference service: NDJSON streams and the multiplexed WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import falcon
import falcon.asgi
from falcon import WebSocketDisconnected

from paddler.client import Dispatched, Done
from paddler.errors import BrokerUnreachable, InvalidRequest, RequestFailed
from paddler.http.api_keys import accepted_subprotocol
from paddler.http.common import (
    ERROR_REPLY,
    ClosingStream,
    HttpDeps,
    dumps,
    make_app,
    read_json,
    until_disconnect,
)
from paddler.http.envelopes import embedding_messages, error, generation_messages, line, response
from paddler.http.fanout import embed_fanned_out
from paddler.http.openapi import OpenApiDocument, Operation, Reply
from paddler.protocol.kinds import CANCELLED_CODE
from paddler.protocol.nesting import json_depth_exceeds, too_deep_message
from paddler.protocol.requests import (
    ConversationRequest,
    EmbeddingRequest,
    GenerationParameters,
    RawPromptRequest,
)
from paddler.protocol.shapes import check
from paddler.protocol.tool_calls import tool_choice_problem

log = logging.getLogger("paddler.http")


NDJSON_CONTENT_TYPE = "application/json"
NOT_NATIVE = ("logprobs", "top_logprobs")
NOT_NATIVE_MESSAGE = (
    "is not available on the native API (Paddler's envelopes have no place for it); "
    "use /v1/chat/completions, /v1/completions or paddler.client"
)
EMBEDDING_PART_MIN_DOCUMENTS = 1


def generation_request(body: Any, shape: type[GenerationParameters]) -> dict[str, Any]:
    """The wire form of the body of a generation endpoint, validated as ``shape``
    (``raw_prompt`` or ``conversation_history``, as the endpoint says)."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    required = "raw_prompt" if shape is RawPromptRequest else "conversation_history"
    if required not in body:
        raise InvalidRequest(required, "is required")
    check(shape, body, InvalidRequest)
    for name in NOT_NATIVE:
        if body.get(name):
            raise InvalidRequest(name, NOT_NATIVE_MESSAGE)
    request = shape.wire_of(body)
    problem = tool_choice_problem(request)
    if problem is not None:  # a 400 before the stream begins, as on the OpenAI API
        raise InvalidRequest(*problem)
    return request


async def generation_events(
    deps: HttpDeps, request: dict[str, Any], request_id: str
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Paddler envelopes of one generation request, until it ends: one list per
    broker event (a step's pieces)."""
    agent: str | None = None
    try:
        client = await deps.link.client()
        stream = await client.submit(request)
    except BrokerUnreachable as exc:
        await deps.link.reset()
        yield [error(request_id, 503, f"the balancer is not answering: {exc}")]
        return
    try:
        async for event in stream:
            if isinstance(event, Dispatched):
                agent = event.agent_name
                continue
            yield generation_messages(request_id, agent, event)
    except BrokerUnreachable as exc:
        await deps.link.reset()
        yield [error(request_id, 503, f"the balancer stopped answering: {exc}")]
    except RequestFailed as exc:
        if exc.code != CANCELLED_CODE:
            raise
        # the stream was cancelled under us (the client left): nothing more to say
    finally:
        stream.cancel()


async def embedding_events(
    deps: HttpDeps, request: dict[str, Any], request_id: str
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Fan an embedding batch out over the ready agents and merge the results as they
    come (order is not kept, ids match), then one ``Done``."""
    last_agent: str | None = None
    try:
        client = await deps.link.client()
        async with contextlib.aclosing(
            embed_fanned_out(client, request["input_batch"], request["normalization_method"])
        ) as events:
            async for agent, event in events:
                last_agent = agent or last_agent
                if not isinstance(event, Done):
                    yield embedding_messages(request_id, agent, event)
    except BrokerUnreachable as exc:
        await deps.link.reset()
        yield [error(request_id, 503, f"the balancer is not answering: {exc}")]
        return
    yield [response(request_id, last_agent, {"Embedding": "Done"})]


STREAM_REPLY = Reply(
    "Paddler's envelopes, one JSON object per line (NDJSON), until the request ends; "
    "errors after this status come in-band as an Error envelope",
    NDJSON_CONTENT_TYPE,
    {"type": "object"},
)


class _Stream:
    """POST responders that answer with an NDJSON stream."""

    shape: type[GenerationParameters] = RawPromptRequest

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    def request(self, body: Any) -> dict[str, Any]:
        return generation_request(body, self.shape)

    def events(
        self, request: dict[str, Any], request_id: str
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        return generation_events(self.deps, request, request_id)

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        request = self.request(await read_json(req, self.deps.max_body_bytes))
        request_id = str(uuid.uuid4())
        events = self.events(request, request_id)

        async def body() -> AsyncGenerator[bytes, None]:
            try:
                # one chunk per broker event: a step's pieces go out in one write
                async for messages in until_disconnect(req, events, lambda: None):
                    if messages:
                        yield b"".join(line(message) for message in messages)
            finally:
                await events.aclose()  # cancels the broker request, wherever it is

        resp.content_type = NDJSON_CONTENT_TYPE
        resp.stream = ClosingStream(body(), events)


class ContinueFromRawPrompt(_Stream):
    shape = RawPromptRequest
    OPERATIONS = {
        "post": Operation(
            "Continue a raw prompt (no chat template)", RawPromptRequest, {200: STREAM_REPLY}
        )
    }


class ContinueFromConversationHistory(_Stream):
    shape = ConversationRequest
    OPERATIONS = {
        "post": Operation(
            "Continue a conversation rendered with the model's chat template",
            ConversationRequest,
            {200: STREAM_REPLY},
        )
    }


class GenerateEmbeddingBatch(_Stream):
    OPERATIONS = {
        "post": Operation(
            "Embed a batch of documents (spread over the ready agents)",
            EmbeddingRequest,
            {200: STREAM_REPLY},
        )
    }

    def request(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or "input_batch" not in body:
            raise InvalidRequest("input_batch", "is required")
        return check(EmbeddingRequest, body, InvalidRequest).wire()

    def events(
        self, request: dict[str, Any], request_id: str
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        return embedding_events(self.deps, request, request_id)


class InferenceSocket:
    """``/api/v1/inference_socket``: many requests on one WebSocket, keyed by the
    client's ids, which are scoped to the connection."""

    OPERATIONS = {
        "get": Operation(
            "A WebSocket for many requests at once",
            description=(
                'Send {"Request": {"id": ..., "request": {"ContinueFromRawPrompt": {...}}}} or '
                '{"Notification": {"StopRespondingTo": "<id>"}}; answers are the envelopes of '
                "the NDJSON endpoints, one per WebSocket message. With API keys on, send "
                "Authorization: Bearer <key>, or (browsers) offer the subprotocols paddler "
                "and paddler.bearer.<key>; the server answers with paddler."
            ),
            replies={101: Reply("Switching Protocols: the WebSocket is open")},
        )
    }

    VARIANTS: dict[str, type[GenerationParameters]] = {
        "ContinueFromRawPrompt": RawPromptRequest,
        "ContinueFromConversationHistory": ConversationRequest,
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_websocket(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket) -> None:
        await ws.accept(subprotocol=accepted_subprotocol(ws.subprotocols))
        running: dict[str, asyncio.Task[None]] = {}
        lock = asyncio.Lock()

        async def send(message: dict[str, Any]) -> None:
            async with lock:
                await ws.send_text(dumps(message))

        async def serve(client_id: str, request: dict[str, Any]) -> None:
            this = asyncio.current_task()
            events = generation_events(self.deps, request, client_id)
            try:
                async for messages in events:
                    for message in messages:
                        await send(message)
            except WebSocketDisconnected:
                pass
            finally:
                await events.aclose()
                # a stopped request's id may already serve a new request: leave that one
                if running.get(client_id) is this:
                    del running[client_id]

        try:
            while True:
                text = await ws.receive_text()
                try:
                    client_id, request = self._parse(text)
                except InvalidRequest as exc:
                    await send(error(_client_id_of(text), 400, str(exc)))
                    continue
                if request is None:  # StopRespondingTo
                    task = running.pop(client_id, None)
                    if task is not None:
                        task.cancel()
                    continue
                if client_id in running:
                    await send(error(client_id, 400, f"request id {client_id!r} is in use"))
                    continue
                running[client_id] = asyncio.ensure_future(serve(client_id, request))
        except WebSocketDisconnected:
            pass
        finally:
            for task in list(running.values()):
                task.cancel()
            for task in list(running.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _parse(self, text: str) -> tuple[str, dict[str, Any] | None]:
        if json_depth_exceeds(text):
            raise InvalidRequest("message", too_deep_message())
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest("message", f"malformed JSON: {exc}") from exc
        if not isinstance(message, dict) or len(message) != 1:
            raise InvalidRequest("message", 'must be {"Request": ...} or {"Notification": ...}')
        if "Notification" in message:
            notification = message["Notification"]
            if isinstance(notification, dict) and isinstance(
                notification.get("StopRespondingTo"), str
            ):
                return notification["StopRespondingTo"], None
            raise InvalidRequest("Notification", 'must be {"StopRespondingTo": "<id>"}')
        envelope = message.get("Request")
        if not isinstance(envelope, dict) or not isinstance(envelope.get("id"), str):
            raise InvalidRequest("Request.id", "must be a string")
        variants = envelope.get("request")
        if not isinstance(variants, dict) or len(variants) != 1:
            raise InvalidRequest("Request.request", f"must be one of {', '.join(self.VARIANTS)}")
        ((variant, body),) = variants.items()
        if variant not in self.VARIANTS:
            raise InvalidRequest(
                "Request.request", f"unknown variant {variant!r}; use {', '.join(self.VARIANTS)}"
            )
        return envelope["id"], generation_request(body, self.VARIANTS[variant])


def _client_id_of(text: str) -> str:
    if json_depth_exceeds(text):
        return ""
    with contextlib.suppress(Exception):
        value = json.loads(text)["Request"]["id"]
        if isinstance(value, str):
            return value
    return ""


def create_app(deps: HttpDeps) -> falcon.asgi.App[Any, Any]:
    app = make_app(deps)
    app.add_route("/api/v1/continue_from_raw_prompt", ContinueFromRawPrompt(deps))
    app.add_route(
        "/api/v1/continue_from_conversation_history", ContinueFromConversationHistory(deps)
    )
    app.add_route("/api/v1/generate_embedding_batch", GenerateEmbeddingBatch(deps))
    app.add_route("/api/v1/inference_socket", InferenceSocket(deps))
    app.add_route("/openapi.json", OpenApiDocument(app, "paddler inference", ERROR_REPLY))
    return app
