"""Paddler's response envelopes (NDJSON lines and WebSocket messages) from the
events of ``paddler.client``."""

from __future__ import annotations

from typing import Any

from paddler.client import (
    Done,
    Embedding,
    Event,
    Failed,
    Reasoning,
    Tokens,
    ToolCalls,
    ToolCallText,
)
from paddler.http.common import dumps

TOKEN_ERROR_KINDS = frozenset(
    {
        "ChatTemplateError",
        "GrammarSyntaxError",
        "GrammarInitializationFailed",
        "GrammarRejectedModelOutput",
        "GrammarIncompatibleWithThinking",
        "ImageDecodingFailed",
        "MultimodalNotSupported",
        "SamplerError",
        "TokenGenerationDisabled",
        "DetokenizationFailed",
    }
)
"""Errors Paddler reports as a terminal ``GeneratedToken`` variant; all others are
``Error`` envelopes with an HTTP-like code."""


def response(request_id: str, agent: str | None, value: Any) -> dict[str, Any]:
    return {"Response": {"generated_by": agent, "request_id": request_id, "response": value}}


def error(request_id: str, code: int, description: str) -> dict[str, Any]:
    return {
        "Error": {"request_id": request_id, "error": {"code": code, "description": description}}
    }


def generation_messages(request_id: str, agent: str | None, event: Event) -> list[dict[str, Any]]:
    """The envelopes of one event of a generation request (none for ``Dispatched``)."""
    if isinstance(event, Tokens):
        return [
            response(request_id, agent, {"GeneratedToken": {"ContentToken": piece}})
            for piece in event.pieces
        ]
    if isinstance(event, Reasoning):
        return [
            response(request_id, agent, {"GeneratedToken": {"ReasoningToken": piece}})
            for piece in event.pieces
        ]
    if isinstance(event, ToolCallText):
        return [
            response(request_id, agent, {"GeneratedToken": {"ToolCallToken": piece}})
            for piece in event.pieces
        ]
    if isinstance(event, ToolCalls):
        return [response(request_id, agent, {"GeneratedToken": event.outcome.native()})]
    if isinstance(event, Done):
        usage = event.usage.to_body()
        return [response(request_id, agent, {"GeneratedToken": {"Done": {"usage": usage}}})]
    if isinstance(event, Failed):
        if event.kind in TOKEN_ERROR_KINDS:
            return [
                response(request_id, agent, {"GeneratedToken": {event.kind: event.description}})
            ]
        return [error(request_id, event.code, event.description)]
    return []


def embedding_messages(request_id: str, agent: str | None, event: Event) -> list[dict[str, Any]]:
    """The envelopes of one event of an embedding request (``Done`` is sent once, by
    the caller, after every part of a fanned-out batch ended)."""
    if isinstance(event, Embedding):
        return [response(request_id, agent, {"Embedding": event.result})]
    if isinstance(event, Failed):
        if event.kind == "EmbeddingsDisabled":
            return [response(request_id, agent, {"Embedding": "EmbeddingsDisabled"})]
        if event.code in (502, 503, 504):
            return [error(request_id, event.code, event.description)]
        return [response(request_id, agent, {"Embedding": {"Error": event.description}})]
    return []


def line(message: dict[str, Any]) -> bytes:
    return (dumps(message) + "\n").encode()
