"""What a response is made of (OpenAI's Responses API): its usage, its output items
(reasoning, message, function calls) and, streamed, the numbered events that build
them (``EventStream``). ``paddler.http.openai.responses`` serves them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paddler.http import sse
from paddler.http.openai.items import new_id
from paddler.http.openai.streaming import Answer, usage_body
from paddler.protocol.messages import Usage
from paddler.protocol.tool_calls import ToolCall

if TYPE_CHECKING:
    from paddler.http.openai.responses import Turn


def responses_usage(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage of a response, from the same counts as a chat completion's."""
    body = usage_body(usage)
    return {
        "input_tokens": body["prompt_tokens"],
        "input_tokens_details": body["prompt_tokens_details"],
        "output_tokens": body["completion_tokens"],
        "output_tokens_details": body["completion_tokens_details"],
        "total_tokens": body["total_tokens"],
    }


# ---------------------------------------------------------------------- output items


def text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(ident: str, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": ident, "status": status, "role": "assistant", "content": parts}


def reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def reasoning_item(ident: str, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "reasoning", "id": ident, "status": status, "summary": [], "content": parts}


def call_item(ident: str, status: str, call: ToolCall, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": ident,
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
    }


def output_of(answer: Answer, status: str, logprobs: bool) -> list[dict[str, Any]]:
    """The output items of a whole answer: its reasoning, its text (also when it says
    nothing and calls nothing), its calls; the last of the first two has ``status``
    (``incomplete``: cut at ``max_output_tokens``), a call is always complete."""
    output: list[dict[str, Any]] = []
    if answer.reasoning:
        output.append(reasoning_item(new_id("rs"), "completed", [reasoning_part(answer.reasoning)]))
    if answer.text or not answer.tool_calls:
        part = text_part(answer.text, answer.logprobs if logprobs else None)
        item = message_item(new_id("msg"), "completed", [part])
        if answer.tool_call_errors:
            item["tool_call_errors"] = answer.tool_call_errors
        output.append(item)
    if output:
        output[-1]["status"] = status
    output.extend(
        call_item(new_id("fc"), "completed", call, call.arguments_json)
        for call in answer.tool_calls
    )
    return output


# ------------------------------------------------------------------------ streaming


class EventStream:
    """The events of a streamed response, numbered, and the output items they build:
    one item at a time is open (a reasoning or a message item, which text streams
    into); a call is an item of its own, added and done at once."""

    def __init__(self, turn: Turn, logprobs: bool) -> None:
        self.turn = turn
        self.logprobs = logprobs
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.pieces: list[str] = []
        self.entries: list[dict[str, Any]] = []
        self.answer = Answer()

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse.event(payload, name=kind)

    def lifecycle(self, kind: str, response: dict[str, Any]) -> bytes:
        return self.event(kind, response=response)

    def _place(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": len(self.output), "content_index": 0}

    def begin(self, kind: str) -> list[bytes]:
        """Open an item of ``kind`` (``message`` or ``reasoning``) unless one is open."""
        if self.open is not None and self.open["type"] == kind:
            return []
        events = self.end("completed")
        if kind == "message":
            item = message_item(new_id("msg"), "in_progress", [])
            part = text_part("", [] if self.logprobs else None)
        else:
            item = reasoning_item(new_id("rs"), "in_progress", [])
            part = reasoning_part("")
        events.append(
            self.event("response.output_item.added", output_index=len(self.output), item=item)
        )
        events.append(self.event("response.content_part.added", **self._place(item), part=part))
        self.open = item
        return events

    def text(self, piece: str, entries: list[dict[str, Any]] | None) -> list[bytes]:
        events = self.begin("message")
        self.pieces.append(piece)
        self.entries.extend(entries or ())
        assert self.open is not None
        events.append(
            self.event(
                "response.output_text.delta",
                **self._place(self.open),
                delta=piece,
                logprobs=entries or [],
            )
        )
        return events

    def reasoning(self, piece: str) -> list[bytes]:
        events = self.begin("reasoning")
        self.pieces.append(piece)
        assert self.open is not None
        events.append(
            self.event("response.reasoning_text.delta", **self._place(self.open), delta=piece)
        )
        return events

    def end(self, status: str) -> list[bytes]:
        """Close the open item with ``status``."""
        item = self.open
        if item is None:
            return []
        text = "".join(self.pieces)
        place = self._place(item)
        if item["type"] == "message":
            part = text_part(text, self.entries if self.logprobs else None)
            events = [
                self.event(
                    "response.output_text.done", **place, text=text, logprobs=part["logprobs"]
                )
            ]
            self.answer.text += text
        else:
            part = reasoning_part(text)
            events = [self.event("response.reasoning_text.done", **place, text=text)]
            self.answer.reasoning += text
        events.append(self.event("response.content_part.done", **place, part=part))
        item = {**item, "status": status, "content": [part]}
        events.append(
            self.event("response.output_item.done", output_index=place["output_index"], item=item)
        )
        self.output.append(item)
        self.open, self.pieces, self.entries = None, [], []
        return events

    def calls(self, calls: list[ToolCall]) -> list[bytes]:
        """Each call as an item: added with no arguments, its arguments, done."""
        events = self.end("completed")
        for call in calls:
            ident = new_id("fc")
            index = len(self.output)
            arguments = call.arguments_json
            place = {"item_id": ident, "output_index": index}
            events += [
                self.event(
                    "response.output_item.added",
                    output_index=index,
                    item=call_item(ident, "in_progress", call, ""),
                ),
                self.event("response.function_call_arguments.delta", **place, delta=arguments),
                self.event("response.function_call_arguments.done", **place, arguments=arguments),
            ]
            item = call_item(ident, "completed", call, arguments)
            events.append(self.event("response.output_item.done", output_index=index, item=item))
            self.output.append(item)
            self.answer.tool_calls.append(call)
        return events
