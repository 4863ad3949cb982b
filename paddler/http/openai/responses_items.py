"""The input of ``POST /v1/responses`` (OpenAI's Responses API) as shapes: content
parts and items, and the conversation they continue as chat messages.

Input items become the messages the chat template sees: a message item its role and
its text; ``function_call`` items the ``tool_calls`` of an assistant message (the one
just before, or a new one with no content); ``function_call_output`` items ``tool``
messages with their ``tool_call_id`` (and the tool's ``name`` when the call is in the
conversation); a ``reasoning`` item the ``reasoning_content`` of the assistant
message that follows it. The rest of the body is ``responses_body``'s.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Discriminator, Field
from pydantic_core import PydanticCustomError

from paddler.http.openai.errors import invalid
from paddler.http.openai.schemas import _refuse
from paddler.protocol.shapes import Says, Shape, member_tag

LOGPROBS_INCLUDE = "message.output_text.logprobs"
"""The one ``include`` value honoured: the log-probabilities of the output text."""
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}

Text = Annotated[str, Says("must be a string")]
Flag = Annotated[bool, Says("must be true or false")]
Status = Annotated[
    Literal["in_progress", "completed", "incomplete"],
    Says("must be 'in_progress', 'completed' or 'incomplete'"),
]


def _unsupported(what: str, instead: str) -> AfterValidator:
    """For the ``type`` of an object that is never valid: the error names it."""

    def name_it(kind: str) -> str:
        raise PydanticCustomError("unsupported", f"{kind!r} {what} are not supported; {instead}")

    return AfterValidator(name_it)


class Unsupported(Shape):
    """Never valid: an object whose ``type`` is not one this server takes."""

    model_config = Shape.model_config | {"extra": "ignore"}


def _tag(kinds: tuple[str, ...], default: str | None = None) -> Any:
    """A discriminator on ``type``: ``~kind`` for the kinds known, ``~unsupported`` for
    any other string (``default`` when there is no ``type``)."""

    def tag(value: Any) -> str | None:
        if isinstance(value, Shape):
            return f"~{getattr(value, 'type', None) or default}"
        if isinstance(value, str) and "~str" in kinds:
            return "~str"
        if not isinstance(value, dict):
            return None
        kind = value.get("type", default)
        if kind is None and default is not None:
            kind = default
        if not isinstance(kind, str):
            return "~unsupported"
        return f"~{kind}" if kind in kinds else "~unsupported"

    return Discriminator(tag)


# ------------------------------------------------------------------ content parts


class InputTextPart(Shape):
    type: Literal["input_text"]
    text: Text


class OutputTextPart(Shape):
    """Text the model wrote, sent back: ``annotations`` and ``logprobs`` describe it."""

    type: Literal["output_text"]
    text: Text
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] | None = None


class RefusalPart(Shape):
    type: Literal["refusal"]
    refusal: Text


class UnsupportedPart(Unsupported):
    type: Annotated[str, _unsupported("parts", "this server's models read text ('input_text')")]


Part = Annotated[
    Annotated[InputTextPart, member_tag("~input_text")]
    | Annotated[OutputTextPart, member_tag("~output_text")]
    | Annotated[RefusalPart, member_tag("~refusal")]
    | Annotated[UnsupportedPart, member_tag("~unsupported")],
    _tag(("input_text", "output_text", "refusal")),
    Says("must be an object with a 'type'"),
]


def _string_or_list(value: Any) -> str | None:
    return "~text" if isinstance(value, str) else "~parts" if isinstance(value, list) else None


Content = Annotated[
    Annotated[str, member_tag("~text")] | Annotated[list[Part], member_tag("~parts")],
    Discriminator(_string_or_list),
    Says("must be a string or a list of content parts"),
]


def text_of(content: str | list[Any]) -> str:
    """The text of a content: the string, or its parts' texts one after the other."""
    if isinstance(content, str):
        return content
    return "".join(part.refusal if isinstance(part, RefusalPart) else part.text for part in content)


# -------------------------------------------------------------------- input items


class MessageItem(Shape):
    """A message: given as input, or one the model wrote sent back (``id``,
    ``status`` and ``phase`` describe it)."""

    SAYS: ClassVar[str] = "must be an object with 'role' and 'content'"

    type: Literal["message"] | None = None
    role: Annotated[
        Literal["user", "assistant", "system", "developer"],
        Says("must be one of user, assistant, system, developer"),
    ]
    content: Content
    id: Text | None = None
    status: Status | None = None
    phase: (
        Annotated[
            Literal["commentary", "final_answer"], Says("must be 'commentary' or 'final_answer'")
        ]
        | None
    ) = None


class FunctionCallItem(Shape):
    """A call the model made, sent back."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]
    name: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]
    arguments: Annotated[str, Says("must be the arguments as a JSON string")]
    id: Text | None = None
    status: Status | None = None


class FunctionCallOutputItem(Shape):
    """What a call gave: becomes a ``tool`` message."""

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]
    output: Content
    id: Text | None = None
    status: Status | None = None


class SummaryText(Shape):
    type: Literal["summary_text"]
    text: Text


class ReasoningText(Shape):
    type: Literal["reasoning_text"]
    text: Text


class ReasoningItem(Shape):
    """Reasoning the model wrote, sent back: the ``reasoning_content`` of the
    assistant message that follows (templates that show past reasoning use it)."""

    type: Literal["reasoning"]
    id: Text | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    status: Status | None = None
    encrypted_content: Annotated[
        Any, _refuse("is not supported: this server keeps reasoning as text ('content')")
    ] = None

    @property
    def text(self) -> str:
        parts = self.content if self.content else self.summary
        return "".join(part.text for part in parts)


class UnsupportedItem(Unsupported):
    type: Annotated[
        str,
        _unsupported(
            "items", "use messages, 'function_call', 'function_call_output' and 'reasoning' items"
        ),
    ]


ITEM_KINDS = ("message", "function_call", "function_call_output", "reasoning")

Item = Annotated[
    Annotated[MessageItem, member_tag("~message")]
    | Annotated[FunctionCallItem, member_tag("~function_call")]
    | Annotated[FunctionCallOutputItem, member_tag("~function_call_output")]
    | Annotated[ReasoningItem, member_tag("~reasoning")]
    | Annotated[UnsupportedItem, member_tag("~unsupported")],
    _tag(ITEM_KINDS, default="message"),
    Says("must be an object with a 'type' (or a message with a 'role')"),
]

Input = Annotated[
    Annotated[str, member_tag("~text")] | Annotated[list[Item], member_tag("~parts")],
    Discriminator(_string_or_list),
    Says("must be a string or a list of input items"),
]


REASONING_ALONE = (
    "a reasoning item must come right before the assistant message or function call it led to"
)


def messages_of(
    items: list[Any], history: list[dict[str, Any]], field: str = "input"
) -> list[dict[str, Any]]:
    """``history`` followed by the messages of ``items`` (a new list): see the module's
    docstring; ``OpenAIError`` 400 for a reasoning item no assistant turn follows (the
    item named as ``field[i]``)."""
    messages = list(history)
    names = {
        call["id"]: call["function"]["name"]
        for message in history
        for call in message.get("tool_calls", ())
    }
    reasoning: tuple[int, str] | None = None
    """The index and text of a reasoning item waiting for its assistant turn."""
    for index, item in enumerate(items):
        if isinstance(item, ReasoningItem):
            if reasoning is not None:
                raise invalid(f"{field}[{reasoning[0]}]", REASONING_ALONE)
            reasoning = (index, item.text)
            continue
        message: dict[str, Any]
        if isinstance(item, MessageItem):
            message = {"role": ROLES[item.role], "content": text_of(item.content)}
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            names[item.call_id] = item.name
            if messages and messages[-1]["role"] == "assistant" and reasoning is None:
                last = messages.pop()  # its calls: one assistant turn
                message = {**last, "tool_calls": [*last.get("tool_calls", ()), call]}
            else:
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
        else:
            message = {
                "role": "tool",
                "content": text_of(item.output),
                "tool_call_id": item.call_id,
            }
            if item.call_id in names:
                message["name"] = names[item.call_id]
        if reasoning is not None:
            if message["role"] != "assistant":
                raise invalid(f"{field}[{reasoning[0]}]", REASONING_ALONE)
            message["reasoning_content"] = reasoning[1]
            reasoning = None
        messages.append(message)
    if reasoning is not None:
        raise invalid(f"{field}[{reasoning[0]}]", REASONING_ALONE)
    return messages
