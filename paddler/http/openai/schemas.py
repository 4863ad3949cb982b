"""The OpenAI request bodies as shapes, and what they become for the broker.

Fields the native API also has use its field types (``MaxTokens``, ``Stop``,
``Probability``...), so a body that validates here is a valid broker request:
``to_request`` builds the wire form without validating it again. Unknown fields
are a 400 that names them, as OpenAI answers them; the fields OpenAI has that do
not concern this server (``user``, ``metadata``, ``store: false``...) are accepted,
and those it cannot honour are refused by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    ValidationInfo,
    model_validator,
)
from pydantic import field_validator as validates
from pydantic_core import PydanticCustomError

from paddler.http.common import dumps
from paddler.http.openai.errors import invalid_body
from paddler.protocol.grammar_limits import json_schema_problem
from paddler.protocol.requests import (
    TEXT_ONLY_MESSAGE,
    ConversationRequest,
    LogitBias,
    MaxTokens,
    Penalty,
    Probability,
    RawPromptRequest,
    Stop,
    TopK,
    TopLogprobs,
    trusted_wire,
)
from paddler.protocol.shapes import Says, Shape, member_tag
from paddler.protocol.tool_calls import (
    NamedToolChoice,
    Tool,
    ToolChoice,
    Tools,
    tool_choice_problem,
)

CHAT_ROLES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
MESSAGE_EXTRAS = ("name", "tool_calls", "tool_call_id")
"""Message fields passed to the chat template as they are."""

EFFORT_BUDGETS = {"minimal": 128, "low": 512, "medium": 2048}
"""Reasoning tokens each ``reasoning_effort`` level allows (``high``: as many as the
model writes, within ``max_tokens``)."""

SEED_MASK = 0xFFFFFFFF
"""OpenAI takes any 64-bit seed; llama.cpp's is 32 bits."""


class OpenAIShape(Shape):
    """Strict types; an unknown field is a 400 that names it (OpenAI's own servers
    answer "Unrecognized request argument" too), but in messages and their parts,
    whose other fields describe them (``MessageShape``)."""


class MessageShape(OpenAIShape):
    """A message or a content part: fields other than those declared describe it (an
    assistant message sent back as the SDK gave it has ``refusal``, ``annotations``,
    ``audio``...) and are not read."""

    model_config = Shape.model_config | {"extra": "ignore"}


# ------------------------------------------------------------------ field types

OpenAITemperature = Annotated[float, Field(ge=0, le=2), Says("must be a number from 0 to 2")]
AnySeed = Annotated[int, Says("must be an integer")]
Flag = Annotated[bool, Says("must be true or false")]
OnlyOne = Annotated[int, Field(ge=1, le=1), Says("only 1 is supported")]
ModelName = Annotated[str, Says("must be a string")]


MAX_METADATA = 16


def _metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_METADATA:
        raise PydanticCustomError("metadata", f"may have at most {MAX_METADATA} keys")
    for key, text in value.items():
        if len(key) > 64 or len(text) > 512:
            raise PydanticCustomError(
                "metadata", "keys may have at most 64 characters, values at most 512"
            )
    return value


Metadata = Annotated[
    dict[str, str],
    AfterValidator(_metadata),
    Says("must be an object of strings", out_of_range=None),
]


Text = Annotated[str, Says("must be a string")]
CacheRetention = Annotated[
    Literal["in_memory"],
    Says("may only be 'in_memory': agents keep prompts in their slots' memory"),
]


class StreamOptions(OpenAIShape):
    include_usage: Flag | None = None
    include_obfuscation: (
        Annotated[
            Literal[False],
            Says("may only be false: this server pads no stream (its events are not obfuscated)"),
        ]
        | None
    ) = None


# ------------------------------------------------------------------- messages


class TextPart(MessageShape):
    type: Literal["text"]
    text: Annotated[str, Says("must be a string")]

    def native(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


class RefusalPart(MessageShape):
    type: Literal["refusal"]
    refusal: Annotated[str, Says("must be a string")]

    def native(self) -> dict[str, Any]:
        return {"type": "text", "text": self.refusal}


class ImageUrl(MessageShape):
    url: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]


class ImagePart(MessageShape):
    """Refused (a 400 naming the part): the agents serve text-only models, so an
    image would never reach the model."""

    type: Literal["image_url"]
    image_url: Annotated[
        ImageUrl, BeforeValidator(lambda v: {"url": v} if isinstance(v, str) else v)
    ]

    @model_validator(mode="after")
    def _refused(self) -> ImagePart:
        raise PydanticCustomError(
            "multimodal", "'image_url' parts are not supported: {why}", {"why": TEXT_ONLY_MESSAGE}
        )

    def native(self) -> dict[str, Any]:
        raise AssertionError("an image part never validates")


def _unsupported(kind: str) -> str:
    raise PydanticCustomError(
        "unsupported_part",
        "{kind} parts are not supported; use 'text'",
        {"kind": repr(kind)},
    )


class UnsupportedPart(MessageShape):
    """Never valid: names the ``type`` that is not supported."""

    type: Annotated[str, AfterValidator(_unsupported)]

    def native(self) -> dict[str, Any]:
        raise AssertionError("an unsupported part never validates")


PART_KINDS = {"text": TextPart, "refusal": RefusalPart, "image_url": ImagePart}


def _part_tag(value: Any) -> str | None:
    if isinstance(value, OpenAIShape):
        return f"~{getattr(value, 'type', '')}"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        return None
    return f"~{value['type']}" if value["type"] in PART_KINDS else "~unsupported"


ContentPart = Annotated[
    Annotated[TextPart, member_tag("~text")]
    | Annotated[RefusalPart, member_tag("~refusal")]
    | Annotated[ImagePart, member_tag("~image_url")]
    | Annotated[UnsupportedPart, member_tag("~unsupported")],
    Discriminator(_part_tag),
    Says("must be an object with a 'type'"),
]


def _text_or_parts(value: Any) -> str | None:
    return "~text" if isinstance(value, str) else "~parts" if isinstance(value, list) else None


def _text_or_list(value: Any) -> str | None:
    return "~text" if isinstance(value, str) else "~list" if isinstance(value, list) else None


class ChatMessage(MessageShape):
    model_config = MessageShape.model_config | {"extra": "allow"}
    SAYS: ClassVar[str] = "must be an object with 'role' and 'content'"

    role: Annotated[
        Literal["system", "developer", "user", "assistant", "tool", "function"],
        Says(f"must be one of {', '.join(CHAT_ROLES)}"),
    ]
    content: (
        Annotated[
            Annotated[str, member_tag("~text")]
            | Annotated[list[ContentPart], member_tag("~parts")],
            Discriminator(_text_or_parts),
            Says("must be a string or a list of content parts"),
        ]
        | None
    ) = Field(default=None, validate_default=True)

    @validates("content")
    @classmethod
    def _only_assistants_say_nothing(cls, content: Any, info: ValidationInfo) -> Any:
        if content is None and info.data.get("role") != "assistant":
            raise PydanticCustomError("content", "must be a string or a list of content parts")
        return content

    def native(self) -> dict[str, Any]:
        """The message as the chat template sees it."""
        out: dict[str, Any] = {"role": CHAT_ROLES[self.role]}
        if isinstance(self.content, str):
            out["content"] = self.content
        elif self.content is None:
            out["content"] = ""  # an assistant turn that only called tools
        else:
            out["content"] = [part.native() for part in self.content]
        extras = self.model_extra or {}
        for name in MESSAGE_EXTRAS:
            if extras.get(name) is not None:
                out[name] = extras[name]
        return out


# -------------------------------------------------------------- response format


FORMAT_TYPES = "must be 'text', 'json_object' or 'json_schema'"


class TextFormat(OpenAIShape):
    type: Annotated[Literal["text"], Says(FORMAT_TYPES)]


class JsonObjectFormat(OpenAIShape):
    type: Annotated[Literal["json_object"], Says(FORMAT_TYPES)]


def _within_grammar_limits(schema: dict[str, Any] | bool) -> dict[str, Any] | bool:
    """The schema becomes the broker's grammar: the native API's limits on its text,
    its depth and its patterns (``paddler.protocol.grammar_limits``) apply here."""
    try:
        problem = json_schema_problem(dumps(schema))
    except RecursionError:  # deeper than any body read_json lets in
        problem = "nests too deep"
    if problem:
        raise PydanticCustomError("grammar_limit", "{problem}", {"problem": problem})
    return schema


class JsonSchemaSpec(OpenAIShape):
    SAYS: ClassVar[str] = "must be an object with a 'schema'"

    schema_: Annotated[
        dict[str, Any] | bool,
        Says("must be a JSON Schema object"),
        AfterValidator(_within_grammar_limits),
    ] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    name: Text | None = None
    description: Text | None = None
    """The schema's name and what it is for: they describe it to OpenAI's models; the
    grammar follows the schema alone."""
    strict: Flag | None = None
    """What happens anyway: the output follows the schema (a grammar)."""


class JsonSchemaFormat(OpenAIShape):
    type: Annotated[Literal["json_schema"], Says(FORMAT_TYPES)]
    json_schema: Annotated[JsonSchemaSpec, Says(JsonSchemaSpec.SAYS)]


def _format_tag(value: Any) -> str | None:
    if isinstance(value, OpenAIShape):
        return f"~{getattr(value, 'type', '')}"
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    return f"~{kind}" if kind in ("text", "json_object", "json_schema") else "~text"


ResponseFormat = Annotated[
    Annotated[TextFormat, member_tag("~text")]
    | Annotated[JsonObjectFormat, member_tag("~json_object")]
    | Annotated[JsonSchemaFormat, member_tag("~json_schema")],
    Discriminator(_format_tag),
    Says("must be an object with a 'type'"),
]


def grammar_of(response_format: Any) -> dict[str, Any] | None:
    """The broker's grammar for OpenAI's ``response_format``."""
    if isinstance(response_format, JsonObjectFormat):
        return {"type": "json_schema", "schema": dumps({"type": "object"})}
    if isinstance(response_format, JsonSchemaFormat):
        return {"type": "json_schema", "schema": dumps(response_format.json_schema.schema_)}
    return None


def tool_maps(tools: list[Tool]) -> list[dict[str, Any]]:
    """Validated tools as the maps the broker and the chat template get."""
    return [tool.model_dump(exclude_none=True) for tool in tools]


def choice_map(choice: str | NamedToolChoice) -> str | dict[str, Any]:
    return choice if isinstance(choice, str) else choice.model_dump()


def _refuse(message: str) -> AfterValidator:
    def refuse(value: Any) -> None:
        if value is not None:
            raise PydanticCustomError("refused", message)

    return AfterValidator(refuse)


RefusedTools = Annotated[Any, _refuse("is the deprecated form of tools: send tools")]
RefusedToolChoice = Annotated[
    Any, _refuse("is the deprecated form of tool_choice: send tool_choice")
]
RefusedAudio = Annotated[Any, _refuse("is not supported: this server writes text only")]
RefusedPrediction = Annotated[Any, _refuse("(predicted outputs) is not supported")]
RefusedSearch = Annotated[Any, _refuse("is not supported: this server has no web search")]
RefusedSuffix = Annotated[Any, _refuse("(text after the insertion point) is not supported")]
RefusedVerbosity = Annotated[
    Any, _refuse("is not supported: the model writes as long as it writes (see max_tokens)")
]
"""Fields OpenAI has that this server does not honour: only ``null`` (or absent)
passes, anything else is a 400 that names the field."""


# ------------------------------------------------------------------------ bodies


class ChatTemplateKwargs(OpenAIShape):
    """The variables of the chat template a request may set: ``enable_thinking``
    (what ``reasoning_effort: "none"`` turns off)."""

    SAYS: ClassVar[str] = "must be an object"

    enable_thinking: Flag | None = None


@dataclass
class Options:
    """What the response needs to know about the request."""

    model: str | None
    stream: bool
    include_usage: bool
    echo: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


class SamplingBody(OpenAIShape):
    """The options both generation endpoints take."""

    ROOT: ClassVar[str] = "body"
    SAYS: ClassVar[str] = "the request body must be a JSON object"

    model: ModelName | None = None
    max_tokens: MaxTokens | None = None
    temperature: OpenAITemperature | None = None
    top_p: Probability | None = None
    min_p: Probability | None = None  # not OpenAI's; llama.cpp servers take it
    top_k: TopK | None = None
    seed: AnySeed | None = None
    stop: Stop | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    n: OnlyOne | None = None
    logit_bias: LogitBias | None = None
    stream: Flag | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = None
    """Names the end user for OpenAI's abuse monitoring; nothing here reads it."""

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """The broker request fields of the sampling options that were given."""
        request: dict[str, Any] = {}
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        for name in ("temperature", "top_p", "min_p", "top_k"):
            value = getattr(self, name)
            if value is not None:
                request[name] = value
        if self.seed is not None:
            request["seed"] = self.seed & SEED_MASK
        if self.stop:
            request["stop"] = self.stop
        for name in ("frequency_penalty", "presence_penalty", "logit_bias"):
            value = getattr(self, name)
            if value is not None:
                request[name] = value
        return request

    def options(self) -> Options:
        include_usage = bool(self.stream_options and self.stream_options.include_usage)
        return Options(self.model, bool(self.stream), include_usage)


class ChatCompletionBody(SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: Annotated[
        list[ChatMessage], Field(min_length=1), Says("must be a non-empty list of messages")
    ]
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    """``auto`` (the default): the model may call tools or answer; ``none``: the tools
    are not shown; ``required`` or a named function: the model must call (enforced
    with a grammar built from the tools' schemas)."""
    parallel_tool_calls: Flag | None = None
    reasoning_effort: (
        Annotated[
            Literal["none", "minimal", "low", "medium", "high"],
            Says("must be 'none', 'minimal', 'low', 'medium' or 'high'"),
        ]
        | None
    ) = None
    """``none`` turns thinking off; the other levels turn it on with a reasoning
    budget (``EFFORT_BUDGETS``): the agent closes the reasoning block after that many
    tokens and the model answers."""
    logprobs: Flag | None = None
    top_logprobs: TopLogprobs | None = None
    functions: RefusedTools = None
    function_call: RefusedToolChoice = None
    audio: RefusedAudio = None
    modalities: (
        Annotated[
            list[Literal["text"]],
            Says("may only be ['text']: this server writes text", whole=True),
        ]
        | None
    ) = None
    prediction: RefusedPrediction = None
    web_search_options: RefusedSearch = None
    verbosity: RefusedVerbosity = None
    store: (
        Annotated[
            Literal[False],
            Says(
                "may only be false: chat completions are not kept here (the Responses API "
                "keeps responses: POST /v1/responses with store)"
            ),
        ]
        | None
    ) = None
    metadata: Metadata | None = None
    """Tags a kept completion at OpenAI; checked for OpenAI's bounds, kept nowhere."""
    service_tier: Text | None = None
    """Every request is served alike: there is no tier to choose."""
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    """Prompts are cached by their prefix on every agent: there is no key to give."""
    prompt_cache_retention: CacheRetention | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    """llama.cpp's and vLLM's servers take it: ``enable_thinking`` is honoured."""

    @validates("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("needs_logprobs", "needs logprobs: true")
        return value

    def to_request(self) -> dict[str, Any]:
        """The broker's conversation request (wire form)."""
        max_tokens = self.max_completion_tokens or self.max_tokens
        request = {
            "conversation_history": [m.native() for m in self.messages],
            **self.sampling(max_tokens),
        }
        if self.logprobs:
            request["logprobs"] = True
            request["top_logprobs"] = self.top_logprobs or 0
        # thinking models think unless told not to, as their templates do by default
        thinking = self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None
        effort = self.reasoning_effort
        if thinking is not None and effort is not None and thinking != (effort != "none"):
            raise invalid_body(
                "chat_template_kwargs.enable_thinking", f"contradicts reasoning_effort {effort!r}"
            )
        request["enable_thinking"] = (
            thinking if thinking is not None else self.reasoning_effort != "none"
        )
        grammar = grammar_of(self.response_format)
        if grammar is not None:
            request["grammar"] = grammar
        budget = EFFORT_BUDGETS.get(effort) if effort is not None else None
        if request["enable_thinking"] and budget is not None and grammar is None:
            # with response_format the grammar decides every token: no budget to keep
            request["reasoning_budget"] = budget
        if self.tools and self.tool_choice != "none":
            request["tools"] = tool_maps(self.tools)  # the chat template shows them
            request["parse_tool_calls"] = True
            if self.tool_choice is not None:
                request["tool_choice"] = choice_map(self.tool_choice)
            if self.parallel_tool_calls is not None:
                request["parallel_tool_calls"] = self.parallel_tool_calls
        elif self.tool_choice not in (None, "auto", "none"):
            raise invalid_body("tool_choice", "needs tools to choose from")
        problem = tool_choice_problem(request)
        if problem:
            raise invalid_body(*problem)
        return trusted_wire(ConversationRequest, request)


PROMPT_MESSAGE = "must be a string (or a list of one string; token arrays are not supported)"


class CompletionBody(SamplingBody):
    """``POST /v1/completions`` (the legacy API)."""

    prompt: Annotated[
        Annotated[str, member_tag("~text")]
        | Annotated[list[str], Field(min_length=1, max_length=1), member_tag("~list")],
        Discriminator(_text_or_list),
        Says(PROMPT_MESSAGE, whole=True),
    ]
    best_of: OnlyOne | None = None
    suffix: RefusedSuffix = None
    echo: Flag | None = None
    """The prompt before the answer in ``text`` (not with ``logprobs``: the prompt's
    tokens get none here)."""
    logprobs: Annotated[int, Field(ge=0, le=5), Says("must be an integer from 0 to 5")] | None = (
        None
    )
    """The legacy API's ``logprobs``: how many alternatives to give per token."""

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_request(self) -> dict[str, Any]:
        if self.echo and self.logprobs is not None:
            raise invalid_body(
                "echo",
                "cannot be combined with logprobs: the prompt's tokens get no "
                "log-probabilities here (send echo or logprobs, not both)",
            )
        request = {"raw_prompt": self.prompt_text, **self.sampling(self.max_tokens)}
        if self.logprobs is not None:
            request["logprobs"] = True
            request["top_logprobs"] = self.logprobs
        return trusted_wire(RawPromptRequest, request)

    def options(self) -> Options:
        options = super().options()
        if self.echo:
            options.echo = self.prompt_text
        return options
