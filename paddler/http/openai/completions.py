"""``POST /v1/completions`` (OpenAI's legacy text completions)."""

from __future__ import annotations

from typing import Any

from paddler.http.openai.errors import invalid_body
from paddler.http.openai.schemas import CompletionBody, Options
from paddler.http.openai.streaming import Answer, Generation
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

    def choice(self, answer: Answer, text: str, reason: str, logprobs: bool) -> dict[str, Any]:
        entries = answer.logprobs if logprobs else None
        return {
            "index": 0,
            "text": text,
            "finish_reason": reason,
            "logprobs": _legacy_logprobs(entries, len(text) - _answer_length(entries)),
        }

    def opening(self, options: Options) -> list[dict[str, Any]]:
        if not options.echo:
            return []
        return [self.chunk_choice(options.echo, None)]

    def chunk_choice(
        self, piece: str | None, reason: str | None, logprobs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        return {
            "index": 0,
            "text": piece or "",
            "finish_reason": reason,
            "logprobs": _legacy_logprobs(logprobs, 0),
        }


def _answer_length(entries: list[dict[str, Any]] | None) -> int:
    return sum(len(entry["token"]) for entry in entries or ())


def _legacy_logprobs(entries: list[dict[str, Any]] | None, offset: int) -> dict[str, Any] | None:
    """The legacy completions' ``logprobs``: parallel lists, alternatives as maps of
    token to log-probability, and each token's character offset in the text (from
    ``offset``: where the answer starts, after an echoed prompt)."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {
        "tokens": [entry["token"] for entry in entries],
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": [
            {alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]} for entry in entries
        ],
        "text_offset": offsets,
    }
