"""What both generation endpoints share: calls to the broker, the wait for the
event that decides the HTTP status, OpenAI's usage, and the SSE chunks.

A generation waits for the broker's first answer that decides the outcome (the
first token, the end, or an error: buffer overflow, timeout, a chat template or
grammar the agent refused) before it sends the HTTP status, so a full buffer is a
503 with ``Retry-After`` rather than a 200 with an error inside. An error after
streaming began comes in-band as a last ``data: {"error": {...}}`` event followed
by ``data: [DONE]``. A client that goes away cancels its broker request.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import falcon
import falcon.asgi

from paddler.client import (
    AsyncClient,
    AsyncStream,
    Dispatched,
    Done,
    Event,
    Failed,
    Logprobs,
    Reasoning,
    Tokens,
    ToolCalls,
    ToolCallText,
)
from paddler.errors import BrokerUnreachable
from paddler.http import sse
from paddler.http.common import ClosingStream, HttpDeps, dumps, read_json, until_disconnect
from paddler.http.openai.errors import failure
from paddler.http.openai.models import served_model_id
from paddler.http.openai.schemas import Options
from paddler.protocol.messages import Usage
from paddler.protocol.tool_calls import ToolCall

T = TypeVar("T")


async def broker_call(deps: HttpDeps, call: Callable[[AsyncClient], Awaitable[T]]) -> T:
    """``call`` with the worker's client; the link is reset if the broker is away."""
    try:
        return await call(await deps.link.client())
    except BrokerUnreachable:
        await deps.link.reset()
        raise


async def guarded(
    deps: HttpDeps, req: falcon.asgi.Request, stream: AsyncStream
) -> AsyncGenerator[Event, None]:
    """The events of ``stream`` until it ends or the client goes away (which cancels
    it); a broker that stops answering becomes a ``Failed`` 503."""
    try:
        async for event in until_disconnect(req, aiter(stream), stream.cancel):
            yield event
    except BrokerUnreachable as exc:
        await deps.link.reset()
        yield Failed(503, "BrokerUnreachable", f"the balancer stopped answering: {exc}")
    finally:
        stream.cancel()


async def chain(lead: list[Event], events: AsyncIterator[Event]) -> AsyncGenerator[Event, None]:
    """The events already read, then the rest."""
    for event in lead:
        yield event
    async for event in events:
        yield event


def usage_body(usage: Usage) -> dict[str, Any]:
    completion = (
        usage.content_tokens
        + usage.reasoning_tokens
        + usage.tool_call_tokens
        + usage.undeterminable_tokens
    )
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": usage.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def finish_reason(usage: Usage, max_tokens: int, called: bool = False) -> str:
    """``length`` when the answer used all of ``max_tokens``; else ``tool_calls``
    when it called tools (``called``), else ``stop``."""
    if usage_body(usage)["completion_tokens"] >= max_tokens:
        return "length"
    return "tool_calls" if called else "stop"


@dataclass
class Answer:
    """A whole answer, collected from a request's events: its text (with the text
    of tool-call blocks that did not parse, so nothing the model wrote is lost),
    reasoning, tool calls and why some blocks are not calls, log-probabilities."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage | None = None
    """``None``: the stream ended without ``Done`` (the client went away)."""


def tool_call_error(event: ToolCalls) -> dict[str, Any]:
    """How a block that is not a call is reported: its outcome, why, its text."""
    outcome = event.outcome
    return {"outcome": outcome.outcome, "errors": outcome.errors, "text": outcome.text}


async def collect_answer(events: AsyncIterator[Event]) -> Answer:
    """The whole answer of a generation's events; ``failure`` raised for ``Failed``."""
    answer = Answer()
    pieces: list[str] = []
    reasoning: list[str] = []
    async for event in events:
        if isinstance(event, Tokens):
            pieces.extend(event.pieces)
        elif isinstance(event, Reasoning):
            reasoning.extend(event.pieces)
        elif isinstance(event, ToolCalls):
            if event.outcome.parsed:
                answer.tool_calls.extend(event.outcome.calls)
            else:
                pieces.append(event.outcome.text)
                answer.tool_call_errors.append(tool_call_error(event))
        elif isinstance(event, Logprobs):
            answer.logprobs.extend(event.entries)
        elif isinstance(event, Done):
            answer.usage = event.usage
            break
        elif isinstance(event, Failed):
            raise failure(event)
    answer.text = "".join(pieces)
    answer.reasoning = "".join(reasoning)
    return answer


async def collect_opened(lead: list[Event], events: AsyncGenerator[Event, None]) -> Answer:
    """The whole answer of a generation ``open_generation`` opened: its events read so
    far and the rest, whose stream is closed however this ends."""
    try:
        async with contextlib.aclosing(chain(lead, events)) as everything:
            return await collect_answer(everything)
    finally:
        await events.aclose()


async def count_prompt(
    deps: HttpDeps, req: falcon.asgi.Request, request: dict[str, Any]
) -> int | None:
    """The prompt tokens of ``request`` (a conversation request) as an agent that has
    the model counts them (``count_only``: it takes a free slot for one step of the
    agent's loop and prefills nothing); ``None`` if the client went away first."""
    opened = await open_generation(deps, req, {**request, "count_only": True}, False)
    if opened is None:
        return None
    usage = (await collect_opened(*opened)).usage
    return None if usage is None else usage.prompt_tokens


async def _lead(events: AsyncGenerator[Event, None]) -> list[Event] | None:
    """The events up to the first that decides the status (not ``Dispatched``);
    ``None`` if the client went away first."""
    lead: list[Event] = []
    async for event in events:
        lead.append(event)
        if not isinstance(event, Dispatched):
            return lead
    return None


WHOLE_ANSWER_TEXT_INTERVAL_MS = 100
"""The ``text_interval_ms`` of a request answered at its end (not streamed): its
text comes in a frame per 100 ms rather than one per token."""


async def open_generation(
    deps: HttpDeps, req: falcon.asgi.Request, request: dict[str, Any], streamed: bool
) -> tuple[list[Event], AsyncGenerator[Event, None]] | None:
    """Submits ``request`` and waits for the event that decides the HTTP status: the
    events read so far (the deciding one last) and the stream of the rest, which the
    caller closes. ``None`` when the client went away first; ``failure`` raised when
    the deciding event is an error (a full buffer, a timeout, a refusal). An answer
    not ``streamed`` has its text sent in a few frames
    (``WHOLE_ANSWER_TEXT_INTERVAL_MS``)."""
    if not streamed:
        request = {**request, "text_interval_ms": WHOLE_ANSWER_TEXT_INTERVAL_MS}
    stream = await broker_call(deps, lambda client: client.submit(request))
    events = guarded(deps, req, stream)
    try:
        lead = await _lead(events)
    except BaseException:
        await events.aclose()
        raise
    if lead is None:
        await events.aclose()
        return None
    if isinstance(lead[-1], Failed):
        await events.aclose()
        raise failure(lead[-1])
    return lead, events


def head(ident: str, object_name: str, options: Options) -> dict[str, Any]:
    """The fields every completion and chunk starts with."""
    return {"id": ident, "object": object_name, "created": options.created, "model": options.model}


class Generation:
    """A POST responder of a generation endpoint, streamed or not; subclasses say
    how a body is read and how choices look."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    def parse(self, body: Any) -> tuple[dict[str, Any], Options]:
        raise NotImplementedError

    def choice(self, answer: Answer, text: str, reason: str, logprobs: bool) -> dict[str, Any]:
        """The choice of a whole ``answer`` (``text``: its text as shown, e.g. with the
        prompt echoed); ``logprobs``: whether they were asked for."""
        raise NotImplementedError

    def tool_call_chunk_choices(self, calls: list[ToolCall], first: int) -> list[dict[str, Any]]:
        """The chunks' choices that stream ``calls`` (numbered from ``first``)."""
        return []

    def reasoning_chunk_choice(self, piece: str) -> dict[str, Any] | None:
        """The choice of a chunk of reasoning (``None``: the endpoint shows none)."""
        return None

    def chunk_choice(
        self, piece: str | None, reason: str | None, logprobs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The choice of one chunk; ``logprobs``: the entries of its tokens, when asked."""
        raise NotImplementedError

    def opening(self, options: Options) -> list[dict[str, Any]]:
        """Choices sent before the first piece."""
        return []

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        request, options = self.parse(await read_json(req, self.deps.max_body_bytes))
        if options.model is None:
            options.model = await served_model_id(self.deps)
        opened = await open_generation(self.deps, req, request, options.stream)
        if opened is None:  # the client went away while its request waited
            resp.status = 499
            return
        lead, events = opened
        ident = f"{self.id_prefix}{uuid.uuid4().hex}"
        if options.stream:
            sse.set_headers(resp)
            resp.stream = ClosingStream(self._chunks(ident, options, request, lead, events), events)
            return
        answer = await collect_opened(lead, events)
        if answer.usage is None:
            resp.status = 499
            return
        resp.content_type = falcon.MEDIA_JSON
        reason = finish_reason(answer.usage, request["max_tokens"], bool(answer.tool_calls))
        resp.text = dumps(
            {
                **head(ident, self.object_name, options),
                "choices": [
                    self.choice(answer, options.echo + answer.text, reason, request["logprobs"])
                ],
                "usage": usage_body(answer.usage),
            }
        )

    async def _chunks(
        self,
        ident: str,
        options: Options,
        request: dict[str, Any],
        lead: list[Event],
        events: AsyncGenerator[Event, None],
    ) -> AsyncGenerator[bytes, None]:
        base = head(ident, self.chunk_object_name or self.object_name, options)
        if options.include_usage:
            base["usage"] = None

        def chunk(choice: dict[str, Any]) -> bytes:
            return sse.event({**base, "choices": [choice]})

        asked = bool(request["logprobs"])
        pending: list[dict[str, Any]] = []
        calls = 0
        try:
            for choice in self.opening(options):
                yield chunk(choice)
            async with contextlib.aclosing(chain(lead, events)) as everything:
                async for event in everything:
                    if isinstance(event, Logprobs):
                        pending.extend(event.entries)
                    elif isinstance(event, Reasoning):
                        for piece in event.pieces:
                            reasoning_choice = self.reasoning_chunk_choice(piece)
                            if piece and reasoning_choice is not None:
                                yield chunk(reasoning_choice)
                    elif isinstance(event, Tokens):
                        for piece in event.pieces:
                            if piece:
                                entries, pending = (pending, []) if asked else (None, pending)
                                yield chunk(self.chunk_choice(piece, None, entries))
                    elif isinstance(event, ToolCalls):
                        if event.outcome.parsed:
                            for choice in self.tool_call_chunk_choices(event.outcome.calls, calls):
                                yield chunk(choice)
                            calls += len(event.outcome.calls)
                        else:  # not a call: its text is the answer's
                            pending = []  # the block's tokens: not this content's
                            yield chunk(self.chunk_choice(event.outcome.text, None))
                    elif isinstance(event, ToolCallText):
                        pending = []  # their tokens are not content
                    elif isinstance(event, Done):
                        reason = finish_reason(event.usage, request["max_tokens"], calls > 0)
                        yield chunk(self.chunk_choice(None, reason))
                        if options.include_usage:
                            yield sse.event(
                                {**base, "choices": [], "usage": usage_body(event.usage)}
                            )
                        yield sse.DONE
                        return
                    elif isinstance(event, Failed):
                        yield sse.event(failure(event).body())
                        yield sse.DONE
                        return
        finally:
            await events.aclose()  # cancels the broker request, wherever it is
