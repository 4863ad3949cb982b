"""Embeddings: a second context on the loaded model with pooled embeddings on.

One document per decode, the whole document in one micro-batch (pooling needs it).
Every document's result goes out as soon as it is computed.

An embedding request is an ``EmbeddingJob`` that the engine advances by one document
per step (``EmbeddingJob.advance``: at most one ``llama_decode`` of at most
``embedding_batch_size`` tokens), between the decode steps of the generating slots:
a batch of a thousand documents never pauses a concurrent stream for more than the
one document of each step. ``embed_documents`` runs a job to its end at once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from paddler._core import BatchBuilder
from paddler.agent.engine import EventSink
from paddler.agent.llama.native import POOLING_TYPES, LlamaBatch, LlamaContext, LlamaModel


def normalize(vector: list[float], method: Any) -> list[float]:
    """``None``, ``L2`` (unit length) or ``{"RmsNorm": {"epsilon": e}}`` (unit RMS)."""
    if method == "L2":
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector] if norm > 0 else vector
    if isinstance(method, dict) and "RmsNorm" in method:
        epsilon = method["RmsNorm"]["epsilon"]
        scale = 1.0 / math.sqrt(sum(v * v for v in vector) / max(len(vector), 1) + epsilon)
        return [v * scale for v in vector]
    return vector


class Embedder:
    """An embedding context and its batch on ``model``; ``size`` is the most tokens
    a document may have. Raises ``EngineError`` when llama.cpp cannot create it."""

    def __init__(self, model: LlamaModel, parameters: dict[str, Any], n_threads: int) -> None:
        self.model = model
        self.pooling_name = parameters["pooling_type"]
        size = max(parameters["embedding_batch_size"], 16)
        with contextlib.ExitStack() as stack:
            self.context = stack.enter_context(
                LlamaContext(
                    model,
                    n_ctx=max(size, 256),
                    n_batch=size,
                    n_ubatch=size,
                    n_seq_max=1,
                    n_threads=n_threads,
                    embeddings=True,
                    pooling_type=POOLING_TYPES[self.pooling_name],
                    purpose="an embedding context",
                )
            )
            self.size = self.context.n_ubatch
            self.batch = stack.enter_context(LlamaBatch(self.size))
            self.builder = BatchBuilder(self.batch.struct, self.size)
            self._handles = stack.pop_all()
        self.decodes = 0
        """``llama_decode`` (or ``llama_encode``) calls made so far."""

    def embed(self, tokens: list[int]) -> list[float] | None:
        """The pooled embedding of one document (at most ``size`` tokens), ``None`` on
        a native failure."""
        self.context.clear()
        self.builder.clear()
        for position, token in enumerate(tokens):
            self.builder.add(token, position, 0, True)
        run = self.context.encode if self.model.has_encoder else self.context.decode
        self.decodes += 1
        if run(self.batch) != 0:
            return None
        return self.context.pooled_embedding(0, len(tokens) - 1, self.model.n_embd)

    def close(self) -> None:
        """Free the batch, then the context (the model is not this embedder's)."""
        self._handles.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddingJob:
    """One embedding request in progress: its documents are embedded one per
    ``advance``, each result sent at once, then the request ends with its usage."""

    def __init__(self, request_id: int, request: dict[str, Any]) -> None:
        self.request_id = request_id
        self.documents: list[dict[str, Any]] = request["input_batch"]
        self.method: Any = request["normalization_method"]
        self.next_document = 0
        """The index of the document the next ``advance`` embeds."""
        self.prompt_tokens = 0
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return self.next_document >= len(self.documents)

    def advance(self, sink: EventSink, embedder: Embedder) -> bool:
        """Embed the next document (one decode at most) and send its result; when no
        document is left, end the request with its usage. ``True`` once it ended."""
        if not self.finished:
            document = self.documents[self.next_document]
            self.next_document += 1
            self._embed_one(sink, embedder, document)
        if not self.finished:
            return False
        sink.done(self.request_id, {"prompt_tokens": self.prompt_tokens})
        return True

    def _embed_one(self, sink: EventSink, embedder: Embedder, document: dict[str, Any]) -> None:
        request_id = self.request_id
        tokens = embedder.model.tokenize(document["content"], add_special=True)
        if len(tokens) > embedder.size:
            sink.embedding(
                request_id,
                {
                    "DocumentExceedsBatchSize": {
                        "document_tokens": len(tokens),
                        "embedding_batch_size": embedder.size,
                        "source_document_id": document["id"],
                    }
                },
            )
            return
        vector = embedder.embed(tokens)
        if vector is None:
            sink.embedding(request_id, {"Error": f"document {document['id']!r} failed"})
            return
        self.prompt_tokens += len(tokens)
        sink.embedding(
            request_id,
            {
                "Embedding": {
                    "embedding": normalize(vector, self.method),
                    "normalization_method": self.method,
                    "pooling_type": embedder.pooling_name,
                    "source_document_id": document["id"],
                }
            },
        )


def embed_documents(
    sink: EventSink, embedder: Embedder, request_id: int, request: dict[str, Any]
) -> None:
    """Embed every document of an embedding request at once, then end it with its
    usage (the engine advances an ``EmbeddingJob`` one document per step instead)."""
    job = EmbeddingJob(request_id, request)
    while not job.advance(sink, embedder):
        pass
