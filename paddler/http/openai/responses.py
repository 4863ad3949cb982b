"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE
/v1/responses/{response_id}``, ``GET /v1/responses/{response_id}/input_items``,
``POST /v1/responses/{response_id}/cancel`` (always refused: there are no background
responses) and ``POST /v1/responses/input_tokens`` (an agent counts the prompt).

A response is one turn of a conversation: its input (``responses_body``) continues
the conversation of ``previous_response_id`` when given, and its output is a list of
items: the model's ``reasoning``, its ``message`` (``output_text``) and its
``function_call`` items. Streamed, it is the event sequence the ``openai`` SDK
accumulates (``response.created`` ... ``response.completed``), each event numbered
by ``sequence_number``.

The status is decided as for chat completions (``open_generation``): bad input, an
unknown ``previous_response_id``, a full buffer or a refused request are answered in
OpenAI's error envelope before anything streams; an error after that ends the
stream with ``response.failed``.

With ``store`` (the default, as OpenAI's), a finished response is kept by the
balancer (``paddler.broker.store.ResponseStore``, in the state database) with the
items it was made from (those of the responses it continued, then its input; its
``instructions`` left out, which ``previous_response_id`` does not carry over): a
response that continues it sees them, and its output, as messages again. Only
``completed`` and ``incomplete`` responses are kept; one larger than
``--max-stored-response-bytes``, or on a balancer that keeps none, is answered with
``store: false``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import falcon
import falcon.asgi

from paddler.client import Done, Event, Failed, Logprobs, Reasoning, Tokens, ToolCalls, ToolCallText
from paddler.errors import BrokerUnreachable, RequestFailed
from paddler.http import sse
from paddler.http.common import ClosingStream, HttpDeps, dumps, read_json
from paddler.http.openai.conversations import (
    change_conversation,
    conversation_messages,
    load_conversation,
)
from paddler.http.openai.errors import OpenAIError, failure, invalid, invalid_body, refuse_fields
from paddler.http.openai.items import items_of, messages_of_items, new_id, page
from paddler.http.openai.models import served_model_id
from paddler.http.openai.responses_body import (
    COUNT_REFUSED,
    FunctionChoice,
    FunctionTool,
    InputTokensBody,
    ResponsesBody,
)
from paddler.http.openai.responses_events import EventStream, output_of, responses_usage
from paddler.http.openai.responses_items import LOGPROBS_INCLUDE
from paddler.http.openai.streaming import (
    broker_call,
    chain,
    collect_opened,
    count_prompt,
    finish_reason,
    open_generation,
    tool_call_error,
)
from paddler.http.openapi import JSON, Operation, Reply
from paddler.protocol.messages import Usage
from paddler.protocol.shapes import check

log = logging.getLogger("paddler.http")

RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
"""The ids this server gives; any other is unknown without asking the balancer."""


# --------------------------------------------------------------------------- a turn


@dataclass
class Turn:
    """One response being made: what was asked, and the conversation it continues."""

    body: ResponsesBody
    model: str
    request: dict[str, Any]
    earlier: list[dict[str, Any]] = field(default_factory=list)
    """The items of the conversation it continues (its input items come after them)."""
    own: list[dict[str, Any]] = field(default_factory=list)
    """Its own input items."""
    conversation: str | None = None
    """The conversation it is made in, which gets its input and output items."""
    ident: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    store: bool = True

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The response object with ``status``; ``incomplete`` says why."""
        body = self.body
        text_format = body.text.format if body.text is not None else None
        tool_choice = body.tool_choice
        return {
            "id": self.ident,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False,
            "conversation": None if self.conversation is None else {"id": self.conversation},
            "error": error,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.request["parallel_tool_calls"],
            "previous_response_id": body.previous_response_id,
            "reasoning": {
                "effort": body.reasoning.effort if body.reasoning else None,
                "summary": None,
            },
            "service_tier": "default",
            "store": self.store,
            "temperature": body.temperature,
            "text": {
                "format": (
                    text_format.model_dump(by_alias=True, exclude_none=True)
                    if text_format is not None
                    else {"type": "text"}
                )
            },
            "tool_choice": (
                tool_choice.model_dump()
                if isinstance(tool_choice, FunctionChoice)
                else tool_choice or "auto"
            ),
            "tools": [
                tool.model_dump(exclude_none=True)
                for tool in body.tools or ()
                if isinstance(tool, FunctionTool)
            ],
            "top_logprobs": body.top_logprobs or 0,
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": None if usage is None else responses_usage(usage),
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def status(self, usage: Usage) -> str:
        """``incomplete`` when the answer used every token it could have."""
        incomplete = finish_reason(usage, self.request["max_tokens"]) == "length"
        return "incomplete" if incomplete else "completed"

    async def keep(self, deps: HttpDeps, response: dict[str, Any]) -> None:
        """Add its input and output items to its conversation, if it has one (when the
        conversation cannot take them, ``response["conversation"]`` becomes null); and
        keep ``response`` at the balancer with the conversation it ends, if asked
        (``response["store"]`` says whether it is kept)."""
        if self.conversation is not None:
            added = [*self.own, *response["output"]]
            try:
                await change_conversation(
                    deps, self.conversation, lambda record: record["items"].extend(added)
                )
            except (OpenAIError, RequestFailed, BrokerUnreachable) as exc:
                log.warning(
                    "response %s: its items were not added to conversation %s: %s",
                    self.ident,
                    self.conversation,
                    exc,
                )
                self.conversation = None
                response["conversation"] = None
        if not self.store:
            return
        # the items alone: the conversation's messages are made of them when it is
        # continued (records kept by earlier versions have the messages instead)
        record = {"response": response, "input_items": [*self.earlier, *self.own]}
        data = dumps(record).encode()
        try:
            await broker_call(deps, lambda client: client.put_response(self.ident, data))
        except (RequestFailed, BrokerUnreachable):
            self.store = response["store"] = False


async def stored_record(deps: HttpDeps, response_id: str, param: str | None) -> dict[str, Any]:
    """The record kept for ``response_id``; OpenAI's 404 when there is none."""
    prefix = "Previous response" if param else "Response"
    unknown = OpenAIError(
        404, f"{prefix} with id '{response_id}' not found.", param=param, code="not_found"
    )
    if not RESPONSE_ID.fullmatch(response_id):
        raise unknown
    try:
        data = await broker_call(deps, lambda client: client.get_response(response_id))
    except RequestFailed as exc:
        if exc.code == 404:
            raise unknown from None
        raise
    record: dict[str, Any] = json.loads(data)
    return record


async def continued(
    deps: HttpDeps, body: ResponsesBody
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The conversation ``body`` continues (``conversation`` or
    ``previous_response_id``) as messages, and as the items ``input_items`` lists
    before this body's own: the conversation's items, or the earlier response's input
    items and then its output."""
    conversation_id = body.conversation_id
    if conversation_id is not None:
        if body.previous_response_id is not None:
            raise invalid(
                "conversation",
                "cannot be used with previous_response_id: a response continues one or the other",
            )
        record = await load_conversation(deps, conversation_id, "conversation")
        return conversation_messages(record), list(record["items"])
    if body.previous_response_id is None:
        return [], []
    record = await stored_record(deps, body.previous_response_id, "previous_response_id")
    if "input_items" not in record:  # kept by an earlier version: the messages
        return record["conversation"], list(record["response"]["output"])
    earlier = [*record["input_items"], *record["response"]["output"]]
    return messages_of_items(earlier, "previous_response_id"), earlier


async def response_events(
    deps: HttpDeps, turn: Turn, lead: list[Event], events: AsyncGenerator[Event, None]
) -> AsyncGenerator[bytes, None]:
    """The server-sent events of a streamed response (the client's SDK accumulates
    them into the same response a non-streamed request gets)."""
    stream = EventStream(turn, turn.body.logprobs)
    pending: list[dict[str, Any]] = []
    try:
        yield stream.lifecycle("response.created", turn.response("in_progress", []))
        yield stream.lifecycle("response.in_progress", turn.response("in_progress", []))
        async with contextlib.aclosing(chain(lead, events)) as everything:
            async for event in everything:
                chunks: list[bytes] = []
                if isinstance(event, Logprobs):
                    pending.extend(event.entries)
                elif isinstance(event, Reasoning):
                    for piece in event.pieces:
                        if piece:
                            chunks += stream.reasoning(piece)
                elif isinstance(event, Tokens):
                    for piece in event.pieces:
                        if piece:
                            chunks += stream.text(piece, pending)
                            pending = []
                elif isinstance(event, ToolCalls):
                    pending = []
                    if event.outcome.parsed:
                        chunks += stream.calls(event.outcome.calls)
                    else:  # not a call: its text is the answer's
                        stream.answer.tool_call_errors.append(tool_call_error(event))
                        chunks += stream.text(event.outcome.text, None)
                elif isinstance(event, ToolCallText):
                    pending = []  # their tokens are not content
                elif isinstance(event, Done):
                    status = turn.status(event.usage)
                    for chunk in stream.end(status):
                        yield chunk
                    if not any(item["type"] != "reasoning" for item in stream.output):
                        # nothing said, nothing called: an empty message, as unstreamed
                        for chunk in stream.begin("message") + stream.end(status):
                            yield chunk
                    if stream.answer.tool_call_errors:
                        for item in stream.output:
                            if item["type"] == "message":
                                item["tool_call_errors"] = stream.answer.tool_call_errors
                    response = turn.response(status, stream.output, event.usage)
                    await turn.keep(deps, response)
                    kind = "response.completed" if status == "completed" else "response.incomplete"
                    yield stream.lifecycle(kind, response)
                    return
                elif isinstance(event, Failed):
                    for chunk in stream.end("incomplete"):
                        yield chunk
                    error = failure(event)
                    details = {"code": error.code or "server_error", "message": error.message}
                    turn.store = False
                    response = turn.response("failed", stream.output, error=details)
                    yield stream.lifecycle("response.failed", response)
                    return
                for chunk in chunks:
                    yield chunk
    finally:
        await events.aclose()  # cancels the broker request, wherever it is


# ------------------------------------------------------------------------ endpoints


class Responses:
    OPERATIONS = {
        "post": Operation(
            "Create a model response",
            ResponsesBody,
            {
                200: Reply(
                    "A response object; with stream: true, server-sent events "
                    "(response.created ... response.completed, response.incomplete or "
                    "response.failed)",
                    JSON,
                    {"type": "object"},
                )
            },
        )
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        deps = self.deps
        body = check(ResponsesBody, await read_json(req, deps.max_body_bytes), invalid_body)
        history, earlier = await continued(deps, body)
        history = body.input_messages(history)
        request = body.broker_request(history)
        model = body.model or await served_model_id(deps)
        turn = Turn(
            body,
            model,
            request,
            earlier,
            items_of(body.input),
            body.conversation_id,
            store=body.store is not False,
        )
        opened = await open_generation(deps, req, request, bool(body.stream))
        if opened is None:  # the client went away while its request waited
            resp.status = 499
            return
        lead, events = opened
        if body.stream:
            sse.set_headers(resp)
            resp.stream = ClosingStream(response_events(deps, turn, lead, events), events)
            return
        answer = await collect_opened(lead, events)
        if answer.usage is None:
            resp.status = 499
            return
        status = turn.status(answer.usage)
        response = turn.response(status, output_of(answer, status, body.logprobs), answer.usage)
        await turn.keep(deps, response)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(response)


class StoredResponse:
    OPERATIONS = {
        "get": Operation(
            "A stored response",
            replies={
                200: Reply("The response object, as it was answered", JSON, {"type": "object"})
            },
        ),
        "delete": Operation(
            "Forget a stored response",
            replies={
                200: Reply(
                    "{id, object: response, deleted: true}",
                    JSON,
                    {"type": "object"},
                )
            },
        ),
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str
    ) -> None:
        for name, value in req.params.items():
            if not (name == "stream" and value == "false"):
                raise invalid(name, "is not supported: a stored response is answered as it was")
        record = await stored_record(self.deps, response_id, None)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(record["response"])

    async def on_delete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str
    ) -> None:
        unknown = OpenAIError(404, f"Response with id '{response_id}' not found.", code="not_found")
        if not RESPONSE_ID.fullmatch(response_id):
            raise unknown
        try:
            await broker_call(self.deps, lambda client: client.delete_response(response_id))
        except RequestFailed as exc:
            if exc.code == 404:
                raise unknown from None
            raise
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps({"id": response_id, "object": "response", "deleted": True})


class InputTokens:
    """``POST /v1/responses/input_tokens``: the prompt's tokens as the model would see
    them (the conversation of ``previous_response_id``, the instructions, the input and
    the tools rendered by the chat template), counted by an agent that has the model."""

    OPERATIONS = {
        "post": Operation(
            "Count the input tokens of a response",
            InputTokensBody,
            {200: Reply("{object: response.input_tokens, input_tokens}", JSON, {"type": "object"})},
            description=(
                "A Responses body without the fields that only generation uses ("
                + ", ".join(COUNT_REFUSED)
                + ": refused with a 400 that names them)."
            ),
        )
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        deps = self.deps
        raw = await read_json(req, deps.max_body_bytes)
        refuse_fields(
            raw, COUNT_REFUSED, "is not a field of input_tokens: it counts, it does not generate"
        )
        body = check(InputTokensBody, raw, invalid_body)
        history, _ = await continued(deps, body)
        tokens = await count_prompt(deps, req, body.broker_request(body.input_messages(history)))
        if tokens is None:  # the client went away
            resp.status = 499
            return
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps({"object": "response.input_tokens", "input_tokens": tokens})


class InputItems:
    """``GET /v1/responses/{response_id}/input_items``: the items a stored response
    was made from, those of the responses it continued first, paged as OpenAI's
    lists are (``limit``, ``order``, ``after``)."""

    OPERATIONS = {
        "get": Operation(
            "The input items of a stored response",
            replies={
                200: Reply(
                    "{object: list, data, first_id, last_id, has_more}", JSON, {"type": "object"}
                )
            },
            description=(
                "Query parameters: limit (1 to 100, default 20), order (asc or desc, "
                "default desc), after (an item id: the items after it in that order), "
                f"include ({LOGPROBS_INCLUDE}: output text keeps its log-probabilities)."
            ),
        )
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str
    ) -> None:
        record = await stored_record(self.deps, response_id, None)
        if "input_items" not in record:
            raise OpenAIError(
                404,
                f"Response with id '{response_id}' was kept without its input items "
                "(by an earlier version of paddler).",
                code="not_found",
            )
        listed = page(req, record["input_items"], "input_items")
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(listed)


class CancelResponse:
    """``POST /v1/responses/{response_id}/cancel``: OpenAI cancels only background
    responses, and this server makes none (``background: true`` is refused), so a
    stored response is complete and the answer is OpenAI's 400 for it; a response
    still being made is cancelled by closing its connection."""

    OPERATIONS = {
        "post": Operation(
            "Cancel a background response (there are none: always a 400 or a 404)",
            replies={400: Reply("The response is not a background one", JSON, {"type": "object"})},
        )
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_post(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str
    ) -> None:
        await stored_record(self.deps, response_id, None)
        raise OpenAIError(
            400,
            "Cannot cancel a synchronous response: only responses made with background: "
            "true can be cancelled, and this server answers every response at once (close "
            "the connection of a response being made to cancel it).",
        )
