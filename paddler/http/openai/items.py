"""Items as the Responses and Conversations APIs answer them: input items given in a
body, each with an ``id`` and a ``status``; a list of them paged as OpenAI's lists
are (``limit``, ``order``, ``after``); output text with its log-probabilities only
when ``include`` asks for them."""

from __future__ import annotations

import uuid
from typing import Any

import falcon.asgi

from paddler.http.openai.errors import invalid, invalid_body
from paddler.http.openai.responses_items import (
    LOGPROBS_INCLUDE,
    FunctionCallItem,
    FunctionCallOutputItem,
    Item,
    MessageItem,
    UnsupportedItem,
    messages_of,
)
from paddler.protocol.shapes import Shape, check

MAX_PAGE = 100
DEFAULT_PAGE = 20
PAGE_PARAMS = ("after", "include", "include[]", "limit", "order")
INCLUDE_PARAMS = ("include", "include[]")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def items_of(given: str | list[Any] | None) -> list[dict[str, Any]]:
    """Input (a string, one user message, or checked items) as OpenAI answers items:
    each with its own ``id`` when it came with one (else a new one) and a ``status``."""
    if given is None:
        return []
    if isinstance(given, str):
        return [_message(new_id("msg"), "user", given, "completed")]
    items: list[dict[str, Any]] = []
    for item in given:
        if isinstance(item, UnsupportedItem):
            continue  # refused when the body was checked
        status = item.status or "completed"
        if isinstance(item, MessageItem):
            items.append(_message(item.id or new_id("msg"), item.role, item.content, status))
        elif isinstance(item, FunctionCallItem):
            fields = item.model_dump(include={"call_id", "name", "arguments"})
            items.append(
                {"type": "function_call", "id": item.id or new_id("fc"), "status": status, **fields}
            )
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _parts(item.output)
            items.append(
                {
                    "type": "function_call_output",
                    "id": item.id or new_id("fco"),
                    "status": status,
                    "call_id": item.call_id,
                    "output": output,
                }
            )
        else:
            reasoning = item.model_dump(include={"summary", "content"}, exclude_none=True)
            items.append({"type": "reasoning", "id": item.id or new_id("rs"), **reasoning})
    return items


class KeptItems(Shape):
    """Kept items, checked again as input items to become messages."""

    items: list[Item]


def messages_of_items(items: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """Kept items (``items_of``'s, and responses' output items) as the messages the
    chat template sees, as ``messages_of`` makes them of a body's input: a response's
    reasoning, text and calls become one assistant turn. ``field`` names the items in
    an error (a reasoning item left alone by a removed item)."""
    kept = [
        {key: value for key, value in item.items() if key != "tool_call_errors"} for item in items
    ]
    return messages_of(check(KeptItems, {"items": kept}, invalid_body).items, [], field)


def _parts(parts: list[Any]) -> list[dict[str, Any]]:
    return [part.model_dump(exclude_none=True) for part in parts]


def _message(ident: str, role: str, content: Any, status: str) -> dict[str, Any]:
    if isinstance(content, str):
        if role == "assistant":
            parts = [{"type": "output_text", "text": content, "annotations": []}]
        else:
            parts = [{"type": "input_text", "text": content}]
    else:
        parts = _parts(content)
    return {"type": "message", "id": ident, "status": status, "role": role, "content": parts}


def included(req: falcon.asgi.Request) -> bool:
    """Whether the query's ``include`` (or ``include[]``, as the SDK sends it) asks for
    output text's log-probabilities, the one value honoured; any other is a 400."""
    values = [value for name in INCLUDE_PARAMS for value in req.get_param_as_list(name) or ()]
    for value in values:
        if value != LOGPROBS_INCLUDE:
            raise invalid("include", f"may only hold {LOGPROBS_INCLUDE!r}, not {value!r}")
    return bool(values)


def shown(item: dict[str, Any], logprobs: bool) -> dict[str, Any]:
    """``item`` as answered: its output text's log-probabilities emptied unless
    ``logprobs``."""
    if logprobs or item.get("type") != "message":
        return item
    content = [
        {**part, "logprobs": []}
        if part.get("type") == "output_text" and part.get("logprobs")
        else part
        for part in item["content"]
    ]
    return {**item, "content": content}


def page(req: falcon.asgi.Request, items: list[dict[str, Any]], what: str) -> dict[str, Any]:
    """One page of ``items`` (oldest first) as OpenAI's list: the query's ``limit``
    (1 to 100, default 20), ``order`` (``desc``, the default, or ``asc``), ``after``
    (an item id: the items after it in that order) and ``include``; ``what`` names the
    endpoint in the error for any other parameter."""
    params = req.params
    for name in params:
        if name not in PAGE_PARAMS:
            raise invalid(name, f"is not a parameter of {what} (after, include, limit, order)")
    limit = _limit(params.get("limit"))
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order", "must be 'asc' or 'desc'")
    logprobs = included(req)
    ordered = items[::-1] if order == "desc" else items
    start = 0
    after = params.get("after")
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise invalid("after", f"no item of the {what} has the id {after!r}")
        start = ids.index(after) + 1
    data = [shown(item, logprobs) for item in ordered[start : start + limit]]
    return listing(data, start + limit < len(ordered))


def listing(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _limit(value: Any) -> int:
    if value is None:
        return DEFAULT_PAGE
    says = f"must be an integer from 1 to {MAX_PAGE}"
    if not isinstance(value, str) or not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise invalid("limit", says)
    return int(value)
