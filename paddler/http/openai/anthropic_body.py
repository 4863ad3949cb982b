"""The body of ``POST /v1/messages`` (Anthropic's Messages API) as shapes, and the
conversation request it becomes (``MessagesBody.to_request``).

Strict types and no unknown field: what this server does not honour is a 400 that
names the field. A body becomes the same conversation request as an OpenAI chat
completion: the ``system`` prompt a system message, each turn's text blocks its
content (joined with a blank line), ``tool_use`` blocks the assistant's
``tool_calls``, each ``tool_result`` block a ``tool`` message, ``thinking`` blocks
the assistant's ``reasoning_content`` (templates that show past reasoning, as Qwen
3's does within a tool loop, render it; others leave it out). Accepted because they
only annotate: ``metadata``, ``cache_control`` (paddler keeps every prompt's prefix
by itself) and ``citations``. ``image`` blocks are refused with a 400 naming the
block: the agents serve text-only models.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Discriminator, Field, model_validator
from pydantic_core import PydanticCustomError

from paddler.http.common import dumps
from paddler.http.openai.errors import invalid_body
from paddler.protocol.requests import (
    BUDGET_WITH_GRAMMAR,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    TEXT_ONLY_MESSAGE,
    ConversationRequest,
    MaxTokens,
    Probability,
    StopString,
    TopK,
    trusted_wire,
)
from paddler.protocol.shapes import Says, Shape, member_tag, schema_without
from paddler.protocol.tool_calls import (
    MAX_DESCRIPTION,
    MAX_TOOLS,
    ToolName,
    _schema_within_limits,
    tool_choice_problem,
)

BLOCK_SEPARATOR = "\n\n"
"""Between the text blocks of one turn (and of a ``system`` list)."""
ERROR_PREFIX = "Error: "
"""Before the text of a ``tool_result`` with ``is_error``: templates have no field for it."""


# ------------------------------------------------------------------------ shapes


def _not_supported(kind: str, what: str, instead: str) -> Any:
    def refuse(value: Any) -> Any:
        raise PydanticCustomError(
            kind,
            "{value} {what} not supported; {instead}",
            {"value": repr(value), "what": what, "instead": instead},
        )

    return AfterValidator(refuse)


class CacheControl(Shape):
    """Accepted and ignored: paddler keeps every prompt's prefix in the agents' slots
    and sends a request where its prefix is, without being asked."""

    type: Annotated[Literal["ephemeral"], Says("must be 'ephemeral'")]
    ttl: Annotated[Literal["5m", "1h"], Says("must be '5m' or '1h'")] | None = None


class TextBlock(Shape):
    SAYS: ClassVar[str] = "must be a text block {'type': 'text', 'text': ...}"

    type: Annotated[Literal["text"], Says("must be 'text'")]
    text: Annotated[str, Says("must be a string")]
    cache_control: CacheControl | None = None
    citations: Annotated[list[dict[str, Any]], Says("must be a list of citations")] | None = None
    """Accepted: they annotate the text; the model reads the text."""


IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


class Base64Source(Shape):
    type: Literal["base64"]
    media_type: Annotated[
        Literal["image/jpeg", "image/png", "image/gif", "image/webp"],
        Says(f"must be one of {', '.join(IMAGE_TYPES)}"),
    ]
    data: Annotated[str, Field(min_length=1), Says("must be the image in base64")]


class UrlSource(Shape):
    type: Literal["url"]
    url: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]


class UnsupportedSource(Shape):
    model_config = Shape.model_config | {"extra": "ignore"}
    type: Annotated[str, _not_supported("source", "image sources are", "use 'base64' or 'url'")]


def _type_tag(known: tuple[str, ...]) -> Any:
    def tag(value: Any) -> str | None:
        if isinstance(value, Shape):
            kind = getattr(value, "type", None)
            return f"~{kind}" if kind in known else "~other"
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            return None
        return f"~{value['type']}" if value["type"] in known else "~other"

    return Discriminator(tag)


ImageSource = Annotated[
    Annotated[Base64Source, member_tag("~base64")]
    | Annotated[UrlSource, member_tag("~url")]
    | Annotated[UnsupportedSource, member_tag("~other")],
    _type_tag(("base64", "url")),
    Says("must be an object with a 'type'"),
]


class ImageBlock(Shape):
    """Refused (a 400 naming the block, once its shape is right): the agents serve
    text-only models, so an image would never reach the model."""

    type: Literal["image"]
    source: ImageSource
    cache_control: CacheControl | None = None

    @model_validator(mode="after")
    def _refused(self) -> ImageBlock:
        raise PydanticCustomError(
            "multimodal", "image blocks are not supported: {why}", {"why": TEXT_ONLY_MESSAGE}
        )


def _text_or_list(value: Any) -> str | None:
    return "~text" if isinstance(value, str) else "~list" if isinstance(value, list) else None


class ToolUseBlock(Shape):
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]
    name: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]
    input: Annotated[dict[str, Any], Says("must be an object (the call's arguments)")]
    cache_control: CacheControl | None = None
    caller: Annotated[None, Says("is not supported: only the model calls tools here")] = None
    toolset_name: Annotated[None, Says("is not supported: no tool here is in a toolset")] = None


class ToolResultBlock(Shape):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]
    content: (
        Annotated[
            Annotated[str, member_tag("~text")] | Annotated[list[TextBlock], member_tag("~list")],
            Discriminator(_text_or_list),
            Says("must be a string or a list of text blocks"),
        ]
        | None
    ) = None
    is_error: Annotated[bool, Says("must be true or false")] | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = BLOCK_SEPARATOR.join(block.text for block in self.content)
        return ERROR_PREFIX + text if self.is_error else text


class ThinkingBlock(Shape):
    type: Literal["thinking"]
    thinking: Annotated[str, Says("must be a string")]
    signature: Annotated[str, Says("must be a string")] = ""


BLOCK_KINDS = ("text", "image", "tool_use", "tool_result", "thinking")


class UnsupportedBlock(Shape):
    model_config = Shape.model_config | {"extra": "ignore"}
    type: Annotated[
        str,
        _not_supported(
            "block", "blocks are", f"use {', '.join(BLOCK_KINDS[:-1])} or {BLOCK_KINDS[-1]}"
        ),
    ]


Block = Annotated[
    Annotated[TextBlock, member_tag("~text")]
    | Annotated[ImageBlock, member_tag("~image")]
    | Annotated[ToolUseBlock, member_tag("~tool_use")]
    | Annotated[ToolResultBlock, member_tag("~tool_result")]
    | Annotated[ThinkingBlock, member_tag("~thinking")]
    | Annotated[UnsupportedBlock, member_tag("~other")],
    _type_tag(BLOCK_KINDS),
    Says("must be a content block: an object with a 'type'"),
]


class InputMessage(Shape):
    SAYS: ClassVar[str] = "must be an object with 'role' and 'content'"

    role: Annotated[
        Literal["user", "assistant"],
        Says("must be 'user' or 'assistant' (the system prompt is the body's 'system')"),
    ]
    content: Annotated[
        Annotated[str, member_tag("~text")]
        | Annotated[list[Block], Field(min_length=1), member_tag("~list")],
        Discriminator(_text_or_list),
        Says("must be a string or a non-empty list of content blocks"),
    ]


class CustomTool(Shape):
    """A tool the client runs: what the model sees of it and the schema its calls
    are checked against (and, when forced, generated from)."""

    SAYS: ClassVar[str] = "must be an object with 'name' and 'input_schema'"

    type: Annotated[Literal["custom"], Says("must be 'custom'")] | None = None
    name: ToolName
    description: (
        Annotated[str, Field(max_length=MAX_DESCRIPTION), Says("must be a string")] | None
    ) = None
    input_schema: Annotated[
        dict[str, Any],
        AfterValidator(_schema_within_limits),
        Says("must be a JSON Schema object"),
    ]
    cache_control: CacheControl | None = None
    strict: Annotated[bool, Says("must be true or false")] | None = None
    """Accepted: every call is checked against ``input_schema`` (and a forced one
    generated from it); one that does not fit is reported, never passed as a call."""

    def native(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ServerTool(Shape):
    model_config = Shape.model_config | {"extra": "ignore"}
    type: Annotated[
        str,
        _not_supported(
            "server_tool",
            "tools are Anthropic's server tools, which are",
            "give custom tools {'name', 'description', 'input_schema'}",
        ),
    ]

    def native(self) -> dict[str, Any]:
        raise AssertionError("a server tool never validates")


def _tool_tag(value: Any) -> str | None:
    if isinstance(value, Shape):
        return "~server" if isinstance(value, ServerTool) else "~custom"
    if not isinstance(value, dict):
        return None
    return "~custom" if value.get("type") in (None, "custom") else "~server"


AnyTool = Annotated[
    Annotated[CustomTool, member_tag("~custom")] | Annotated[ServerTool, member_tag("~server")],
    Discriminator(_tool_tag),
    Says(CustomTool.SAYS),
]

ParallelFlag = Annotated[bool, Says("must be true or false")] | None


class AutoChoice(Shape):
    type: Literal["auto"]
    disable_parallel_tool_use: ParallelFlag = None


class AnyChoice(Shape):
    type: Literal["any"]
    disable_parallel_tool_use: ParallelFlag = None


class NamedChoice(Shape):
    type: Literal["tool"]
    name: ToolName
    disable_parallel_tool_use: ParallelFlag = None


class NoChoice(Shape):
    type: Literal["none"]


CHOICE_MESSAGE = "must be an object with 'type' 'auto', 'any', 'tool' (with 'name') or 'none'"

ToolChoice = Annotated[
    Annotated[AutoChoice, member_tag("~auto")]
    | Annotated[AnyChoice, member_tag("~any")]
    | Annotated[NamedChoice, member_tag("~tool")]
    | Annotated[NoChoice, member_tag("~none")],
    _type_tag(("auto", "any", "tool", "none")),
    Says(CHOICE_MESSAGE),
]


Display = (
    Annotated[Literal["summarized", "omitted"], Says("must be 'summarized' or 'omitted'")] | None
)


class ThinkingEnabled(Shape):
    type: Literal["enabled"]
    budget_tokens: Annotated[int, Field(ge=1), Says("must be a positive integer")]
    display: Display = None


class ThinkingAdaptive(Shape):
    type: Literal["adaptive"]
    display: Display = None


class ThinkingDisabled(Shape):
    type: Literal["disabled"]


THINKING_MESSAGE = (
    "must be an object with 'type' 'enabled' (with 'budget_tokens'), 'adaptive' or 'disabled'"
)

Thinking = Annotated[
    Annotated[ThinkingEnabled, member_tag("~enabled")]
    | Annotated[ThinkingAdaptive, member_tag("~adaptive")]
    | Annotated[ThinkingDisabled, member_tag("~disabled")],
    _type_tag(("enabled", "adaptive", "disabled")),
    Says(THINKING_MESSAGE),
]


class JsonOutputFormat(Shape):
    type: Annotated[Literal["json_schema"], Says("must be 'json_schema'")]
    schema_: Annotated[
        dict[str, Any], Says("must be a JSON Schema object"), AfterValidator(_schema_within_limits)
    ] = Field(alias="schema")


class OutputConfig(Shape):
    format: JsonOutputFormat | None = None
    """The answer is constrained to the schema with a grammar."""
    effort: Annotated[
        None,
        Says(
            "is not supported: a level is not a budget the engine can keep to; "
            "turn thinking on or off with 'thinking'"
        ),
    ] = None


class Metadata(Shape):
    """Accepted and ignored: nothing here tells users apart."""

    user_id: Annotated[str, Says("must be a string")] | None = None


STOP_SEQUENCES_MESSAGE = (
    f"must be a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
    f"{MAX_STOP_LENGTH} characters"
)


class MessagesBody(Shape):
    """``POST /v1/messages``."""

    ROOT: ClassVar[str] = "body"
    SAYS: ClassVar[str] = "the request body must be a JSON object"

    model: Annotated[str, Says("must be a string")] | None = None
    """Echoed in the answer (the balancer serves one model); none: the served model's id."""
    max_tokens: MaxTokens
    messages: Annotated[
        list[InputMessage], Field(min_length=1), Says("must be a non-empty list of messages")
    ]
    system: (
        Annotated[
            Annotated[str, member_tag("~text")] | Annotated[list[TextBlock], member_tag("~list")],
            Discriminator(_text_or_list),
            Says("must be a string or a list of text blocks"),
        ]
        | None
    ) = None
    tools: (
        Annotated[
            list[AnyTool],
            Field(max_length=MAX_TOOLS),
            Says("must be a list of tools", too_long=f"has more than {MAX_TOOLS} tools"),
        ]
        | None
    ) = None
    tool_choice: ToolChoice | None = None
    temperature: Probability | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    stop_sequences: (
        Annotated[
            list[StopString],
            Field(max_length=MAX_STOP_STRINGS),
            Says(STOP_SEQUENCES_MESSAGE, whole=True),
        ]
        | None
    ) = None
    stream: Annotated[bool, Says("must be true or false")] | None = None
    thinking: Thinking | None = None
    metadata: Metadata | None = None
    cache_control: CacheControl | None = None
    output_config: OutputConfig | None = None

    def to_request(self) -> dict[str, Any]:
        """The broker's conversation request (wire form)."""
        last = len(self.messages) - 1
        if self.messages[last].role == "assistant":
            raise invalid_body(
                f"messages[{last}].role",
                "a last assistant turn (to continue from) is not supported: chat templates "
                "close every assistant turn they render",
            )
        history: list[dict[str, Any]] = []
        if self.system:
            history.append({"role": "system", "content": _joined(self.system)})
        for index, message in enumerate(self.messages):
            history.extend(_turns(index, message))
        request: dict[str, Any] = {
            "conversation_history": history,
            "max_tokens": self.max_tokens,
        }
        self._thinking(request)
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(self, name)
            if value is not None:
                request[name] = value
        if self.stop_sequences:
            request["stop"] = list(self.stop_sequences)
        if self.output_config is not None and self.output_config.format is not None:
            schema = self.output_config.format.schema_
            request["grammar"] = {"type": "json_schema", "schema": dumps(schema)}
            if "reasoning_budget" in request:
                raise invalid_body("thinking.budget_tokens", BUDGET_WITH_GRAMMAR)
        self._tools(request)
        problem = tool_choice_problem(request)
        if problem:
            raise invalid_body(*problem)
        return trusted_wire(ConversationRequest, request)

    def _thinking(self, request: dict[str, Any]) -> None:
        """Thinking models think only when asked, as Anthropic's models do; a budget
        is kept by the agent, which closes the reasoning block when it is spent."""
        thinking = self.thinking
        request["enable_thinking"] = isinstance(thinking, ThinkingEnabled | ThinkingAdaptive)
        if isinstance(thinking, ThinkingEnabled) and thinking.budget_tokens < self.max_tokens:
            request["reasoning_budget"] = thinking.budget_tokens

    def _tools(self, request: dict[str, Any]) -> None:
        choice = self.tool_choice
        if isinstance(choice, AutoChoice) and choice.disable_parallel_tool_use:
            raise invalid_body(
                "tool_choice.disable_parallel_tool_use",
                "is enforced only with type 'any' or 'tool' (a grammar then allows one "
                "call); with 'auto' the model may write several",
            )
        if not self.tools or isinstance(choice, NoChoice):
            if isinstance(choice, AnyChoice | NamedChoice):
                raise invalid_body("tool_choice", "needs tools to choose from")
            return
        request["tools"] = [tool.native() for tool in self.tools]
        request["parse_tool_calls"] = True
        if isinstance(choice, AnyChoice):
            request["tool_choice"] = "required"
        elif isinstance(choice, NamedChoice):
            request["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        if isinstance(choice, AnyChoice | NamedChoice):
            request["parallel_tool_calls"] = not choice.disable_parallel_tool_use

    def shows_thinking(self) -> bool:
        display = getattr(self.thinking, "display", None)
        return display != "omitted"


GENERATION_ONLY = (
    "max_tokens",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "metadata",
)
"""Fields of a Messages body that ``count_tokens`` refuses, as Anthropic does: they
shape an answer, and counting makes none."""


class CountTokensBody(MessagesBody):
    """``POST /v1/messages/count_tokens``: a Messages body without the fields that
    only generation uses (``GENERATION_ONLY``, refused with a 400 that names them
    before this shape is checked, and left out of its schema)."""

    model_config = schema_without(*GENERATION_ONLY)

    max_tokens: MaxTokens = 1
    """Not sent (refused): the default only satisfies the shared conversion."""


def _joined(content: str | list[TextBlock]) -> str:
    if isinstance(content, str):
        return content
    return BLOCK_SEPARATOR.join(block.text for block in content)


def _turns(index: int, message: InputMessage) -> list[dict[str, Any]]:
    """The conversation messages of one Anthropic turn."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    allowed = (
        (TextBlock, ToolUseBlock, ThinkingBlock)
        if message.role == "assistant"
        else (TextBlock, ToolResultBlock)
    )
    for number, block in enumerate(message.content):
        if not isinstance(block, allowed):
            raise invalid_body(
                f"messages[{index}].content[{number}].type",
                f"{block.type!r} blocks are not allowed in a turn of the {message.role}",
            )
    if message.role == "assistant":
        return [_assistant_turn(message.content)]
    return _user_turns(message.content)


def _assistant_turn(blocks: list[Any]) -> dict[str, Any]:
    text = [block.text for block in blocks if isinstance(block, TextBlock)]
    turn: dict[str, Any] = {"role": "assistant", "content": BLOCK_SEPARATOR.join(text)}
    calls = [
        {
            "id": block.id,
            "type": "function",
            "function": {
                "name": block.name,
                "arguments": json.dumps(block.input, ensure_ascii=False),
            },
        }
        for block in blocks
        if isinstance(block, ToolUseBlock)
    ]
    if calls:
        turn["tool_calls"] = calls
    reasoning = [block.thinking for block in blocks if isinstance(block, ThinkingBlock)]
    if reasoning:
        turn["reasoning_content"] = BLOCK_SEPARATOR.join(reasoning)
    return turn


def _user_turns(blocks: list[Any]) -> list[dict[str, Any]]:
    """A ``tool`` message per tool result and a user message per run of text blocks
    (joined), in their order."""
    turns: list[dict[str, Any]] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            turns.append({"role": "user", "content": BLOCK_SEPARATOR.join(run)})
            run.clear()

    for block in blocks:
        if isinstance(block, ToolResultBlock):
            flush()
            turns.append(
                {"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}
            )
        elif isinstance(block, TextBlock):
            run.append(block.text)
        else:
            raise AssertionError(f"a {block.type!r} block is not allowed in a user turn")
    flush()
    return turns
