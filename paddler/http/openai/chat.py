"""``POST /v1/chat/completions``."""

from __future__ import annotations

from typing import Any

from paddler.http.openai.errors import invalid_body
from paddler.http.openai.schemas import ChatCompletionBody, Options
from paddler.http.openai.streaming import Generation
from paddler.http.openapi import JSON, Operation, Reply
from paddler.protocol.shapes import check


class ChatCompletions(Generation):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    OPERATIONS = {
        "post": Operation(
            "Create a chat completion",
            ChatCompletionBody,
            {
                200: Reply(
                    "A chat.completion object; with stream: true, server-sent "
                    "chat.completion.chunk events ending with data: [DONE]",
                    JSON,
                    {"type": "object"},
                )
            },
        )
    }

    def parse(self, body: Any) -> tuple[dict[str, Any], Options]:
        chat = check(ChatCompletionBody, body, invalid_body)
        return chat.to_request(), chat.options()

    def choice(
        self,
        text: str,
        reason: str,
        logprobs: list[dict[str, Any]] | None = None,
        reasoning: str = "",
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if reasoning:
            message["reasoning_content"] = reasoning
        return {
            "index": 0,
            "message": message,
            "finish_reason": reason,
            "logprobs": _chat_logprobs(logprobs),
        }

    def reasoning_chunk_choice(self, piece: str) -> dict[str, Any] | None:
        return {
            "index": 0,
            "delta": {"reasoning_content": piece},
            "finish_reason": None,
            "logprobs": None,
        }

    def opening(self, options: Options) -> list[dict[str, Any]]:
        return [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
                "logprobs": None,
            }
        ]

    def chunk_choice(
        self, piece: str | None, reason: str | None, logprobs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": {} if piece is None else {"content": piece},
            "finish_reason": reason,
            "logprobs": _chat_logprobs(logprobs),
        }


def _chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Chat's ``logprobs`` of a choice: the entries as they are (``None``: not asked)."""
    return None if entries is None else {"content": entries, "refusal": None}
