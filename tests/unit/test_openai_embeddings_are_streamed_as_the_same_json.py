"""``POST /v1/embeddings`` writes its answer out in chunks (one per embedding, no
``Content-Length``: chunked on the wire) instead of building one large string on the
event loop, and the JSON is the same as before, byte for byte. Driven as a raw ASGI
app (to see every body chunk) with a fake broker client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from paddler.client import Done, Embedding
from paddler.http import openai
from paddler.http.common import HttpDeps, dumps
from paddler.http.openai.embeddings import encode_base64
from paddler.protocol.messages import Usage
from tests.unit.fake_broker import FakeClient, FakeLink

VECTORS = [[0.6, 0.8, 0.0], [0.0, -1.0, 0.0], [0.28, 0.96, 0.0], [1e-9, 0.0, 1.0]]


def _embedded(document: str, vector: list[float]) -> Embedding:
    return Embedding(
        {
            "Embedding": {
                "embedding": vector,
                "normalization_method": "L2",
                "pooling_type": "Last",
                "source_document_id": document,
            }
        }
    )


async def _post(app: Any, body: dict[str, Any]) -> tuple[int, dict[str, str], list[bytes]]:
    """Status, headers and every body chunk the app sent."""
    payload = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/embeddings",
        "raw_path": b"/v1/embeddings",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    incoming = [{"type": "http.request", "body": payload, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.Future()  # the client stays: no disconnect
        raise AssertionError

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    await app(scope, receive, send)
    start = next(e for e in sent if e["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    chunks = [e.get("body", b"") for e in sent if e["type"] == "http.response.body"]
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
    return start["status"], headers, [chunk for chunk in chunks if chunk]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_a_multi_document_answer_is_chunked_and_the_same_json(encoding_format: str) -> None:
    fake = FakeClient({"model": {"LocalToAgent": "/models/tiny.gguf"}})
    fake.agent_list = [{"id": "agent-x", "name": "a1", "slots_total": 2, "ready": True}]
    # out of order, as agents answer; the answer is in input order
    fake.script.append(
        [_embedded(str(i), VECTORS[i]) for i in (2, 0, 3, 1)] + [Done(Usage(prompt_tokens=9))]
    )
    app = openai.create_app(HttpDeps(link=FakeLink(fake)))  # type: ignore[arg-type]
    body = {"model": "emb", "input": ["a", "b", "c", "d"], "encoding_format": encoding_format}

    status, headers, chunks = asyncio.run(asyncio.wait_for(_post(app, body), 10))

    assert status == 200
    assert headers["content-type"] == "application/json"
    assert "content-length" not in headers  # streamed: chunked on the wire
    assert len(chunks) >= len(VECTORS)  # an embedding per chunk, never one big string
    as_base64 = encoding_format == "base64"
    before = dumps(  # what the service answered when it built the whole string
        {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": encode_base64(vector) if as_base64 else vector,
                }
                for index, vector in enumerate(VECTORS)
            ],
            "model": "emb",
            "usage": {"prompt_tokens": 9, "total_tokens": 9},
        }
    )
    assert b"".join(chunks) == before.encode()
    assert json.loads(b"".join(chunks)) == json.loads(before)
