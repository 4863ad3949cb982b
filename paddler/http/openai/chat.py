"""``POST /v1/chat/completions``."""

from __future__ import annotations

from typing import Any

from paddler.http.openai.errors import invalid_body
from paddler.http.openai.schemas import ChatCompletionBody, Options
from paddler.http.openai.streaming import Answer, Generation
from paddler.http.openapi import JSON, Operation, Reply
from paddler.protocol.shapes import check
from paddler.protocol.tool_calls import ToolCall


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

    def choice(self, answer: Answer, text: str, reason: str, logprobs: bool) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not answer.tool_calls else None,
            "refusal": None,
        }
        if answer.reasoning:
            message["reasoning_content"] = answer.reasoning
        if answer.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in answer.tool_calls
            ]
        if answer.tool_call_errors:
            message["tool_call_errors"] = answer.tool_call_errors
        return {
            "index": 0,
            "message": message,
            "finish_reason": reason,
            "logprobs": _chat_logprobs(answer.logprobs if logprobs else None),
        }

    def tool_call_chunk_choices(self, calls: list[ToolCall], first: int) -> list[dict[str, Any]]:
        """As OpenAI streams a call: its id, type and name with empty arguments, then
        the arguments."""
        choices: list[dict[str, Any]] = []
        for index, call in enumerate(calls, first):
            opening = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            arguments = {"index": index, "function": {"arguments": call.arguments_json}}
            for delta in (opening, arguments):
                choices.append(
                    {
                        "index": 0,
                        "delta": {"tool_calls": [delta]},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                )
        return choices

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
