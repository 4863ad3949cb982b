"""OpenAI's Conversations API: ``POST /v1/conversations``, ``GET``, ``POST`` (its
metadata) and ``DELETE /v1/conversations/{id}``, ``GET`` and ``POST
/v1/conversations/{id}/items``, ``GET`` and ``DELETE
/v1/conversations/{id}/items/{item_id}``; and what ``/v1/responses`` needs to take
a ``conversation``: its items as the messages the chat template sees, and the new
items of a response added when it completes.

A conversation is kept by the balancer as one record in the store of the Responses
API (``paddler.broker.store.ResponseStore``, the state database), under its bounds:
``{"id", "created_at", "metadata", "items"}``, the items as OpenAI answers them (see
``items``). Every change is a read-modify-write whose put names the record it
replaces; when another HTTP worker changed it in between (a 409 from the balancer),
the change is made again on the new record, so concurrent responses in one
conversation lose none of each other's items.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, ClassVar, TypeVar

import falcon
import falcon.asgi
from pydantic import Field

from paddler.client import AsyncClient
from paddler.errors import RequestFailed
from paddler.http.common import HttpDeps, dumps, read_json
from paddler.http.openai.errors import OpenAIError, invalid, invalid_body
from paddler.http.openai.items import (
    INCLUDE_PARAMS,
    included,
    items_of,
    listing,
    messages_of_items,
    new_id,
    page,
    shown,
)
from paddler.http.openai.responses_items import Item, messages_of
from paddler.http.openai.schemas import Metadata
from paddler.http.openai.streaming import broker_call
from paddler.http.openapi import JSON, Operation, Reply
from paddler.protocol.shapes import Says, Shape, check

CONVERSATION_ID = re.compile(r"conv_[0-9a-f]{32}")
"""The ids this server gives; any other is unknown without asking the balancer."""
MAX_NEW_ITEMS = 20
"""Items one call may add (OpenAI's bound)."""
WRITE_ATTEMPTS = 16
"""Read-modify-writes of one change before it gives up (each lost a race)."""

T = TypeVar("T")

NewItems = Annotated[
    list[Item],
    Field(max_length=MAX_NEW_ITEMS),
    Says("must be a list of items", too_long=f"may add at most {MAX_NEW_ITEMS} items at a time"),
]


class ConversationBody(Shape):
    """``POST /v1/conversations``."""

    ROOT: ClassVar[str] = "body"
    SAYS: ClassVar[str] = "the request body must be a JSON object"

    items: NewItems | None = None
    metadata: Metadata | None = None


class ConversationUpdateBody(Shape):
    """``POST /v1/conversations/{id}``: its metadata, replaced."""

    ROOT: ClassVar[str] = "body"
    SAYS: ClassVar[str] = "the request body must be a JSON object"

    metadata: Metadata


class ItemsBody(Shape):
    """``POST /v1/conversations/{id}/items``."""

    ROOT: ClassVar[str] = "body"
    SAYS: ClassVar[str] = "the request body must be a JSON object"

    items: Annotated[NewItems, Field(min_length=1)]


def _checked_items(given: list[Any]) -> list[dict[str, Any]]:
    """New items with their ids; a reasoning item no assistant turn follows is a 400
    (it could never become a message)."""
    messages_of(given, [], "items")
    return items_of(given)


def conversation_object(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record["id"],
        "object": "conversation",
        "created_at": record["created_at"],
        "metadata": record["metadata"],
    }


def conversation_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation's items as the messages the chat template sees."""
    return messages_of_items(record["items"], "conversation")


def _put(
    conversation_id: str, data: bytes, expected: bytes | None = None
) -> Callable[[AsyncClient], Awaitable[None]]:
    return lambda client: client.put_response(conversation_id, data, expected=expected)


def _unknown(conversation_id: str, param: str | None) -> OpenAIError:
    return OpenAIError(
        404, f"Conversation with id '{conversation_id}' not found.", param=param, code="not_found"
    )


async def _read(
    deps: HttpDeps, conversation_id: str, param: str | None
) -> tuple[dict[str, Any], bytes]:
    if not CONVERSATION_ID.fullmatch(conversation_id):
        raise _unknown(conversation_id, param)
    try:
        data = await broker_call(deps, lambda client: client.get_response(conversation_id))
    except RequestFailed as exc:
        if exc.code == 404:
            raise _unknown(conversation_id, param) from None
        raise
    return json.loads(data), data


async def load_conversation(
    deps: HttpDeps, conversation_id: str, param: str | None = None
) -> dict[str, Any]:
    """The kept conversation ``conversation_id``; OpenAI's 404 when there is none."""
    return (await _read(deps, conversation_id, param))[0]


async def change_conversation(
    deps: HttpDeps,
    conversation_id: str,
    change: Callable[[dict[str, Any]], T],
    param: str | None = None,
) -> tuple[dict[str, Any], T]:
    """The conversation after ``change`` (which edits the record it is given) is kept,
    and what ``change`` returned. 404 when there is none; a 400 naming ``items`` when
    it would grow past the bytes a record may hold; made again on the new record when
    another worker changed it in between."""
    for _ in range(WRITE_ATTEMPTS):
        record, data = await _read(deps, conversation_id, param)
        result = change(record)
        try:
            await broker_call(deps, _put(conversation_id, dumps(record).encode(), data))
        except RequestFailed as exc:
            if exc.code == 409:
                continue  # changed by another worker: once more on what it kept
            if exc.code == 404:
                raise _unknown(conversation_id, param) from None
            if exc.code == 413:
                raise invalid("items", f"the conversation cannot hold them: {exc}") from None
            raise
        return record, result
    raise OpenAIError(
        409,
        f"Conversation with id '{conversation_id}' changed {WRITE_ATTEMPTS} times while "
        "this change was being made; try again.",
        code="conflict",
    )


# ------------------------------------------------------------------------ endpoints


OBJECT = Reply("The conversation: {id, object: conversation, created_at, metadata}", JSON, {})
LIST = Reply("{object: list, data, first_id, last_id, has_more}", JSON, {"type": "object"})
ITEM = Reply("The item, as it is kept", JSON, {"type": "object"})


class Conversations:
    OPERATIONS = {"post": Operation("Create a conversation", ConversationBody, {200: OBJECT})}

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _only(req, ())
        body = check(ConversationBody, await read_json(req, self.deps.max_body_bytes), invalid_body)
        conversation_id = new_id("conv")
        record = {
            "id": conversation_id,
            "created_at": int(time.time()),
            "metadata": body.metadata or {},
            "items": _checked_items(body.items or []),
        }
        try:
            await broker_call(self.deps, _put(conversation_id, dumps(record).encode()))
        except RequestFailed as exc:
            if exc.code == 413:
                raise invalid("items", f"a conversation cannot hold them: {exc}") from None
            raise
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(conversation_object(record))


class Conversation:
    OPERATIONS = {
        "get": Operation("A conversation", replies={200: OBJECT}),
        "post": Operation(
            "Replace a conversation's metadata", ConversationUpdateBody, {200: OBJECT}
        ),
        "delete": Operation(
            "Forget a conversation (its items; the responses made in it are kept)",
            replies={200: Reply("{id, object: conversation.deleted, deleted: true}", JSON, {})},
        ),
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, conversation_id: str
    ) -> None:
        _only(req, ())
        record = await load_conversation(self.deps, conversation_id)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(conversation_object(record))

    async def on_post(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, conversation_id: str
    ) -> None:
        _only(req, ())
        raw = await read_json(req, self.deps.max_body_bytes)
        body = check(ConversationUpdateBody, raw, invalid_body)

        def update(record: dict[str, Any]) -> None:
            record["metadata"] = body.metadata

        record, _ = await change_conversation(self.deps, conversation_id, update)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(conversation_object(record))

    async def on_delete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, conversation_id: str
    ) -> None:
        _only(req, ())
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise _unknown(conversation_id, None)
        try:
            await broker_call(self.deps, lambda client: client.delete_response(conversation_id))
        except RequestFailed as exc:
            if exc.code == 404:
                raise _unknown(conversation_id, None) from None
            raise
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(
            {"id": conversation_id, "object": "conversation.deleted", "deleted": True}
        )


class ConversationItems:
    OPERATIONS = {
        "get": Operation(
            "A conversation's items",
            replies={200: LIST},
            description=(
                "Query parameters: limit (1 to 100, default 20), order (asc or desc, "
                "default desc), after (an item id), include (message.output_text.logprobs)."
            ),
        ),
        "post": Operation(
            "Add items to a conversation (1 to 20)",
            ItemsBody,
            {200: LIST},
            description="Query parameter: include (message.output_text.logprobs).",
        ),
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, conversation_id: str
    ) -> None:
        record = await load_conversation(self.deps, conversation_id)
        listed = page(req, record["items"], "conversation's items")
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(listed)

    async def on_post(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, conversation_id: str
    ) -> None:
        _only(req, INCLUDE_PARAMS)
        logprobs = included(req)
        body = check(ItemsBody, await read_json(req, self.deps.max_body_bytes), invalid_body)
        new = _checked_items(body.items)

        def add(record: dict[str, Any]) -> None:
            record["items"].extend(new)

        await change_conversation(self.deps, conversation_id, add)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(listing([shown(item, logprobs) for item in new], False))


class ConversationItem:
    OPERATIONS = {
        "get": Operation("One item of a conversation", replies={200: ITEM}),
        "delete": Operation("Remove an item from a conversation", replies={200: OBJECT}),
    }

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps

    async def on_get(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        conversation_id: str,
        item_id: str,
    ) -> None:
        _only(req, INCLUDE_PARAMS)
        logprobs = included(req)
        record = await load_conversation(self.deps, conversation_id)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(shown(_item(record, item_id), logprobs))

    async def on_delete(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        conversation_id: str,
        item_id: str,
    ) -> None:
        _only(req, ())

        def remove(record: dict[str, Any]) -> None:
            record["items"].remove(_item(record, item_id))

        record, _ = await change_conversation(self.deps, conversation_id, remove)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(conversation_object(record))


def _item(record: dict[str, Any], item_id: str) -> dict[str, Any]:
    for item in record["items"]:
        if item.get("id") == item_id:
            return item  # type: ignore[no-any-return]
    raise OpenAIError(404, f"Item with id '{item_id}' not found.", code="not_found")


def _only(req: falcon.asgi.Request, allowed: tuple[str, ...]) -> None:
    """A 400 naming the first query parameter that is not ``allowed``."""
    for name in req.params:
        if name not in allowed:
            takes = "include" if allowed else "no query parameters"
            raise invalid(name, f"is not a parameter here (this route takes {takes})")


def add_conversations_api(app: falcon.asgi.App[Any, Any], deps: HttpDeps) -> None:
    app.add_route("/v1/conversations", Conversations(deps))
    app.add_route("/v1/conversations/{conversation_id}", Conversation(deps))
    app.add_route("/v1/conversations/{conversation_id}/items", ConversationItems(deps))
    app.add_route("/v1/conversations/{conversation_id}/items/{item_id}", ConversationItem(deps))
