"""Building generation requests for the client library."""

from __future__ import annotations

from typing import Any

from paddler.protocol.requests import validate_request


def raw_prompt_request(prompt: str, **options: Any) -> dict[str, Any]:
    return validate_request({"raw_prompt": prompt, **options})


def embedding_request(
    documents: list[dict[str, str]], normalization_method: Any = "None"
) -> dict[str, Any]:
    return validate_request(
        {"input_batch": documents, "normalization_method": normalization_method}
    )


def conversation_request(messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    return validate_request({"conversation_history": messages, **options})
