"""OpenAPI 3.1 documents of the HTTP services, generated from what they serve.

Every route an app serves is found in its Falcon router; every ``on_<method>``
responder of its resource is one operation. A resource describes its operations
in ``OPERATIONS`` (summary, request body shape, responses); the schemas are the
JSON Schemas pydantic derives from the same shapes that validate the requests,
so the document cannot say something the service does not do. Each service
serves its own document at ``GET /openapi.json``.

With API keys on, the document declares a bearer ``securitySchemes`` entry, and
``security`` with a 401 answer on every operation that needs a key (all but
``/health`` and ``/openapi.json``, which stay open so a client can discover the API);
a route that also takes its key in a header (``x-api-key`` on ``/v1/messages``
and ``/v1/models``)
declares that header's ``apiKey`` scheme as the other choice. An operation whose
errors are in another envelope than its service's says so (``Operation.error``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import falcon
import falcon.asgi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from paddler import __version__
from paddler.http.api_keys import KEY_HEADER, OPEN_WITHOUT_API_KEY, REQUIRED_IN_CONTEXT

OPENAPI_VERSION = "3.1.0"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")
SECURITY_SCHEME = "bearer"
BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": (
        "An API key of this service: Authorization: Bearer <key>. On the inference "
        "WebSocket a browser may offer the subprotocols paddler and paddler.bearer.<key> "
        "instead."
    ),
}


@dataclass(frozen=True)
class Reply:
    """One response of an operation: a description and, if it has a body, its media
    type with a shape (or a JSON Schema written out where no shape exists)."""

    description: str
    media_type: str | None = None
    shape: type[BaseModel] | dict[str, Any] | None = None


@dataclass(frozen=True)
class Operation:
    summary: str
    body: type[BaseModel] | None = None
    replies: dict[int, Reply] = field(default_factory=dict)
    description: str | None = None
    error: Reply | None = None
    """The body of its 4xx/5xx answers, where it is not the service's."""


JSON = "application/json"
HEALTH = Operation("Liveness: always OK", replies={200: Reply("OK", "text/plain")})
OPENAPI = Operation(
    "This document", replies={200: Reply("The OpenAPI 3.1 document of this service", JSON)}
)


def routes(app: falcon.asgi.App[Any, Any]) -> Iterator[tuple[str, Any]]:
    """``(uri template, resource)`` of every route ``app`` serves."""
    nodes: list[Any] = list(app._router._roots)
    while nodes:
        node = nodes.pop(0)
        if node.resource is not None:
            yield str(node.uri_template), node.resource
        nodes.extend(node.children)


def served_methods(resource: Any) -> list[str]:
    return [m for m in METHODS if callable(getattr(resource, f"on_{m}", None))] + (
        ["get"] if callable(getattr(resource, "on_websocket", None)) else []
    )


def openapi_path(template: str) -> tuple[str, list[str]]:
    """OpenAPI's path for a Falcon URI template (converters dropped), and its fields."""
    names = _FIELD.findall(template)
    return _FIELD.sub(lambda m: "{" + m.group(1) + "}", template), names


def _operation_of(resource: Any, method: str) -> Operation:
    declared = getattr(resource, "OPERATIONS", {})
    if method in declared:
        return declared[method]  # type: ignore[no-any-return]
    doc = (type(resource).__doc__ or type(resource).__name__).strip().split("\n")[0]
    return Operation(doc, replies={200: Reply("Success")})


def document(
    app: falcon.asgi.App[Any, Any],
    title: str,
    error: Reply,
    description: str = "",
    secured: bool = False,
) -> dict[str, Any]:
    """The OpenAPI document of ``app``; ``error`` is the body of its 4xx/5xx answers;
    ``secured``: the service requires API keys."""
    shapes: list[type[BaseModel]] = []
    plan: list[tuple[str, list[str], str, Operation, bool, str | None]] = []
    key_headers: list[str] = []
    for template, resource in routes(app):
        path, names = openapi_path(template)
        key_header = getattr(resource, KEY_HEADER, None) if secured else None
        if key_header is not None:
            key_headers.append(key_header)
        for method in served_methods(resource):
            operation = _operation_of(resource, method)
            needs_key = secured and not getattr(resource, OPEN_WITHOUT_API_KEY, False)
            plan.append((path, names, method, operation, needs_key, key_header))
            if operation.body is not None:
                shapes.append(operation.body)
            shapes.extend(
                r.shape
                for r in [*operation.replies.values(), operation.error or error]
                if isinstance(r.shape, type) and issubclass(r.shape, BaseModel)
            )
    if isinstance(error.shape, type):
        shapes.append(error.shape)
    unique = list(dict.fromkeys(shapes))
    refs, definitions = models_json_schema(
        [(shape, "validation") for shape in unique],
        ref_template="#/components/schemas/{model}",
    )

    def content(media_type: str, shape: Any) -> dict[str, Any]:
        if isinstance(shape, type):
            return {media_type: {"schema": refs[(shape, "validation")]}}
        return {media_type: {"schema": shape if shape is not None else {}}}

    paths: dict[str, dict[str, Any]] = {}
    for path, names, method, operation, needs_key, key_header in sorted(
        plan, key=lambda p: (p[0], p[2])
    ):
        entry: dict[str, Any] = {
            "summary": operation.summary,
            "operationId": _operation_id(method, path),
            "responses": {},
        }
        if operation.description:
            entry["description"] = operation.description
        if names:
            entry["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in names
            ]
        if operation.body is not None:
            entry["requestBody"] = {"required": True, "content": content(JSON, operation.body)}
        for status, reply in sorted(operation.replies.items()):
            answer: dict[str, Any] = {"description": reply.description}
            if reply.media_type is not None:
                answer["content"] = content(reply.media_type, reply.shape)
            entry["responses"][str(status)] = answer
        own_error = operation.error or error
        failure: dict[str, Any] = {"description": own_error.description}
        if own_error.media_type is not None:
            failure["content"] = content(own_error.media_type, own_error.shape)
        if needs_key:
            entry["security"] = [{SECURITY_SCHEME: []}]
            if key_header is not None:
                entry["security"].append({key_header: []})
            entry["responses"].setdefault(
                "401", {**failure, "description": "No API key, or a wrong one"}
            )
        entry["responses"].setdefault("default", failure)
        paths.setdefault(path, {})[method] = entry
    components: dict[str, Any] = {"schemas": definitions.get("$defs", {})}
    if secured:
        components["securitySchemes"] = {SECURITY_SCHEME: BEARER_SCHEME}
        for name in key_headers:
            components["securitySchemes"][name] = {
                "type": "apiKey",
                "in": "header",
                "name": name,
                "description": f"An API key of this service in the header {name}: <key>",
            }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": __version__, "description": description},
        "paths": paths,
        "components": components,
    }


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")
    return f"{method}_{words or 'root'}"


class OpenApiDocument:
    """``GET /openapi.json``: the document of the app this resource is routed in,
    built on the first request (when every route exists) and kept. Open without an
    API key: a client learns from it that it needs one."""

    OPERATIONS = {"get": OPENAPI}
    OPEN_WITHOUT_API_KEY = True

    def __init__(self, app: falcon.asgi.App[Any, Any], title: str, error: Reply) -> None:
        self.app = app
        self.title = title
        self.error = error
        self._text: str | None = None

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if self._text is None:
            secured = bool(getattr(req.context, REQUIRED_IN_CONTEXT, False))
            self._text = json.dumps(document(self.app, self.title, self.error, secured=secured))
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self._text
