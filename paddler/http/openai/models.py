"""``/v1/models``: the model of the desired state, named as OpenAI clients expect."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

import falcon
import falcon.asgi

from paddler.errors import BrokerUnreachable
from paddler.http.common import HttpDeps, dumps
from paddler.http.openai.errors import OpenAIError
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


class Models:
    OPERATIONS = {
        "get": Operation(
            "The model this balancer serves",
            replies={200: Reply("A list of model objects", JSON, {"type": "object"})},
        )
    }

    def __init__(self, deps: HttpDeps, created: int) -> None:
        self.deps = deps
        self.created = created

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps({"object": "list", "data": await served_models(self.deps, self.created)})


class Model:
    OPERATIONS = {
        "get": Operation(
            "One model, by id",
            replies={200: Reply("A model object", JSON, {"type": "object"})},
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
                resp.content_type = falcon.MEDIA_JSON
                resp.text = dumps(entry)
                return
        raise OpenAIError(
            404, f"The model {model!r} does not exist", param="model", code="model_not_found"
        )
