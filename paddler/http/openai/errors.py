"""Errors in OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re
from typing import Any

import falcon
import falcon.asgi
from pydantic import BaseModel

from paddler.client import Failed
from paddler.errors import BrokerUnreachable, ConfigurationError, InvalidRequest, RequestFailed
from paddler.http.api_keys import UNAUTHORIZED_CLOSE_CODE, Unauthorized
from paddler.http.common import BodyTooLarge, dumps
from paddler.http.openapi import JSON, Reply

RETRY_AFTER_S = "1"
ERROR_CODES = {"PromptTooLong": "context_length_exceeded"}
"""OpenAI's codes where it has one; otherwise the snake_case of the broker's kind."""


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    """``invalid_request_error`` (4xx) or ``server_error`` (5xx)."""
    param: str | None
    """The request field at fault, if one is."""
    code: str | None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error envelope."""

    error: OpenAIErrorDetail


ERROR_REPLY = Reply("An error in OpenAI's envelope", JSON, OpenAIErrorBody)


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
        challenge: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after = retry_after
        self.challenge = challenge
        """``WWW-Authenticate`` of a 401."""

    def body(self) -> dict[str, Any]:
        detail = OpenAIErrorDetail(
            message=self.message, type=self.kind, param=self.param, code=self.code
        )
        return OpenAIErrorBody(error=detail).model_dump()


def invalid(param: str | None, message: str) -> OpenAIError:
    """A 400 naming the OpenAI request field at fault (``None``: the body itself)."""
    text = f"{param}: {message}" if param else message
    return OpenAIError(400, text, param=param)


def invalid_body(field: str, message: str) -> OpenAIError:
    """A shape error of a request body as OpenAI's 400 (the body itself has no ``param``)."""
    return invalid(None if field == "body" else field, message)


def refuse_fields(raw: Any, names: tuple[str, ...], message: str) -> None:
    """A 400 naming the first of ``names`` that the body ``raw`` has."""
    if isinstance(raw, dict):
        for name in names:
            if name in raw:
                raise invalid_body(name, message)


def unauthorized(ex: Unauthorized) -> OpenAIError:
    """A missing or wrong API key as OpenAI answers it: 401, ``invalid_api_key``."""
    if ex.presented:
        message = "Incorrect API key provided."
    else:
        message = (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    return OpenAIError(401, message, code="invalid_api_key", challenge=ex.challenge)


def snake_case(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


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


ENVELOPE = "error_envelope"
"""A ``req.context`` attribute: for a route whose API has an error envelope of its
own (Anthropic's on ``/v1/messages``), the function that gives an error's body in
it, ``envelope(req, error)``; OpenAI's envelope when it is not set."""


def _error_text(req: Any, error: OpenAIError) -> str:
    envelope = getattr(req.context, ENVELOPE, None)
    return dumps(error.body() if envelope is None else envelope(req, error))


def _write_error(req: Any, resp: falcon.asgi.Response, error: OpenAIError) -> None:
    resp.status = error.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = _error_text(req, error)
    if error.retry_after is not None:
        resp.set_header("Retry-After", error.retry_after)
    if error.challenge is not None:
        resp.set_header("WWW-Authenticate", error.challenge)


def _param_of(field_name: str) -> str | None:
    return None if field_name in ("body", "request") else field_name


def add_openai_error_handlers(app: falcon.asgi.App[Any, Any]) -> None:
    """OpenAI's envelope for every error, replacing Paddler's ``{"error", "field"}``."""

    async def openai_error(req: Any, resp: Any, ex: OpenAIError, params: Any) -> None:
        _write_error(req, resp, ex)

    async def invalid_request(req: Any, resp: Any, ex: InvalidRequest, params: Any) -> None:
        _write_error(req, resp, OpenAIError(400, str(ex), param=_param_of(ex.field)))

    async def invalid_configuration(
        req: Any, resp: Any, ex: ConfigurationError, params: Any
    ) -> None:
        _write_error(req, resp, OpenAIError(400, str(ex), param=_param_of(ex.field)))

    async def too_large(req: Any, resp: Any, ex: BodyTooLarge, params: Any) -> None:
        _write_error(req, resp, OpenAIError(413, str(ex), code="request_too_large"))

    async def unreachable(req: Any, resp: Any, ex: BrokerUnreachable, params: Any) -> None:
        error = OpenAIError(
            503,
            f"the balancer is not answering: {ex}",
            code="balancer_unreachable",
            retry_after=RETRY_AFTER_S,
        )
        _write_error(req, resp, error)

    async def request_failed(req: Any, resp: Any, ex: RequestFailed, params: Any) -> None:
        _write_error(req, resp, failure(Failed(ex.code, ex.kind, ex.description)))

    async def missing_or_wrong_key(
        req: Any, resp: Any, ex: Unauthorized, params: Any, ws: Any = None
    ) -> None:
        if ws is not None:
            await ws.close(UNAUTHORIZED_CLOSE_CODE)
            return
        _write_error(req, resp, unauthorized(ex))

    def serialize(req: Any, resp: Any, ex: falcon.HTTPError) -> None:
        message = ex.title if not ex.description else f"{ex.title}: {ex.description}"
        if ex.status_code == 404:
            message = f"Unknown request URL: {req.method} {req.path}"
        elif ex.status_code == 405:
            message = f"{req.method} is not allowed on {req.path}"
        error = OpenAIError(ex.status_code, message, code=snake_case(type(ex).__name__[4:]))
        resp.content_type = falcon.MEDIA_JSON
        resp.text = _error_text(req, error)

    app.add_error_handler(OpenAIError, openai_error)
    app.add_error_handler(InvalidRequest, invalid_request)
    app.add_error_handler(ConfigurationError, invalid_configuration)
    app.add_error_handler(BodyTooLarge, too_large)
    app.add_error_handler(BrokerUnreachable, unreachable)
    app.add_error_handler(RequestFailed, request_failed)
    app.add_error_handler(Unauthorized, missing_or_wrong_key)
    app.set_error_serializer(serialize)
