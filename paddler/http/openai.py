"""The OpenAI-compatible service: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/v1/models``, in OpenAI's shapes, so that the official
``openai`` package works unchanged against ``base_url=http://host:port/v1``.

Statuses are honest: a generation waits for the broker's first answer that decides
the outcome (the first token, the end, or an error: buffer overflow, timeout, a chat
template or grammar the agent refused) before it sends the HTTP status, so a full
buffer is a 503 with ``Retry-After`` rather than a 200 with an error inside. An error
after streaming began comes in-band as a last ``data: {"error": {...}}`` event
followed by ``data: [DONE]``. Errors use OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``.

A client that goes away cancels its broker request, wherever it is.
"""

from __future__ import annotations

import base64
import contextlib
import math
import re
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import falcon
import falcon.asgi

from paddler.client import (
    AsyncClient,
    AsyncStream,
    Dispatched,
    Done,
    Embedding,
    Event,
    Failed,
    Tokens,
)
from paddler.errors import (
    BrokerUnreachable,
    ConfigurationError,
    InvalidRequest,
    RequestFailed,
)
from paddler.http.common import (
    BodyTooLarge,
    ClosingStream,
    HttpDeps,
    dumps,
    make_app,
    read_json,
    until_disconnect,
)
from paddler.http.fanout import embed_fanned_out
from paddler.protocol.messages import Usage
from paddler.protocol.requests import (
    MAX_DOCUMENTS,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    validate_request,
)

T = TypeVar("T")

SSE_CONTENT_TYPE = "text/event-stream"
OWNED_BY = "paddler"
FALLBACK_MODEL_ID = "paddler"
RETRY_AFTER_S = "1"
EMBEDDING_NORMALIZATION = "L2"
"""OpenAI's embeddings have unit length."""

CHAT_ROLES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
MESSAGE_EXTRAS = ("name", "tool_calls", "tool_call_id")
"""Message fields passed to the chat template as they are."""


# ----------------------------------------------------------------------------- errors


class OpenAIError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(param: str | None, message: str) -> OpenAIError:
    """A 400 naming the OpenAI request field at fault."""
    text = f"{param}: {message}" if param else message
    return OpenAIError(400, text, param=param)


def snake_case(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


ERROR_CODES = {"PromptTooLong": "context_length_exceeded"}
"""OpenAI's codes where it has one; otherwise the snake_case of the broker's kind."""


def failure(event: Failed) -> OpenAIError:
    """The HTTP error of a request the broker or an agent ended with an error."""
    status = event.code if 400 <= event.code < 600 else 502
    if event.kind == "EmbeddingsDisabled":
        return OpenAIError(
            400,
            "embeddings are off on this balancer; set inference_parameters.enable_embeddings "
            "to true in the balancer's desired state",
            code="embeddings_disabled",
        )
    return OpenAIError(
        status,
        event.description,
        code=ERROR_CODES.get(event.kind) or snake_case(event.kind),
        retry_after=RETRY_AFTER_S if status in (429, 503) else None,
    )


def _write_error(resp: falcon.asgi.Response, error: OpenAIError) -> None:
    resp.status = error.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = dumps(error.body())
    if error.retry_after is not None:
        resp.set_header("Retry-After", error.retry_after)


def _param_of(field_name: str) -> str | None:
    return None if field_name in ("body", "request") else field_name


def add_openai_error_handlers(app: falcon.asgi.App[Any, Any]) -> None:
    """OpenAI's envelope for every error, replacing Paddler's ``{"error", "field"}``
    (the broker link is reset where a broker call fails, in ``_broker``)."""

    async def openai_error(req: Any, resp: Any, ex: OpenAIError, params: Any) -> None:
        _write_error(resp, ex)

    async def invalid_request(req: Any, resp: Any, ex: InvalidRequest, params: Any) -> None:
        _write_error(resp, OpenAIError(400, str(ex), param=_param_of(ex.field)))

    async def invalid_configuration(
        req: Any, resp: Any, ex: ConfigurationError, params: Any
    ) -> None:
        _write_error(resp, OpenAIError(400, str(ex), param=_param_of(ex.field)))

    async def too_large(req: Any, resp: Any, ex: BodyTooLarge, params: Any) -> None:
        _write_error(resp, OpenAIError(413, str(ex), code="request_too_large"))

    async def unreachable(req: Any, resp: Any, ex: BrokerUnreachable, params: Any) -> None:
        error = OpenAIError(
            503,
            f"the balancer is not answering: {ex}",
            code="balancer_unreachable",
            retry_after=RETRY_AFTER_S,
        )
        _write_error(resp, error)

    async def request_failed(req: Any, resp: Any, ex: RequestFailed, params: Any) -> None:
        _write_error(resp, failure(Failed(ex.code, ex.kind, ex.description)))

    def serialize(req: Any, resp: Any, ex: falcon.HTTPError) -> None:
        message = ex.title if not ex.description else f"{ex.title}: {ex.description}"
        if ex.status_code == 404:
            message = f"Unknown request URL: {req.method} {req.path}"
        elif ex.status_code == 405:
            message = f"{req.method} is not allowed on {req.path}"
        error = OpenAIError(ex.status_code, message, code=snake_case(type(ex).__name__[4:]))
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(error.body())

    app.add_error_handler(OpenAIError, openai_error)
    app.add_error_handler(InvalidRequest, invalid_request)
    app.add_error_handler(ConfigurationError, invalid_configuration)
    app.add_error_handler(BodyTooLarge, too_large)
    app.add_error_handler(BrokerUnreachable, unreachable)
    app.add_error_handler(RequestFailed, request_failed)
    app.set_error_serializer(serialize)


# ------------------------------------------------------------------ field validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    return body


def _optional_number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not low <= value <= high:
        raise invalid(name, f"must be a number from {low:g} to {high:g}")
    return float(value)


def _optional_bool(body: dict[str, Any], name: str, where: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(where or name, "must be true or false")
    return value


def _max_tokens(body: dict[str, Any], names: tuple[str, ...]) -> int | None:
    """The first of ``names`` given; ``None`` leaves the balancer's default."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT:
            raise invalid(name, f"must be an integer from 1 to {MAX_TOKENS_LIMIT}")
        return int(value)
    return None


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)
    ):
        raise invalid(
            "stop",
            f"must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
            f"of at most {MAX_STOP_LENGTH} characters",
        )
    return list(stops)


def _sampling(body: dict[str, Any], max_names: tuple[str, ...], choices: str) -> dict[str, Any]:
    """Broker request fields of the sampling options shared by both generation endpoints."""
    request: dict[str, Any] = {}
    max_tokens = _max_tokens(body, max_names)
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    temperature = _optional_number(body, "temperature", 0, 2)
    if temperature is not None:
        request["temperature"] = temperature
    top_p = _optional_number(body, "top_p", 0, 1)
    if top_p is not None:
        request["top_p"] = top_p
    min_p = _optional_number(body, "min_p", 0, 1)  # not OpenAI's; llama.cpp servers take it
    if min_p is not None:
        request["min_p"] = min_p
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or not 0 <= top_k <= 1_000_000:
            raise invalid("top_k", "must be a non-negative integer")
        request["top_k"] = top_k
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise invalid("seed", "must be an integer")
        request["seed"] = seed & 0xFFFFFFFF  # OpenAI takes any 64-bit seed; llama.cpp 32 bits
    stop = _stop(body.get("stop"))
    if stop:
        request["stop"] = stop
    for name in ("frequency_penalty", "presence_penalty"):
        _optional_number(body, name, -2, 2)  # accepted, not applied per request
    n = body.get(choices)
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid(choices, "only 1 is supported")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise invalid("logit_bias", "must be an object")
    return request


@dataclass
class Options:
    """What the response needs to know about the request."""

    model: str | None
    stream: bool
    include_usage: bool
    echo: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


def _options(body: dict[str, Any]) -> Options:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "must be a string")
    stream = _optional_bool(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise invalid("stream_options", "must be an object")
    include_usage = _optional_bool(
        stream_options or {}, "include_usage", "stream_options.include_usage"
    )
    return Options(model, stream, include_usage)


def _content_part(where: str, part: Any) -> dict[str, Any]:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise invalid(where, "must be an object with a 'type'")
    kind = part["type"]
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise invalid(f"{where}.{kind}", "must be a string")
        return {"type": "text", "text": text}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise invalid(f"{where}.image_url.url", "must be a non-empty string")
        return {"type": "image_url", "image_url": {"url": url}}
    raise invalid(f"{where}.type", f"{kind!r} parts are not supported; use 'text' or 'image_url'")


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, "must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise invalid(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
    content = message.get("content")
    out: dict[str, Any] = {"role": CHAT_ROLES[role]}
    if isinstance(content, str):
        out["content"] = content
    elif isinstance(content, list):
        out["content"] = [
            _content_part(f"{where}.content[{i}]", part) for i, part in enumerate(content)
        ]
    elif content is None and role == "assistant":
        out["content"] = ""  # an assistant turn that only called tools
    else:
        raise invalid(f"{where}.content", "must be a string or a list of content parts")
    for name in MESSAGE_EXTRAS:
        if message.get(name) is not None:
            out[name] = message[name]
    return out


def _response_format(value: Any) -> dict[str, Any] | None:
    """The broker's grammar for OpenAI's ``response_format``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("response_format", "must be an object with a 'type'")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_schema", "schema": dumps({"type": "object"})}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid("response_format.json_schema", "must be an object with a 'schema'")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict | bool):
            raise invalid("response_format.json_schema.schema", "must be a JSON Schema object")
        return {"type": "json_schema", "schema": dumps(schema)}
    raise invalid("response_format.type", "must be 'text', 'json_object' or 'json_schema'")


BROKER_FIELD_PARAMS = {
    "conversation_history": "messages",
    "raw_prompt": "prompt",
    "grammar": "response_format",
}


def _validated(request: dict[str, Any], max_param: str) -> dict[str, Any]:
    """The broker's own validation, with its field names turned into OpenAI's."""
    try:
        return validate_request(request)
    except InvalidRequest as exc:
        root = exc.field.split(".")[0].split("[")[0]
        param = BROKER_FIELD_PARAMS.get(root, max_param if root == "max_tokens" else exc.field)
        raise invalid(param, exc.message) from exc


def chat_request(body: Any) -> tuple[dict[str, Any], Options]:
    """The broker request and the response options of a chat completion body."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of messages")
    request: dict[str, Any] = {
        "conversation_history": [_message(i, m) for i, m in enumerate(messages)]
    }
    request.update(_sampling(body, ("max_completion_tokens", "max_tokens"), "n"))
    grammar = _response_format(body.get("response_format"))
    if grammar is not None:
        request["grammar"] = grammar
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise invalid("tools", "must be a list of tool objects")
        if tools and body.get("tool_choice") != "none":
            request["tools"] = tools  # the chat template shows them to the model
    options = _options(body)
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _validated(request, param), options


def completion_request(body: Any) -> tuple[dict[str, Any], Options]:
    """The broker request and the response options of a (legacy) completion body."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if any(not isinstance(p, str) for p in prompt):
            raise invalid("prompt", "token arrays are not supported; send the text")
        if len(prompt) != 1:
            raise invalid("prompt", "only one prompt per request is supported")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt", "must be a string")
    request: dict[str, Any] = {"raw_prompt": prompt}
    request.update(_sampling(body, ("max_tokens",), "n"))
    best_of = body.get("best_of")
    if best_of is not None and (not _is_int(best_of) or best_of != 1):
        raise invalid("best_of", "only 1 is supported")
    options = _options(body)
    if _optional_bool(body, "echo"):
        options.echo = prompt
    return _validated(request, "max_tokens"), options


@dataclass
class EmbeddingOptions:
    model: str | None
    base64: bool
    dimensions: int | None


def embedding_request(body: Any) -> tuple[list[str], EmbeddingOptions]:
    body = _object(body)
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise invalid("input", "must be a string or a non-empty list of strings")
    if len(texts) > MAX_DOCUMENTS:
        raise invalid("input", f"has more than {MAX_DOCUMENTS} inputs")
    for index, text in enumerate(texts):
        if _is_int(text) or isinstance(text, list):
            raise invalid("input", "token arrays are not supported; send the text")
        if not isinstance(text, str):
            raise invalid("input", f"input[{index}] must be a string")
        if not text:
            raise invalid("input", f"input[{index}] is empty")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "must be a string")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise invalid("encoding_format", "must be 'float' or 'base64'")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise invalid("dimensions", "must be a positive integer")
    return list(texts), EmbeddingOptions(model, encoding == "base64", dimensions)


# ------------------------------------------------------------------------- the model


def model_id(state: dict[str, Any]) -> str | None:
    """The id ``/v1/models`` shows for the desired state's model (``None``: no model)."""
    source = state.get("model", "None")
    if not isinstance(source, dict) or len(source) != 1:
        return None
    ((variant, data),) = source.items()
    if variant == "LocalToAgent" and isinstance(data, str) and data:
        return data.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or data
    if variant == "Url":
        url = data.get("url") if isinstance(data, dict) else data
        if isinstance(url, str) and url:
            path = unquote(urlparse(url).path).rstrip("/")
            return path.rsplit("/", 1)[-1] or url
    if variant == "HuggingFace" and isinstance(data, dict):
        repo_id, filename = data.get("repo_id"), data.get("filename")
        if isinstance(repo_id, str) and isinstance(filename, str):
            return f"{repo_id}/{filename}"
    return None


# ------------------------------------------------------------------- broker streams


async def _broker(deps: HttpDeps, call: Callable[[AsyncClient], Awaitable[T]]) -> T:
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


def sse(value: Any) -> bytes:
    return f"data: {value if isinstance(value, str) else dumps(value)}\n\n".encode()


SSE_DONE = sse("[DONE]")


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


def finish_reason(usage: Usage, max_tokens: int) -> str:
    return "length" if usage_body(usage)["completion_tokens"] >= max_tokens else "stop"


def head(ident: str, object_name: str, options: Options) -> dict[str, Any]:
    """The fields every completion and chunk starts with."""
    return {"id": ident, "object": object_name, "created": options.created, "model": options.model}


class _Generation:
    """A POST responder of a generation endpoint, streamed or not."""

    object_name = ""
    id_prefix = ""

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    def parse(self, body: Any) -> tuple[dict[str, Any], Options]:
        raise NotImplementedError

    def choice(self, text: str, reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choice(self, piece: str | None, reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_object(self) -> str:
        return self.object_name

    def opening(self, options: Options) -> list[dict[str, Any]]:
        """Choices sent before the first piece."""
        return []

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        request, options = self.parse(await read_json(req, self.deps.max_body_bytes))
        if options.model is None:
            options.model = await served_model_id(self.deps)
        stream = await _broker(self.deps, lambda client: client.submit(request))
        events = guarded(self.deps, req, stream)
        try:
            lead = await self._lead(events)
        except BaseException:
            await events.aclose()
            raise
        if lead is None:  # the client went away while its request waited
            await events.aclose()
            resp.status = 499
            return
        if isinstance(lead[-1], Failed):
            await events.aclose()
            raise failure(lead[-1])
        ident = f"{self.id_prefix}{uuid.uuid4().hex}"
        if options.stream:
            resp.content_type = SSE_CONTENT_TYPE
            resp.set_header("Cache-Control", "no-cache")
            resp.set_header("X-Accel-Buffering", "no")
            resp.stream = ClosingStream(self._chunks(ident, options, request, lead, events), events)
            return
        try:
            text, usage = await self._collect(lead, events)
        finally:
            await events.aclose()
        if usage is None:
            resp.status = 499
            return
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(
            {
                **head(ident, self.object_name, options),
                "choices": [
                    self.choice(options.echo + text, finish_reason(usage, request["max_tokens"]))
                ],
                "usage": usage_body(usage),
            }
        )

    @staticmethod
    async def _lead(events: AsyncGenerator[Event, None]) -> list[Event] | None:
        """The events up to the first that decides the status (not ``Dispatched``);
        ``None`` if the client went away first."""
        lead: list[Event] = []
        async for event in events:
            lead.append(event)
            if not isinstance(event, Dispatched):
                return lead
        return None

    @staticmethod
    async def _collect(
        lead: list[Event], events: AsyncGenerator[Event, None]
    ) -> tuple[str, Usage | None]:
        pieces: list[str] = []
        async with contextlib.aclosing(chain(lead, events)) as everything:
            async for event in everything:
                if isinstance(event, Tokens):
                    pieces.extend(event.pieces)
                elif isinstance(event, Done):
                    return "".join(pieces), event.usage
                elif isinstance(event, Failed):
                    raise failure(event)
        return "".join(pieces), None

    async def _chunks(
        self,
        ident: str,
        options: Options,
        request: dict[str, Any],
        lead: list[Event],
        events: AsyncGenerator[Event, None],
    ) -> AsyncGenerator[bytes, None]:
        base = head(ident, self.chunk_object(), options)
        if options.include_usage:
            base["usage"] = None

        def chunk(choice: dict[str, Any]) -> bytes:
            return sse({**base, "choices": [choice]})

        try:
            for choice in self.opening(options):
                yield chunk(choice)
            async with contextlib.aclosing(chain(lead, events)) as everything:
                async for event in everything:
                    if isinstance(event, Tokens):
                        for piece in event.pieces:
                            if piece:
                                yield chunk(self.chunk_choice(piece, None))
                    elif isinstance(event, Done):
                        reason = finish_reason(event.usage, request["max_tokens"])
                        yield chunk(self.chunk_choice(None, reason))
                        if options.include_usage:
                            yield sse({**base, "choices": [], "usage": usage_body(event.usage)})
                        yield SSE_DONE
                        return
                    elif isinstance(event, Failed):
                        yield sse(failure(event).body())
                        yield SSE_DONE
                        return
        finally:
            await events.aclose()  # cancels the broker request, wherever it is


class ChatCompletions(_Generation):
    object_name = "chat.completion"
    id_prefix = "chatcmpl-"

    def parse(self, body: Any) -> tuple[dict[str, Any], Options]:
        return chat_request(body)

    def chunk_object(self) -> str:
        return "chat.completion.chunk"

    def choice(self, text: str, reason: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": reason,
            "logprobs": None,
        }

    def opening(self, options: Options) -> list[dict[str, Any]]:
        return [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
                "logprobs": None,
            }
        ]

    def chunk_choice(self, piece: str | None, reason: str | None) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": {} if piece is None else {"content": piece},
            "finish_reason": reason,
            "logprobs": None,
        }


class Completions(_Generation):
    object_name = "text_completion"
    id_prefix = "cmpl-"

    def parse(self, body: Any) -> tuple[dict[str, Any], Options]:
        return completion_request(body)

    def choice(self, text: str, reason: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

    def opening(self, options: Options) -> list[dict[str, Any]]:
        if not options.echo:
            return []
        return [self.chunk_choice(options.echo, None)]

    def chunk_choice(self, piece: str | None, reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": piece or "", "finish_reason": reason, "logprobs": None}


# ------------------------------------------------------------------------ embeddings


def encode_base64(vector: list[float]) -> str:
    """OpenAI's ``base64`` embedding: the float32 little-endian array, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class Embeddings:
    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        texts, options = embedding_request(await read_json(req, self.deps.max_body_bytes))
        if options.model is None:
            options.model = await served_model_id(self.deps)
        vectors, prompt_tokens = await self._embed(req, texts)
        if vectors is None:  # the client went away
            resp.status = 499
            return
        width = len(vectors[0]) if vectors else 0
        if options.dimensions is not None and options.dimensions != width:
            raise invalid(
                "dimensions",
                f"this model's embeddings have {width} dimensions; {options.dimensions} "
                "cannot be given",
            )
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(
            {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": index,
                        "embedding": encode_base64(vector) if options.base64 else vector,
                    }
                    for index, vector in enumerate(vectors)
                ],
                "model": options.model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )

    async def _embed(
        self, req: falcon.asgi.Request, texts: list[str]
    ) -> tuple[list[list[float]] | None, int]:
        """One vector per text, in order, with the prompt tokens; the batch fans out
        over the ready agents, one part each (as the inference service does)."""
        documents = [{"id": str(i), "content": text} for i, text in enumerate(texts)]
        results: dict[str, list[float]] = {}
        prompt_tokens = 0
        gone = False

        def left() -> None:
            nonlocal gone
            gone = True

        try:
            client = await self.deps.link.client()
            parts = embed_fanned_out(client, documents, EMBEDDING_NORMALIZATION)
            async with contextlib.aclosing(until_disconnect(req, parts, left)) as events:
                async for _agent, event in events:
                    if isinstance(event, Embedding):
                        document, vector = _embedding_result(event.result)
                        results[document] = vector
                    elif isinstance(event, Done):
                        prompt_tokens += event.usage.prompt_tokens
                    elif isinstance(event, Failed):
                        raise failure(event)
        except BrokerUnreachable:
            await self.deps.link.reset()
            raise
        if gone:
            return None, 0
        missing = [d["id"] for d in documents if d["id"] not in results]
        if missing:
            raise OpenAIError(502, f"the balancer returned no embedding for input[{missing[0]}]")
        return [results[d["id"]] for d in documents], prompt_tokens


def _embedding_result(result: dict[str, Any]) -> tuple[str, list[float]]:
    """``(document id, vector)`` of one ``Embedding`` event; an error for the others."""
    ((variant, data),) = result.items()
    if variant == "Embedding" and isinstance(data, dict):
        return str(data.get("source_document_id")), [float(x) for x in data["embedding"]]
    if variant == "DocumentExceedsBatchSize" and isinstance(data, dict):
        raise invalid(
            "input",
            f"input[{data.get('source_document_id')}] has {data.get('document_tokens')} tokens, "
            f"more than the embedding batch holds ({data.get('embedding_batch_size')}); "
            "shorten it or raise inference_parameters.embedding_batch_size",
        )
    raise OpenAIError(500, f"the embedding failed: {data}", code="embedding_error")


# ---------------------------------------------------------------------------- models


async def served_models(deps: HttpDeps, created: int) -> list[dict[str, Any]]:
    """``/v1/models`` entries: the desired state's model, if any."""
    state = await _broker(deps, lambda client: client.desired_state())
    name = model_id(state)
    if name is None:
        return []
    return [{"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}]


async def served_model_id(deps: HttpDeps) -> str:
    """The id of the model the balancer serves, for requests that name none."""
    state = await _broker(deps, lambda client: client.desired_state())
    return model_id(state) or FALLBACK_MODEL_ID


class Models:
    def __init__(self, deps: HttpDeps, created: int) -> None:
        self.deps = deps
        self.created = created

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps({"object": "list", "data": await served_models(self.deps, self.created)})


class Model:
    def __init__(self, deps: HttpDeps, created: int) -> None:
        self.deps = deps
        self.created = created

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, model: str
    ) -> None:
        for entry in await served_models(self.deps, self.created):
            if entry["id"] == model:
                resp.content_type = falcon.MEDIA_JSON
                resp.text = dumps(entry)
                return
        raise OpenAIError(
            404, f"The model {model!r} does not exist", param="model", code="model_not_found"
        )


def create_app(deps: HttpDeps) -> falcon.asgi.App[Any, Any]:
    app = make_app(deps)
    add_openai_error_handlers(app)
    created = int(time.time())
    app.add_route("/v1/chat/completions", ChatCompletions(deps))
    app.add_route("/v1/completions", Completions(deps))
    app.add_route("/v1/embeddings", Embeddings(deps))
    app.add_route("/v1/models", Models(deps, created))
    app.add_route("/v1/models/{model:path}", Model(deps, created))
    return app


__all__ = ["OpenAIError", "create_app", "model_id"]
