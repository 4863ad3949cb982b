"""The body of ``POST /v1/responses`` (OpenAI's Responses API) as shapes.

Unlike the chat bodies, an unknown field is a 400 that names it, and every field
OpenAI has is either honoured or refused with a 400 (a few that do not concern a
server are accepted; the README lists them). What the body asks of the model is
built by ``ChatCompletionBody.to_request`` from the same fields a chat completion
would carry, so both APIs mean the same by each (sampling, ``tool_choice`` and its
grammar, ``text.format`` as a grammar, thinking on or off).

Its input items, and the messages they become, are ``responses_items``'.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Discriminator, Field
from pydantic_core import PydanticCustomError

from paddler.http.openai.errors import invalid
from paddler.http.openai.responses_items import (
    LOGPROBS_INCLUDE,
    Flag,
    Input,
    Text,
    Unsupported,
    _tag,
    _unsupported,
    messages_of,
)
from paddler.http.openai.schemas import (
    CacheRetention,
    ChatCompletionBody,
    JsonObjectFormat,
    JsonSchemaFormat,
    JsonSchemaSpec,
    Metadata,
    OpenAITemperature,
    TextFormat,
    _format_tag,
    _refuse,
)
from paddler.protocol.requests import MaxTokens, Probability, TopLogprobs
from paddler.protocol.shapes import Says, Shape, member_tag, schema_without
from paddler.protocol.tool_calls import (
    MAX_TOOLS,
    FunctionSpec,
    NamedFunction,
    NamedToolChoice,
    Tool,
    ToolName,
)

# -------------------------------------------------------------------------- tools


class FunctionTool(FunctionSpec):
    """A function tool as the Responses API gives it: flat, with ``type``."""

    model_config = FunctionSpec.model_config | {"extra": "forbid"}
    SAYS: ClassVar[str] = "must be an object with 'type' and 'name'"

    type: Literal["function"]

    def chat_tool(self) -> Tool:
        """The tool as chat completions (and the broker) have it."""
        spec = FunctionSpec.model_construct(
            name=self.name,
            description=self.description,
            parameters=self.parameters,
            strict=self.strict,
        )
        return Tool.model_construct(type="function", function=spec)


class UnsupportedTool(Unsupported):
    type: Annotated[
        str, _unsupported("tools", "only 'function' tools are (this server runs no tools itself)")
    ]


ResponsesTool = Annotated[
    Annotated[FunctionTool, member_tag("~function")]
    | Annotated[UnsupportedTool, member_tag("~unsupported")],
    _tag(("function",)),
    Says("must be an object with a 'type'"),
]

TOOL_CHOICE_MESSAGE = "must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}"


class FunctionChoice(Shape):
    """``{"type": "function", "name": ...}``: call this tool."""

    SAYS: ClassVar[str] = TOOL_CHOICE_MESSAGE

    type: Literal["function"]
    name: ToolName


class UnsupportedChoice(Unsupported):
    type: Annotated[str, _unsupported("tool choices", TOOL_CHOICE_MESSAGE)]


ResponsesToolChoice = Annotated[
    Annotated[Literal["auto", "none", "required"], member_tag("~str"), Says(TOOL_CHOICE_MESSAGE)]
    | Annotated[FunctionChoice, member_tag("~function")]
    | Annotated[UnsupportedChoice, member_tag("~unsupported")],
    _tag(("~str", "function")),
    Says(TOOL_CHOICE_MESSAGE),
]


# ---------------------------------------------------------------- text and others


class JsonSchemaTextFormat(JsonSchemaSpec):
    """``{"type": "json_schema", "name", "schema", "description", "strict"}``: the
    output follows the schema (a grammar)."""

    SAYS: ClassVar[str] = "must be an object with 'type' and 'schema'"

    type: Literal["json_schema"]


FORMAT_TYPES = "must be 'text', 'json_object' or 'json_schema'"


class TextConfig(Shape):
    format: (
        Annotated[
            Annotated[TextFormat, member_tag("~text")]
            | Annotated[JsonObjectFormat, member_tag("~json_object")]
            | Annotated[JsonSchemaTextFormat, member_tag("~json_schema")],
            Discriminator(_format_tag),
            Says(f"must be an object whose type {FORMAT_TYPES[5:]}"),
        ]
        | None
    ) = None
    verbosity: Annotated[Any, _refuse("is not supported: the model writes as long as it does")] = (
        None
    )

    def response_format(self) -> TextFormat | JsonObjectFormat | JsonSchemaFormat | None:
        """The format as chat's ``response_format``."""
        if isinstance(self.format, JsonSchemaTextFormat):
            return JsonSchemaFormat.model_construct(type="json_schema", json_schema=self.format)
        return self.format


class ReasoningConfig(Shape):
    effort: (
        Annotated[
            Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"],
            Says("must be 'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'"),
        ]
        | None
    ) = None
    """``none`` turns thinking off; any other level turns it on (a level is not a
    budget here: the model reasons as long as it does)."""
    summary: Annotated[
        Any, _refuse("is not supported: reasoning comes as its text, not summarised")
    ] = None
    generate_summary: Annotated[
        Any, _refuse("is not supported: reasoning comes as its text, not summarised")
    ] = None
    context: Annotated[
        Any, _refuse("is not supported: the chat template decides which reasoning it shows")
    ] = None
    mode: Annotated[Any, _refuse("is not supported")] = None


class StreamOptions(Shape):
    include_obfuscation: Annotated[
        Literal[False], Says("may only be false: this server does not pad stream events")
    ] = False


def _include(value: str) -> str:
    if value != LOGPROBS_INCLUDE:
        raise PydanticCustomError(
            "include",
            f"{value!r} is not supported; only {LOGPROBS_INCLUDE!r} is",
        )
    return value


class ConversationRef(Shape):
    SAYS: ClassVar[str] = "must be a conversation id or an object with its 'id'"

    id: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]


def _id_or_object(value: Any) -> str | None:
    return "~id" if isinstance(value, str) else "~object" if isinstance(value, dict) else None


ConversationParam = Annotated[
    Annotated[str, member_tag("~id")] | Annotated[ConversationRef, member_tag("~object")],
    Discriminator(_id_or_object),
    Says("must be a conversation id or an object with its 'id'"),
]


# ---------------------------------------------------------------------- the body


class ResponsesBody(Shape):
    """``POST /v1/responses``."""

    ROOT: ClassVar[str] = "body"
    SAYS: ClassVar[str] = "the request body must be a JSON object"

    model: Text | None = None
    input: Input | None = None
    """A string (one user message) or input items; continues the conversation of
    ``previous_response_id`` when given."""
    instructions: Text | None = None
    """The system message (not carried over by ``previous_response_id``)."""
    previous_response_id: Text | None = None
    store: Flag | None = None
    """Keep the response (default ``true``) for ``previous_response_id`` and ``GET``."""
    tools: (
        Annotated[
            list[ResponsesTool],
            Field(max_length=MAX_TOOLS),
            Says("must be a list of tools", too_long=f"has more than {MAX_TOOLS} tools"),
        ]
        | None
    ) = None
    tool_choice: ResponsesToolChoice | None = None
    parallel_tool_calls: Flag | None = None
    text: TextConfig | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: OpenAITemperature | None = None
    top_p: Probability | None = None
    top_logprobs: TopLogprobs | None = None
    include: (
        Annotated[list[Annotated[str, AfterValidator(_include)]], Says("must be a list")] | None
    ) = None
    reasoning: ReasoningConfig | None = None
    stream: Flag | None = None
    stream_options: StreamOptions | None = None
    metadata: Metadata | None = None
    truncation: (
        Annotated[
            Literal["disabled"],
            Says("may only be 'disabled': a conversation too long for the context is an error"),
        ]
        | None
    ) = None
    background: (
        Annotated[Literal[False], Says("may only be false: responses are answered at once")] | None
    ) = None
    max_tool_calls: Annotated[int, Field(ge=1), Says("must be a positive integer")] | None = None
    """Counts calls of built-in tools; this server has none, so there is nothing to count."""
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    """Prompts are cached by their prefix on every agent: there is no key to give."""
    prompt_cache_retention: CacheRetention | None = None
    service_tier: Text | None = None
    """Every request is served alike (the response says ``default``)."""
    conversation: ConversationParam | None = None
    """The conversation (``/v1/conversations``) whose items come before the input and
    that gets this response's input and output items when it completes."""
    prompt: Annotated[Any, _refuse("(reusable prompt templates) is not supported")] = None
    context_management: Annotated[Any, _refuse("is not supported")] = None
    moderation: Annotated[Any, _refuse("is not supported: this server moderates nothing")] = None
    image: Annotated[Any, _refuse("is not supported: this server writes text only")] = None
    access_programs: Annotated[Any, _refuse("is not supported")] = None
    background_options: Annotated[
        Any, _refuse("is not supported: responses are answered at once")
    ] = None
    prompt_cache_options: Annotated[
        Any, _refuse("is not supported: prompts are cached by their prefix")
    ] = None

    @property
    def conversation_id(self) -> str | None:
        conversation = self.conversation
        return conversation.id if isinstance(conversation, ConversationRef) else conversation

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def input_messages(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``history`` (the conversation continued) with this body's input after it."""
        if self.input is None:
            return list(history)
        if isinstance(self.input, str):
            return [*history, {"role": "user", "content": self.input}]
        return messages_of(self.input, history)

    def broker_request(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The broker's conversation request for ``history`` (instructions first)."""
        if not history:
            raise invalid("input", "is required (a string or a non-empty list of items)")
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs", f"needs include: [{LOGPROBS_INCLUDE!r}]")
        choice = self.tool_choice
        chat = ChatCompletionBody.model_construct(
            messages=[],
            max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            response_format=self.text.response_format() if self.text else None,
            tools=[tool.chat_tool() for tool in self.tools or () if isinstance(tool, FunctionTool)],
            tool_choice=(
                NamedToolChoice.model_construct(
                    type="function", function=NamedFunction.model_construct(name=choice.name)
                )
                if isinstance(choice, FunctionChoice)
                else choice
            ),
            parallel_tool_calls=self.parallel_tool_calls,
            reasoning_effort=self.reasoning.effort if self.reasoning else None,
            logprobs=self.logprobs or None,
            top_logprobs=self.top_logprobs,
        )
        request = chat.to_request()
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        request["conversation_history"] = [*system, *history]
        return request


COUNT_REFUSED = (
    "max_output_tokens",
    "temperature",
    "top_p",
    "top_logprobs",
    "include",
    "stream",
    "stream_options",
    "store",
    "metadata",
    "background",
    "max_tool_calls",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
)
"""Fields of a Responses body that ``POST /v1/responses/input_tokens`` refuses (as
OpenAI's, which takes only what shapes the prompt): they shape an answer, and
counting makes none."""


class InputTokensBody(ResponsesBody):
    """``POST /v1/responses/input_tokens``: a Responses body without the fields that
    only generation uses (``COUNT_REFUSED``, refused with a 400 that names them before
    this shape is checked, and left out of its schema)."""

    model_config = schema_without(*COUNT_REFUSED)
