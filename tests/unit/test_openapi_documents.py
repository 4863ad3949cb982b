"""Every HTTP service serves an OpenAPI 3.1 document of exactly what it serves,
generated from the shapes that validate its requests."""

from __future__ import annotations

from typing import Any

import falcon.testing
import pytest
from openapi_spec_validator import validate

from paddler.http import inference, management, openai
from paddler.http.common import HttpDeps
from paddler.protocol.requests import MAX_STOP_STRINGS, MAX_TOKENS_LIMIT
from tests.unit.fake_broker import FakeClient, FakeLink

APPS = {"inference": inference, "management": management, "openai": openai}
METHODS = ("get", "put", "post", "delete", "patch")


def _app(name: str) -> Any:
    deps = HttpDeps(link=FakeLink(FakeClient()))  # type: ignore[arg-type]
    return APPS[name].create_app(deps)


def _served(app: Any) -> set[tuple[str, str]]:
    """``(OpenAPI path, method)`` of every responder in the app's router."""
    served = set()
    nodes = list(app._router._roots)
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.resource is None:
            continue
        path = node.uri_template.replace(":path}", "}")
        for method in METHODS:
            if hasattr(node.resource, f"on_{method}"):
                served.add((path, method))
        if hasattr(node.resource, "on_websocket"):
            served.add((path, "get"))
    return served


@pytest.fixture(params=sorted(APPS))
def service(request: pytest.FixtureRequest) -> tuple[Any, dict[str, Any]]:
    app = _app(request.param)
    result = falcon.testing.TestClient(app).simulate_get("/openapi.json")
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("application/json")
    return app, result.json


def test_the_document_is_valid_openapi_3_1(service) -> None:
    _, document = service
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_the_app_serves_is_documented_and_nothing_else(service) -> None:
    app, document = service
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == _served(app)


def test_templated_paths_declare_their_parameters(service) -> None:
    _, document = service
    for path, item in document["paths"].items():
        for operation in item.values():
            names = {p["name"] for p in operation.get("parameters", [])}
            assert names == {part[1:-1] for part in path.split("/") if part.startswith("{")}


def test_management_routes_are_not_in_the_inference_document() -> None:
    document = falcon.testing.TestClient(_app("inference")).simulate_get("/openapi.json").json
    assert not any(path.startswith(("/api/v1/agents", "/metrics")) for path in document["paths"])


def _body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return document["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]


def test_request_bodies_are_the_validating_shapes_with_their_bounds() -> None:
    document = falcon.testing.TestClient(_app("inference")).simulate_get("/openapi.json").json
    raw = _body_schema(document, "/api/v1/continue_from_raw_prompt")
    assert "raw_prompt" in raw["required"]
    assert raw["additionalProperties"] is False
    max_tokens = raw["properties"]["max_tokens"]
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (1, MAX_TOKENS_LIMIT)
    assert "must be an integer from 1" in max_tokens["description"]
    stop_list = raw["properties"]["stop"]["oneOf"][1]
    assert stop_list["maxItems"] == MAX_STOP_STRINGS
    conversation = _body_schema(document, "/api/v1/continue_from_conversation_history")
    assert "conversation_history" in conversation["required"]


def test_openai_bodies_and_errors_are_documented() -> None:
    document = falcon.testing.TestClient(_app("openai")).simulate_get("/openapi.json").json
    chat = _body_schema(document, "/v1/chat/completions")
    assert "messages" in chat["required"]
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2
    error = document["paths"]["/v1/chat/completions"]["post"]["responses"]["default"]
    schema = error["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/OpenAIErrorBody")


def test_the_desired_state_is_documented_with_its_defaults() -> None:
    document = falcon.testing.TestClient(_app("management")).simulate_get("/openapi.json").json
    put = document["paths"]["/api/v1/balancer_desired_state"]["put"]
    ref = put["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    parameters = document["components"]["schemas"]["InferenceParameters"]
    assert ref.endswith("/DesiredState")
    assert parameters["properties"]["top_k"]["default"] == 80
    assert parameters["properties"]["k_cache_dtype"]["enum"][0] == "F32"
