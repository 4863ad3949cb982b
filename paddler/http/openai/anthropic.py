"""``POST /v1/messages``: Anthropic's Messages API on the OpenAI-compatible address,
so that the official ``anthropic`` package works against ``base_url=http://host:port``.
The body and the conversation request it becomes are in ``anthropic_body``.

The answer comes as Anthropic's content blocks in the order the model wrote them
(``thinking``, ``text``, ``tool_use``), whole or streamed with Anthropic's events:
``message_start``, ``ping``, then per block ``content_block_start``,
``content_block_delta`` (``text_delta``, ``thinking_delta``, ``input_json_delta``)
and ``content_block_stop``, then ``message_delta`` (``stop_reason``, usage) and
``message_stop``. The status waits for the broker's first decisive event, as on
the OpenAI routes; an error after streaming began is an ``error`` event.

Errors on ``/v1/messages`` (and paths below it) are in Anthropic's envelope
``{"type": "error", "error": {"type", "message"}}``, with paddler's statuses: a
full buffer or an unreachable balancer is ``overloaded_error`` with status 503
and ``Retry-After`` (Anthropic says 529; 503 is what every other paddler route
and every proxy knows, and the SDKs retry both), a timeout ``timeout_error`` 504.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Literal

import falcon
import falcon.asgi
from pydantic import BaseModel

from paddler.client import Done, Event, Failed, Reasoning, Tokens, ToolCalls
from paddler.http import sse
from paddler.http.api_keys import bearer_key
from paddler.http.common import ClosingStream, HttpDeps, dumps, read_json
from paddler.http.openai.anthropic_body import GENERATION_ONLY, CountTokensBody, MessagesBody
from paddler.http.openai.errors import (
    ENVELOPE,
    OpenAIError,
    failure,
    invalid_body,
    refuse_fields,
)
from paddler.http.openai.models import ANTHROPIC_VERSION_HEADER, served_model_id
from paddler.http.openai.streaming import (
    chain,
    count_prompt,
    finish_reason,
    open_generation,
    tool_call_error,
    usage_body,
)
from paddler.http.openapi import JSON, Operation, Reply
from paddler.protocol.messages import Usage
from paddler.protocol.shapes import check
from paddler.protocol.tool_calls import ToolCall

ROUTE = "/v1/messages"
MODELS_ROUTE = "/v1/models"
KEY_HEADER = "x-api-key"
"""Anthropic's SDKs send their key in this header; ``Authorization: Bearer`` works too."""

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "stop": "end_turn"}
"""Anthropic's ``stop_reason`` for each of OpenAI's finish reasons; an answer one of
``stop_sequences`` ended is ``stop_sequence`` (``Done`` says which one)."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
"""Anthropic's error type of a status; other 4xx are ``invalid_request_error``,
other 5xx ``api_error``."""


# ------------------------------------------------------------------------ errors


class AnthropicErrorDetail(BaseModel):
    type: str
    """``invalid_request_error``, ``authentication_error``, ``not_found_error``,
    ``request_too_large``, ``overloaded_error``, ``timeout_error``, ``api_error``..."""
    message: str


class AnthropicErrorBody(BaseModel):
    """Anthropic's error envelope."""

    type: Literal["error"]
    error: AnthropicErrorDetail


ERROR_REPLY = Reply("An error in Anthropic's envelope", JSON, AnthropicErrorBody)


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_body(error: OpenAIError, message: str | None = None) -> dict[str, Any]:
    """``error`` (any error the OpenAI service raises) in Anthropic's envelope."""
    detail = AnthropicErrorDetail(type=error_type(error.status), message=message or error.message)
    return AnthropicErrorBody(type="error", error=detail).model_dump()


def envelope(req: falcon.asgi.Request, error: OpenAIError) -> dict[str, Any]:
    """The body of an error answered on this route (``errors.ENVELOPE``)."""
    if error.status != 401:
        return error_body(error)
    if bearer_key(req) is None and req.get_header(KEY_HEADER) is None:
        message = f"an API key is required: send {KEY_HEADER}: <key> (or Authorization: Bearer)"
    else:
        message = "invalid API key"
    return error_body(error, message)


class AnthropicEnvelope:
    """Falcon middleware: errors of ``/v1/messages`` and the paths below it (a 404
    there too, and a 401 of the key check), and of ``/v1/models`` asked with
    Anthropic's ``anthropic-version`` header, are answered in Anthropic's envelope."""

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        path = req.path
        if (
            path == ROUTE
            or path.startswith(ROUTE + "/")
            or (
                (path == MODELS_ROUTE or path.startswith(MODELS_ROUTE + "/"))
                and req.get_header(ANTHROPIC_VERSION_HEADER) is not None
            )
        ):
            setattr(req.context, ENVELOPE, envelope)


# ---------------------------------------------------------------------- answers


def usage_of(usage: Usage) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` are the prompt tokens the agent computed,
    ``cache_read_input_tokens`` those its slot already held (nothing is written to a
    cache on request, so ``cache_creation_input_tokens`` is 0)."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_prompt_tokens,
        "output_tokens": usage_body(usage)["completion_tokens"],
    }


def stop_reason(done: Done, max_tokens: int, called: bool) -> dict[str, Any]:
    """``stop_reason`` and ``stop_sequence`` of an answer that ended with ``done``."""
    if done.stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": done.stop_sequence}
    reason = STOP_REASONS[finish_reason(done.usage, max_tokens, called)]
    return {"stop_reason": reason, "stop_sequence": None}


StreamEvent = tuple[str, dict[str, Any]]
"""An Anthropic stream event: its name and its data."""


class Blocks:
    """The content blocks of an answer, opened and closed as its events come, in the
    order the model wrote them: reasoning is a ``thinking`` block, content a ``text``
    block, each parsed call a ``tool_use`` block; the text of a tool-call block that
    did not parse is text (nothing the model wrote is lost). ``feed`` and ``close``
    give the stream's events; with ``keep``, ``content`` holds the whole blocks."""

    def __init__(self, keep: bool, show_thinking: bool = True) -> None:
        self.keep = keep
        self.show_thinking = show_thinking
        self.content: list[dict[str, Any]] = []
        self.calls = 0
        self.tool_call_errors: list[dict[str, Any]] = []
        self._index = -1
        self._open: str | None = None
        self._pieces: list[str] = []

    def feed(self, event: Event) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if isinstance(event, Tokens):
            for piece in event.pieces:
                self._delta(out, "text", piece)
        elif isinstance(event, Reasoning):
            for piece in event.pieces:
                self._delta(out, "thinking", piece)
        elif isinstance(event, ToolCalls):
            if event.outcome.parsed:
                for call in event.outcome.calls:
                    self._tool_use(out, call)
            else:
                self._delta(out, "text", event.outcome.text)
                self.tool_call_errors.append(tool_call_error(event))
        return out  # tool-call text, log-probabilities and dispatches show nothing

    def close(self) -> list[StreamEvent]:
        """Closes the open block, if one is."""
        out: list[StreamEvent] = []
        if self._open is not None:
            if self.keep:
                self.content[-1][self._open] = "".join(self._pieces)
            self._pieces = []
            self._open = None
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        return out

    def _start(self, out: list[StreamEvent], block: dict[str, Any]) -> None:
        out.extend(self.close())
        self._index += 1
        if self.keep:
            self.content.append(dict(block))
        out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": self._index, "content_block": block},
            )
        )

    def _delta(self, out: list[StreamEvent], kind: str, piece: str) -> None:
        if not piece:
            return
        if self._open != kind:
            block: dict[str, Any] = (
                {"type": "text", "text": "", "citations": None}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            self._start(out, block)
            self._open = kind
        if kind == "thinking" and not self.show_thinking:
            return
        self._pieces.append(piece)
        delta = {"type": f"{kind}_delta", kind: piece}
        out.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": self._index, "delta": delta},
            )
        )

    def _tool_use(self, out: list[StreamEvent], call: ToolCall) -> None:
        self._start(out, {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        if self.keep:
            self.content[-1]["input"] = call.arguments
        self.calls += 1
        delta = {"type": "input_json_delta", "partial_json": call.arguments_json}
        out.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": self._index, "delta": delta},
            )
        )
        out.append(("content_block_stop", {"type": "content_block_stop", "index": self._index}))


def named_event(name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its name, as Anthropic streams them."""
    return sse.event(data, name=name)


class Messages:
    """``POST /v1/messages``."""

    API_KEY_HEADER = KEY_HEADER
    OPERATIONS = {
        "post": Operation(
            "Create a message (Anthropic's Messages API)",
            MessagesBody,
            {
                200: Reply(
                    "A message object; with stream: true, Anthropic's server-sent events "
                    "(message_start ... message_stop)",
                    JSON,
                    {"type": "object"},
                )
            },
            description=(
                "Anthropic's Messages API on the OpenAI-compatible address. The API key "
                "may come as x-api-key or as Authorization: Bearer."
            ),
            error=ERROR_REPLY,
        )
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = check(MessagesBody, await read_json(req, self.deps.max_body_bytes), invalid_body)
        request = body.to_request()
        model = body.model or await served_model_id(self.deps)
        opened = await open_generation(self.deps, req, request, bool(body.stream))
        if opened is None:  # the client went away while its request waited
            resp.status = 499
            return
        lead, events = opened
        head = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": model,
        }
        blocks = Blocks(keep=not body.stream, show_thinking=body.shows_thinking())
        if body.stream:
            sse.set_headers(resp)
            stream = self._events(head, blocks, body.max_tokens, lead, events)
            resp.stream = ClosingStream(stream, events)
            return
        done: Done | None = None
        try:
            async with contextlib.aclosing(chain(lead, events)) as everything:
                async for event in everything:
                    if isinstance(event, Failed):
                        raise failure(event)
                    if isinstance(event, Done):
                        done = event
                        break
                    blocks.feed(event)
        finally:
            await events.aclose()
        if done is None:  # the client went away
            resp.status = 499
            return
        blocks.close()
        message = {
            **head,
            "content": blocks.content,
            **stop_reason(done, body.max_tokens, blocks.calls > 0),
            "usage": usage_of(done.usage),
        }
        if blocks.tool_call_errors:
            message["tool_call_errors"] = blocks.tool_call_errors
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(message)

    @staticmethod
    async def _events(
        head: dict[str, Any],
        blocks: Blocks,
        max_tokens: int,
        lead: list[Event],
        events: AsyncGenerator[Event, None],
    ) -> AsyncGenerator[bytes, None]:
        started = {
            **head,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_of(Usage()),  # counted at the end: message_delta has them
        }
        try:
            yield named_event("message_start", {"type": "message_start", "message": started})
            yield named_event("ping", {"type": "ping"})
            async with contextlib.aclosing(chain(lead, events)) as everything:
                async for event in everything:
                    if isinstance(event, Failed):
                        yield named_event("error", error_body(failure(event)))
                        return
                    if isinstance(event, Done):
                        for name, data in blocks.close():
                            yield named_event(name, data)
                        delta = stop_reason(event, max_tokens, blocks.calls > 0)
                        yield named_event(
                            "message_delta",
                            {
                                "type": "message_delta",
                                "delta": delta,
                                "usage": usage_of(event.usage),
                            },
                        )
                        yield named_event("message_stop", {"type": "message_stop"})
                        return
                    for name, data in blocks.feed(event):
                        yield named_event(name, data)
        finally:
            await events.aclose()  # cancels the broker request, wherever it is


class CountTokens:
    """``POST /v1/messages/count_tokens``: the prompt's tokens as the model would see
    them (the chat template rendered with the system prompt and the tools), counted
    by an agent that has the model: ``{"input_tokens": n}``. It takes a free slot for
    one step of the agent's loop and prefills nothing."""

    API_KEY_HEADER = KEY_HEADER
    OPERATIONS = {
        "post": Operation(
            "Count the tokens of a message (Anthropic's Messages API)",
            CountTokensBody,
            {200: Reply("The prompt's token count", JSON, {"type": "object"})},
            description=(
                "A Messages body without the fields that only generation uses "
                "(max_tokens, stream, temperature, top_p, top_k, stop_sequences, "
                "metadata: refused with a 400 that names them)."
            ),
            error=ERROR_REPLY,
        )
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        raw = await read_json(req, self.deps.max_body_bytes)
        refuse_fields(
            raw, GENERATION_ONLY, "is not a field of count_tokens: it counts, it does not generate"
        )
        body = check(CountTokensBody, raw, invalid_body)
        tokens = await count_prompt(self.deps, req, body.to_request())
        if tokens is None:  # the client went away
            resp.status = 499
            return
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps({"input_tokens": tokens})


def add_messages_api(app: falcon.asgi.App[Any, Any], deps: HttpDeps) -> None:
    """Serve ``/v1/messages`` and ``/v1/messages/count_tokens`` on ``app`` (the
    OpenAI-compatible service's)."""
    app.add_middleware(AnthropicEnvelope())
    app.add_route(ROUTE, Messages(deps))
    app.add_route(f"{ROUTE}/count_tokens", CountTokens(deps))
