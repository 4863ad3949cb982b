"""The OpenAI-compatible service: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/v1/models``, in OpenAI's shapes, so that the official
``openai`` package works unchanged against ``base_url=http://host:port/v1``.

- ``errors``: OpenAI's error envelope and the mapping of paddler's errors to it;
- ``schemas``: the request bodies as shapes, and their broker requests;
- ``streaming``: the status-deciding wait, usage and SSE chunks of generations;
- ``chat``, ``completions``, ``embeddings``, ``models``: one endpoint each;
- ``responses`` (with ``responses_body`` and ``items``): OpenAI's Responses API, its
  responses kept by the balancer; ``conversations``: its Conversations API;
- ``anthropic`` (with ``anthropic_body``): Anthropic's Messages API.
"""

from __future__ import annotations

import time
from typing import Any

import falcon.asgi

from paddler.http.common import HttpDeps, make_app
from paddler.http.openai.anthropic import add_messages_api
from paddler.http.openai.chat import ChatCompletions
from paddler.http.openai.completions import Completions
from paddler.http.openai.conversations import add_conversations_api
from paddler.http.openai.embeddings import Embeddings
from paddler.http.openai.errors import ERROR_REPLY, OpenAIError, add_openai_error_handlers
from paddler.http.openai.models import Model, Models, model_id
from paddler.http.openai.responses import (
    CancelResponse,
    InputItems,
    InputTokens,
    Responses,
    StoredResponse,
)
from paddler.http.openapi import OpenApiDocument


def create_app(deps: HttpDeps) -> falcon.asgi.App[Any, Any]:
    app = make_app(deps)
    add_openai_error_handlers(app)
    created = int(time.time())
    app.add_route("/v1/chat/completions", ChatCompletions(deps))
    app.add_route("/v1/completions", Completions(deps))
    app.add_route("/v1/responses", Responses(deps))
    app.add_route("/v1/responses/input_tokens", InputTokens(deps))
    app.add_route("/v1/responses/{response_id}", StoredResponse(deps))
    app.add_route("/v1/responses/{response_id}/input_items", InputItems(deps))
    app.add_route("/v1/responses/{response_id}/cancel", CancelResponse(deps))
    app.add_route("/v1/embeddings", Embeddings(deps))
    app.add_route("/v1/models", Models(deps, created))
    app.add_route("/v1/models/{model:path}", Model(deps, created))
    add_conversations_api(app, deps)
    add_messages_api(app, deps)  # Anthropic's Messages API
    app.add_route("/openapi.json", OpenApiDocument(app, "paddler OpenAI-compatible", ERROR_REPLY))
    return app


__all__ = ["OpenAIError", "create_app", "model_id"]
