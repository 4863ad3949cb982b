"""Through real gunicorn workers, each HTTP address serves the OpenAPI document of
its own routes, and a request that breaks the documented bounds gets the 400 the
document promises."""

from __future__ import annotations

import httpx
from openapi_spec_validator import validate

from paddler.testing.cluster import free_port


def test_each_address_documents_its_own_routes(make_cluster) -> None:
    cluster = make_cluster(compat_openai_addr=f"127.0.0.1:{free_port()}")
    cluster.start_balancer()
    cluster.wait_for_http()
    documents = {}
    for name, url in (
        ("inference", cluster.inference_url),
        ("management", cluster.management_url),
        ("openai", cluster.openai_url),
    ):
        response = httpx.get(f"{url}/openapi.json")
        assert response.status_code == 200, (name, response.text)
        documents[name] = response.json()
        validate(documents[name])
    assert "/api/v1/continue_from_raw_prompt" in documents["inference"]["paths"]
    assert "/api/v1/agents" not in documents["inference"]["paths"]
    assert "/api/v1/agents" in documents["management"]["paths"]
    assert "/v1/chat/completions" in documents["openai"]["paths"]

    schemas = documents["inference"]["components"]["schemas"]
    limit = schemas["RawPromptRequest"]["properties"]["max_tokens"]["maximum"]
    too_many = httpx.post(
        f"{cluster.inference_url}/api/v1/continue_from_raw_prompt",
        json={"raw_prompt": "x", "max_tokens": limit + 1},
    )
    assert too_many.status_code == 400
    assert too_many.json()["field"] == "max_tokens"
