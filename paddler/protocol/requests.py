"""Validation of generation requests, shared by the client, the broker and agents.

A request is a msgpack map. Exactly one of ``raw_prompt`` and
``conversation_history`` is present; the rest are optional with defaults.
``validate_request`` returns a normalized copy or raises ``InvalidRequest``
naming the field, so every layer answers bad input the same way.
"""

from __future__ import annotations

from typing import Any

from paddler.errors import InvalidRequest

MAX_TOKENS_LIMIT = 1_000_000
DEFAULT_MAX_TOKENS = 1000
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 512
MAX_PROMPT_CHARS = 4 * 1024 * 1024

_DEFAULTS: dict[str, Any] = {
    "max_tokens": DEFAULT_MAX_TOKENS,
    "grammar": None,
    "add_generation_prompt": True,
    "enable_thinking": False,
    "tools": [],
    "parse_tool_calls": False,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "min_p": None,
    "seed": None,
    "stop": [],
}
KNOWN_FIELDS = frozenset(_DEFAULTS) | {"raw_prompt", "conversation_history"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_message(index: int, message: Any) -> None:
    where = f"conversation_history[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(where, "must be an object with 'role' and 'content'")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"{where}.role", "must be a non-empty string")
    content = message.get("content")
    if isinstance(content, str):
        return
    if isinstance(content, list):
        for part_index, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(
                    f"{where}.content[{part_index}]", "must be an object with a 'type'"
                )
        return
    raise InvalidRequest(f"{where}.content", "must be a string or a list of parts")


def _check_grammar(grammar: Any) -> None:
    if grammar is None:
        return
    if not isinstance(grammar, dict):
        raise InvalidRequest("grammar", "must be null or an object with a 'type'")
    kind = grammar.get("type")
    if kind == "gbnf":
        if not isinstance(grammar.get("grammar"), str):
            raise InvalidRequest("grammar.grammar", "must be a string of GBNF rules")
        if not isinstance(grammar.get("root", "root"), str):
            raise InvalidRequest("grammar.root", "must be a string")
    elif kind == "json_schema":
        if not isinstance(grammar.get("schema"), str):
            raise InvalidRequest("grammar.schema", "must be a JSON Schema as a string")
    else:
        raise InvalidRequest("grammar.type", "must be 'gbnf' or 'json_schema'")


MAX_DOCUMENTS = 4096
EMBEDDING_FIELDS = frozenset({"input_batch", "normalization_method"})


def _check_normalization(method: Any) -> Any:
    if method in ("None", "L2"):
        return method
    if isinstance(method, dict) and set(method) == {"RmsNorm"}:
        inner = method["RmsNorm"]
        epsilon: Any = inner.get("epsilon") if isinstance(inner, dict) else None
        if _is_number(epsilon) and 0 < epsilon < 1:
            return {"RmsNorm": {"epsilon": float(epsilon)}}
        raise InvalidRequest(
            "normalization_method.RmsNorm.epsilon", "must be a number between 0 and 1"
        )
    raise InvalidRequest(
        "normalization_method", 'must be "None", "L2" or {"RmsNorm": {"epsilon": ...}}'
    )


def validate_embedding_request(request: dict[str, Any]) -> dict[str, Any]:
    """A normalized embedding request: ``input_batch`` of ``{id, content}`` documents."""
    for name in request:
        if name not in EMBEDDING_FIELDS:
            raise InvalidRequest(str(name), "unknown field")
    documents = request["input_batch"]
    if not isinstance(documents, list) or not documents:
        raise InvalidRequest("input_batch", "must be a non-empty list of {id, content}")
    if len(documents) > MAX_DOCUMENTS:
        raise InvalidRequest("input_batch", f"has more than {MAX_DOCUMENTS} documents")
    for index, document in enumerate(documents):
        where = f"input_batch[{index}]"
        if not isinstance(document, dict) or set(document) != {"id", "content"}:
            raise InvalidRequest(where, "must be an object with exactly 'id' and 'content'")
        if not isinstance(document["id"], str):
            raise InvalidRequest(f"{where}.id", "must be a string")
        if not isinstance(document["content"], str) or not document["content"]:
            raise InvalidRequest(f"{where}.content", "must be a non-empty string")
    return {
        "input_batch": [dict(d) for d in documents],
        "normalization_method": _check_normalization(request.get("normalization_method", "None")),
    }


def is_embedding_request(request: dict[str, Any]) -> bool:
    return "input_batch" in request


def validate_request(request: Any) -> dict[str, Any]:
    """A normalized copy of ``request`` (generation or embedding); ``InvalidRequest``
    naming the bad field."""
    if not isinstance(request, dict):
        raise InvalidRequest("request", "must be an object")
    if "input_batch" in request:
        return validate_embedding_request(request)
    for name in request:
        if name not in KNOWN_FIELDS:
            raise InvalidRequest(str(name), "unknown field")
    has_raw = "raw_prompt" in request
    has_conversation = "conversation_history" in request
    if has_raw == has_conversation:
        raise InvalidRequest(
            "raw_prompt", "give exactly one of 'raw_prompt' and 'conversation_history'"
        )
    out = {**_DEFAULTS, "tools": [], "stop": []}  # fresh lists: never shared between requests
    out.update(request)
    if has_raw:
        prompt = out["raw_prompt"]
        if not isinstance(prompt, str):
            raise InvalidRequest("raw_prompt", "must be a string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest("raw_prompt", f"longer than {MAX_PROMPT_CHARS} characters")
    else:
        history = out["conversation_history"]
        if not isinstance(history, list) or not history:
            raise InvalidRequest("conversation_history", "must be a non-empty list of messages")
        for index, message in enumerate(history):
            _check_message(index, message)
    max_tokens = out["max_tokens"]
    if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidRequest("max_tokens", f"must be an integer from 1 to {MAX_TOKENS_LIMIT}")
    for flag in ("add_generation_prompt", "enable_thinking", "parse_tool_calls"):
        if not isinstance(out[flag], bool):
            raise InvalidRequest(flag, "must be true or false")
    if not isinstance(out["tools"], list):
        raise InvalidRequest("tools", "must be a list")
    _check_grammar(out["grammar"])
    temperature = out["temperature"]
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 100):
        raise InvalidRequest("temperature", "must be a number from 0 to 100")
    for name in ("top_p", "min_p"):
        value = out[name]
        if value is not None and (not _is_number(value) or not 0 <= value <= 1):
            raise InvalidRequest(name, "must be a number from 0 to 1")
    top_k = out["top_k"]
    if top_k is not None and (not _is_int(top_k) or not 0 <= top_k <= 1_000_000):
        raise InvalidRequest("top_k", "must be a non-negative integer")
    seed = out["seed"]
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
        raise InvalidRequest("seed", "must be an integer from 0 to 4294967295")
    stop = out["stop"]
    if isinstance(stop, str):
        stop = out["stop"] = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop)
    ):
        raise InvalidRequest(
            "stop",
            f"must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
            f"of at most {MAX_STOP_LENGTH} characters",
        )
    return out
