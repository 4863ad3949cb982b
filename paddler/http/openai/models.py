"""``/v1/models``: the model of the desired state, named as OpenAI clients expect, or
as Anthropic's do when the request has their ``anthropic-version`` header (its
``ModelInfo`` objects, paged with ``after_id``, ``before_id`` and ``limit``). The
API key may come as ``Authorization: Bearer`` or, as Anthropic's SDKs send it, as
``x-api-key`` (checked alike: ``paddler.http.api_keys``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlparse

import falcon
import falcon.asgi

from paddler.errors import BrokerUnreachable
from paddler.http.common import HttpDeps, dumps
from paddler.http.openai.errors import OpenAIError, invalid
from paddler.http.openapi import JSON, Operation, Reply

OWNED_BY = "paddler"
FALLBACK_MODEL_ID = "paddler"


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


async def _desired_state(deps: HttpDeps) -> dict[str, Any]:
    try:
        client = await deps.link.client()
        return await client.desired_state()
    except BrokerUnreachable:
        await deps.link.reset()
        raise


async def served_models(deps: HttpDeps, created: int) -> list[dict[str, Any]]:
    """``/v1/models`` entries: the desired state's model, if any."""
    name = model_id(await _desired_state(deps))
    if name is None:
        return []
    return [{"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}]


async def served_model_id(deps: HttpDeps) -> str:
    """The id of the model the balancer serves, for requests that name none."""
    return model_id(await _desired_state(deps)) or FALLBACK_MODEL_ID


ANTHROPIC_VERSION_HEADER = "anthropic-version"
"""Sent by every Anthropic SDK: the request wants Anthropic's shapes."""
ANTHROPIC_KEY_HEADER = "x-api-key"
"""Anthropic's SDKs send their key in this header: ``/v1/models`` takes it, with or
without ``anthropic-version`` (``Authorization: Bearer`` works too)."""
MAX_ANTHROPIC_PAGE = 1000


def anthropic_model(entry: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI model entry as Anthropic's ``ModelInfo``."""
    created = datetime.fromtimestamp(entry["created"], UTC).isoformat().replace("+00:00", "Z")
    return {
        "type": "model",
        "id": entry["id"],
        "display_name": entry["id"],
        "created_at": created,
        "lifecycle": "active",
    }


def anthropic_page(req: falcon.asgi.Request, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Anthropic's list of models: ``limit`` (1 to 1,000, default 20), ``after_id``
    or ``before_id`` (a model's id) page it; any other parameter is a 400."""
    params = req.params
    for name in params:
        if name not in ("after_id", "before_id", "limit"):
            raise invalid(name, "is not a parameter of models (after_id, before_id, limit)")
    limit_text = params.get("limit", "20")
    if not isinstance(limit_text, str) or not limit_text.isdigit():
        raise invalid("limit", f"must be an integer from 1 to {MAX_ANTHROPIC_PAGE}")
    limit = int(limit_text)
    if not 1 <= limit <= MAX_ANTHROPIC_PAGE:
        raise invalid("limit", f"must be an integer from 1 to {MAX_ANTHROPIC_PAGE}")
    models = [anthropic_model(entry) for entry in entries]
    ids = [model["id"] for model in models]
    after, before = params.get("after_id"), params.get("before_id")
    if after is not None and before is not None:
        raise invalid("before_id", "cannot be used with after_id")
    for name, cursor in (("after_id", after), ("before_id", before)):
        if cursor is not None and cursor not in ids:
            raise invalid(name, f"no model has the id {cursor!r}")
    if before is not None:  # the page that ends just before it
        end = ids.index(before)
        start = max(0, end - limit)
        has_more = start > 0
    else:
        start = ids.index(after) + 1 if after is not None else 0
        end = start + limit
        has_more = end < len(models)
    data = models[start:end]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


class Models:
    API_KEY_HEADER = ANTHROPIC_KEY_HEADER
    OPERATIONS = {
        "get": Operation(
            "The model this balancer serves",
            replies={
                200: Reply(
                    "A list of model objects (Anthropic's ModelInfo list, paged with "
                    "after_id, before_id and limit, with an anthropic-version header)",
                    JSON,
                    {"type": "object"},
                )
            },
        )
    }

    def __init__(self, deps: HttpDeps, created: int) -> None:
        self.deps = deps
        self.created = created

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        entries = await served_models(self.deps, self.created)
        resp.content_type = falcon.MEDIA_JSON
        if req.get_header(ANTHROPIC_VERSION_HEADER) is not None:
            resp.text = dumps(anthropic_page(req, entries))
            return
        resp.text = dumps({"object": "list", "data": entries})


class Model:
    API_KEY_HEADER = ANTHROPIC_KEY_HEADER
    OPERATIONS = {
        "get": Operation(
            "One model, by id",
            replies={
                200: Reply(
                    "A model object (Anthropic's ModelInfo with an anthropic-version header)",
                    JSON,
                    {"type": "object"},
                )
            },
        )
    }

    def __init__(self, deps: HttpDeps, created: int) -> None:
        self.deps = deps
        self.created = created

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, model: str
    ) -> None:
        for entry in await served_models(self.deps, self.created):
            if entry["id"] == model:
                anthropic = req.get_header(ANTHROPIC_VERSION_HEADER) is not None
                resp.content_type = falcon.MEDIA_JSON
                resp.text = dumps(anthropic_model(entry) if anthropic else entry)
                return
        raise OpenAIError(
            404, f"The model {model!r} does not exist", param="model", code="model_not_found"
        )
