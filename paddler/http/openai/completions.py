"""``POST /v1/completions`` (OpenAI's legacy text completions)."""

from __future__ import annotations

from typing import Any

from paddler.http.openai.errors import invalid_body
from paddler.http.openai.schemas import CompletionBody, Options
from paddler.http.openai.streaming import Generation
from paddler.http.openapi import JSON, Operation, Reply
from paddler.protocol.shapes import check


class Completions(Generation):
    object_name = "text_completion"
    id_prefix = "cmpl-"
    OPERATIONS = {
        "post": Operation(
            "Create a text completion (legacy)",
            CompletionBody,
            {
                200: Reply(
                    "A text_completion object; with stream: true, server-sent events "
                    "ending with data: [DONE]",
                    JSON,
                    {"type": "object"},
                )
            },
        )
    }

    def parse(self, body: Any) -> tuple[dict[str, Any], Options]:
        completion = check(CompletionBody, body, invalid_body)
        return completion.to_request(), completion.options()

    def choice(self, text: str, reason: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

    def opening(self, options: Options) -> list[dict[str, Any]]:
        if not options.echo:
            return []
        return [self.chunk_choice(options.echo, None)]

    def chunk_choice(self, piece: str | None, reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": piece or "", "finish_reason": reason, "logprobs": None}
