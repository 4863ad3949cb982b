"""Building generation requests for the client library."""

from __future__ import annotations

from typing import Any

from paddler.protocol.requests import validate_request


def raw_prompt_request(prompt: str, **options: Any) -> dict[str, Any]:
    return validate_request({"raw_prompt": prompt, **options})


def conversation_request(messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    return validate_request({"conversation_history": messages, **options})
