"""``POST /v1/embeddings``: the batch fans out over the ready agents."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
from collections.abc import AsyncGenerator
from typing import Annotated, Any, ClassVar, Literal

import falcon
import falcon.asgi
from pydantic import Discriminator, Field

from paddler.client import Done, Embedding, Failed
from paddler.errors import BrokerUnreachable
from paddler.http.common import HttpDeps, dumps, read_json, until_disconnect
from paddler.http.fanout import embed_fanned_out
from paddler.http.openai.errors import OpenAIError, failure, invalid, invalid_body
from paddler.http.openai.models import served_model_id
from paddler.http.openai.schemas import ModelName, OpenAIShape, Text, _text_or_list
from paddler.http.openapi import JSON, Operation, Reply
from paddler.protocol.requests import MAX_DOCUMENTS
from paddler.protocol.shapes import Says, check, member_tag

EMBEDDING_NORMALIZATION = "L2"
"""OpenAI's embeddings have unit length."""


def encode_base64(vector: list[float]) -> str:
    """OpenAI's ``base64`` embedding: the float32 little-endian array, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def embeddings_body(
    vectors: list[list[float]], as_base64: bool, model: str, usage: dict[str, int]
) -> AsyncGenerator[bytes, None]:
    """The JSON of OpenAI's embeddings list, byte for byte what ``dumps`` makes of
    ``{"object": "list", "data": [...], "model": ..., "usage": ...}``, written out one
    embedding per chunk: a large answer is never one string, and the event loop serves
    others between chunks."""
    yield b'{"object":"list","data":['
    for index, vector in enumerate(vectors):
        item = {
            "object": "embedding",
            "index": index,
            "embedding": encode_base64(vector) if as_base64 else vector,
        }
        yield (("," if index else "") + dumps(item)).encode()
        await asyncio.sleep(0)  # let the loop serve others between large chunks
    yield f'],"model":{dumps(model)},"usage":{dumps(usage)}}}'.encode()


INPUT_MESSAGE = (
    f"must be a string or a non-empty list of at most {MAX_DOCUMENTS} non-empty strings "
    "(token arrays are not supported; send the text)"
)


class EmbeddingsBody(OpenAIShape):
    """``POST /v1/embeddings``."""

    ROOT: ClassVar[str] = "body"
    SAYS: ClassVar[str] = "the request body must be a JSON object"

    input: Annotated[
        Annotated[str, Field(min_length=1), member_tag("~text")]
        | Annotated[
            list[Annotated[str, Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_DOCUMENTS),
            member_tag("~list"),
        ],
        Discriminator(_text_or_list),
        Says(INPUT_MESSAGE, whole=True),
    ]
    model: ModelName | None = None
    encoding_format: (
        Annotated[Literal["float", "base64"], Says("must be 'float' or 'base64'")] | None
    ) = None
    dimensions: Annotated[int, Field(ge=1), Says("must be a positive integer")] | None = None
    user: Text | None = None
    """Names the end user for OpenAI's abuse monitoring; nothing here reads it."""

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embeddings:
    OPERATIONS = {
        "post": Operation(
            "Embed one or more texts",
            EmbeddingsBody,
            {200: Reply("A list of embedding objects", JSON, {"type": "object"})},
        )
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = check(EmbeddingsBody, await read_json(req, self.deps.max_body_bytes), invalid_body)
        model = body.model if body.model is not None else await served_model_id(self.deps)
        vectors, prompt_tokens = await self._embed(req, body.texts)
        if vectors is None:  # the client went away
            resp.status = 499
            return
        width = len(vectors[0]) if vectors else 0
        if body.dimensions is not None and body.dimensions != width:
            raise invalid(
                "dimensions",
                f"this model's embeddings have {width} dimensions; {body.dimensions} "
                "cannot be given",
            )
        resp.content_type = falcon.MEDIA_JSON
        resp.stream = embeddings_body(
            vectors,
            body.encoding_format == "base64",
            model,
            {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
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
