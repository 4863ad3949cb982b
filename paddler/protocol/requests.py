"""The shapes of generation and embedding requests, shared by every API.

A request is a map. A generation request has exactly one of ``raw_prompt``
(``RawPromptRequest``) and ``conversation_history`` (``ConversationRequest``);
the rest are optional with defaults. An embedding request has ``input_batch``
(``EmbeddingRequest``). ``validate_request`` returns the normalized wire form (a
fresh map with every default filled) or raises ``InvalidRequest`` naming the
field, so every layer answers bad input the same way.

The field types below are the only declaration of what a request may hold: the
native HTTP API, the OpenAI API (which converts its bodies to these), the
broker's client frames and the OpenAPI documents all derive from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from paddler.errors import InvalidRequest, ProtocolError
from paddler.protocol.codec import unpack_token_ids
from paddler.protocol.grammar_limits import gbnf_problem, json_schema_problem
from paddler.protocol.shapes import Says, Shape, check, member_tag
from paddler.protocol.tool_calls import ToolChoice, Tools, parallel_problem, tool_choice_problem

MAX_TOKENS_LIMIT = 1_000_000
DEFAULT_MAX_TOKENS = 1000
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 512
MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_DOCUMENTS = 4096
MAX_TOP_K = 1_000_000

STOP_MESSAGE = (
    f"must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
    f"of at most {MAX_STOP_LENGTH} characters"
)


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


# ------------------------------------------------------------- field types

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


def _one_or_many(value: Any) -> str | None:
    return "~one" if isinstance(value, str) else "~many" if isinstance(value, list) else None


Stop = Annotated[
    Annotated[StopString, member_tag("~one")]
    | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS), member_tag("~many")],
    Discriminator(_one_or_many),
    AfterValidator(_as_list),
    Says(STOP_MESSAGE, whole=True),
]
"""Strings that end generation (cut before them); one string stands for a list of one."""

MaxTokens = Annotated[
    int,
    Field(ge=1, le=MAX_TOKENS_LIMIT),
    Says(f"must be an integer from 1 to {MAX_TOKENS_LIMIT}"),
]
Temperature = Annotated[float, Field(ge=0, le=100), Says("must be a number from 0 to 100")]
Probability = Annotated[float, Field(ge=0, le=1), Says("must be a number from 0 to 1")]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K), Says("must be a non-negative integer")]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1), Says("must be an integer from 0 to 4294967295")]
Flag = Annotated[bool, Says("must be true or false")]
Penalty = Annotated[float, Field(ge=-2, le=2), Says("must be a number from -2 to 2")]
MAX_TEXT_INTERVAL_MS = 10_000
TEXT_INTERVAL_MESSAGE = f"must be an integer from 0 to {MAX_TEXT_INTERVAL_MS}"
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
LOGIT_BIAS_MESSAGE = (
    f"must be an object of at most {MAX_LOGIT_BIAS} token ids (as strings of digits) "
    "with biases from -100 to 100"
)


def _token_id_key(key: str) -> str:
    if not (key.isascii() and key.isdigit() and len(key) <= 9):
        raise PydanticCustomError("token_id", "keys must be token ids")
    return key


LogitBias = Annotated[
    dict[
        Annotated[str, AfterValidator(_token_id_key)],
        Annotated[float, Field(ge=-100, le=100)],
    ],
    Field(max_length=MAX_LOGIT_BIAS),
    Says(LOGIT_BIAS_MESSAGE, whole=True),
]
"""Added to the logits of the given tokens: -100 bans a token, 100 all but forces it."""
TopLogprobs = Annotated[
    int,
    Field(ge=0, le=MAX_TOP_LOGPROBS),
    Says(f"must be an integer from 0 to {MAX_TOP_LOGPROBS}"),
]


GRAMMAR_TYPES = "must be 'gbnf' or 'json_schema'"


def _within(problem_of: Callable[[str], str | None]) -> AfterValidator:
    """A check of grammar text against ``paddler.protocol.grammar_limits``: what
    llama.cpp cannot take safely is refused here, before any dispatch."""

    def check_text(text: str) -> str:
        problem = problem_of(text)
        if problem:
            raise PydanticCustomError("grammar_limit", "{problem}", {"problem": problem})
        return text

    return AfterValidator(check_text)


class GbnfGrammar(Shape):
    """A grammar in llama.cpp's GBNF."""

    type: Annotated[Literal["gbnf"], Says(GRAMMAR_TYPES)]
    grammar: Annotated[str, Says("must be a string of GBNF rules"), _within(gbnf_problem)]
    root: Annotated[str, Says("must be a string")] = "root"


class JsonSchemaGrammar(Shape):
    """Output constrained to a JSON Schema, given as a JSON string."""

    type: Annotated[Literal["json_schema"], Says(GRAMMAR_TYPES)]
    schema_: Annotated[
        str, Says("must be a JSON Schema as a string"), _within(json_schema_problem)
    ] = Field(alias="schema")


def _grammar_tag(value: Any) -> str | None:
    if isinstance(value, GbnfGrammar | JsonSchemaGrammar):  # serializing a record
        return "~gbnf" if isinstance(value, GbnfGrammar) else "~json_schema"
    if not isinstance(value, dict):
        return None
    return (
        "~json_schema" if value.get("type") == "json_schema" else "~gbnf"
    )  # gbnf names a bad type


Grammar = Annotated[
    Annotated[GbnfGrammar, member_tag("~gbnf")]
    | Annotated[JsonSchemaGrammar, member_tag("~json_schema")],
    Discriminator(_grammar_tag),
    Says("must be null or an object with a 'type'"),
]


TEXT_ONLY_MESSAGE = "the agents serve text-only models (multimodal input is not supported)"
MEDIA_PARTS = frozenset(
    {
        "image_url",
        "image",
        "input_image",
        "input_audio",
        "audio",
        "video",
        "video_url",
        "file",
        "input_file",
    }
)
"""Content part types that carry images, audio, video or files: no model an agent
serves reads them, so a conversation holding one is refused rather than rendered
without it."""


class ContentPart(Shape):
    """One part of a message's content: ``{"type": "text", "text": ...}``; other keys
    are kept for the chat template. Parts of media (``MEDIA_PARTS``: ``image_url``,
    ``image``, ``input_audio``...) are refused: the agents serve text-only models."""

    model_config = Shape.model_config | {"extra": "ignore"}  # extras pass on in the map
    SAYS: ClassVar[str] = "must be an object with a 'type'"
    WHOLE: ClassVar[bool] = True

    type: str

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type in MEDIA_PARTS:
            raise PydanticCustomError(
                "multimodal",
                "{kind} parts are not supported: {why}",
                {"kind": repr(self.type), "why": TEXT_ONLY_MESSAGE},
            )
        return self


def _text_or_parts(value: Any) -> str | None:
    return "~text" if isinstance(value, str) else "~parts" if isinstance(value, list) else None


class Message(Shape):
    """One message of a conversation; other keys (``name``, ``tool_calls``,
    ``tool_call_id``...) are passed to the chat template as they are."""

    model_config = Shape.model_config | {"extra": "ignore"}  # extras pass on in the map
    SAYS: ClassVar[str] = "must be an object with 'role' and 'content'"

    role: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]
    content: Annotated[
        Annotated[str, member_tag("~text")] | Annotated[list[ContentPart], member_tag("~parts")],
        Discriminator(_text_or_parts),
        Says("must be a string or a list of parts"),
    ]


_DEFAULTS: dict[type[Shape], list[tuple[str, Any, Callable[[], Any] | None]]] = {}


def _defaults(shape: type[Shape]) -> list[tuple[str, Any, Callable[[], Any] | None]]:
    """``(key, default, default factory)`` of every optional field, computed once."""
    defaults = _DEFAULTS.get(shape)
    if defaults is None:
        defaults = _DEFAULTS[shape] = [
            (info.alias or name, info.default, info.default_factory)  # type: ignore[misc]
            for name, info in shape.model_fields.items()
            if not info.is_required()
        ]
    return defaults


def trusted_wire(shape: type[Shape], values: dict[str, Any]) -> dict[str, Any]:
    """The wire form of ``values`` with ``shape``'s defaults filled in, without
    validating them: for values already validated by fields of the same types
    (the OpenAI bodies use this request's field types)."""
    data = dict(values)
    for key, default, factory in _defaults(shape):
        if key not in data:
            data[key] = default if factory is None else factory()
    return data


BUDGET_WITH_GRAMMAR = (
    "cannot be kept together with a grammar (the grammar decides every token, so the "
    "agent cannot close the reasoning block itself)"
)


class GenerationParameters(Shape):
    """What every generation request may say besides its prompt."""

    ROOT: ClassVar[str] = "request"
    SAYS: ClassVar[str] = "must be an object"

    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS
    grammar: Grammar | None = None
    add_generation_prompt: Flag = True
    enable_thinking: Flag = False
    reasoning_budget: (
        Annotated[
            int,
            Field(ge=0, le=MAX_TOKENS_LIMIT),
            Says(f"must be null or an integer from 0 to {MAX_TOKENS_LIMIT}"),
        ]
        | None
    ) = None
    """With thinking on: at most this many reasoning tokens; then the agent closes
    the reasoning block itself (writes the template's closing marker) and the model
    answers. ``None``: no limit but ``max_tokens``."""
    tools: Tools = Field(default_factory=list)
    """Function tools shown to the model through its chat template."""
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: Flag = True
    """With a forced tool choice: whether the model may call more than one tool
    (``false`` with ``auto`` and tools is refused: only a forced choice's grammar
    keeps to it)."""
    parse_tool_calls: Flag = False
    """Send what each block of tool-call text parsed to (``ToolCallParsed`` and the
    failure results) before ``Done``."""
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    seed: Seed | None = None
    stop: Stop = Field(default_factory=list)
    frequency_penalty: Penalty | None = None
    """Lowers a token's logit by this times how often it came already (else the
    desired state's ``penalty_frequency``)."""
    presence_penalty: Penalty | None = None
    """Lowers the logit of every token that came already (else ``penalty_presence``)."""
    logit_bias: LogitBias | None = None
    text_interval_ms: Annotated[
        int, Field(ge=0, le=MAX_TEXT_INTERVAL_MS), Says(TEXT_INTERVAL_MESSAGE)
    ] = 0
    """One text frame about every this many milliseconds: the text of the steps in
    between comes together (the first piece and the end are never held; the other
    frames fall on a grid of the interval, so an agent's paced requests flush in
    the same step). For clients
    that read the whole answer at the end: a frame per token costs the agent, the
    balancer and the HTTP worker a wakeup each, which on a small machine takes CPU
    from llama.cpp. 0: each step's text as soon as it is made."""
    count_only: Flag = False
    """Count the prompt's tokens and end at once: ``Done`` with ``prompt_tokens`` (the
    chat template rendered with the tools, as a generation would see it) and
    ``content_tokens`` 0; nothing is prefilled or generated. A prompt longer than a
    slot is counted too. Anthropic's ``/v1/messages/count_tokens`` is served with it."""
    logprobs: Flag = False
    """Send the log-probability of each generated token (a ``Logprobs`` event)."""
    top_logprobs: TopLogprobs = 0
    """With ``logprobs``: also that many of the most likely tokens at each step."""

    @field_validator("reasoning_budget")
    @classmethod
    def _budget_kept(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("grammar") is not None:
            raise PydanticCustomError("reasoning_budget", BUDGET_WITH_GRAMMAR)
        return value

    @field_validator("parallel_tool_calls")
    @classmethod
    def _parallel_enforced(cls, value: bool, info: ValidationInfo) -> bool:
        if "tools" in info.data and "tool_choice" in info.data:  # else they were refused
            problem = parallel_problem(info.data["tools"], info.data["tool_choice"], value)
            if problem is not None:
                raise PydanticCustomError("parallel_tool_calls", problem)
        return value

    @classmethod
    def wire_of(cls, request: dict[str, Any]) -> dict[str, Any]:
        """The normalized map sent to the broker and the agents, from a ``request``
        map that validated as this shape: a fresh map with every field (defaults
        filled, ``stop`` always a list), nested objects as they were given. Built
        from the map itself rather than dumped from the record: the dump would cost
        more than the validation."""
        data = trusted_wire(cls, request)
        if isinstance(data["stop"], str):
            data["stop"] = [data["stop"]]
        return data


class RawPromptRequest(GenerationParameters):
    """Continue a raw prompt (no chat template)."""

    raw_prompt: Annotated[
        str,
        Field(max_length=MAX_PROMPT_CHARS),
        Says("must be a string", too_long=f"longer than {MAX_PROMPT_CHARS} characters"),
    ]


class ConversationRequest(GenerationParameters):
    """Continue a conversation, rendered with the model's chat template."""

    conversation_history: Annotated[
        list[Message], Field(min_length=1), Says("must be a non-empty list of messages")
    ]


class Document(Shape):
    SAYS: ClassVar[str] = "must be an object with exactly 'id' and 'content'"
    KEYS_AT_OBJECT: ClassVar[bool] = True

    id: Annotated[str, Says("must be a string")]
    content: Annotated[str, Field(min_length=1), Says("must be a non-empty string")]


class RmsNormParameters(Shape):
    epsilon: Annotated[float, Field(gt=0, lt=1), Says("must be a number between 0 and 1")]


class RmsNorm(Shape):
    RmsNorm: Annotated[
        RmsNormParameters, BeforeValidator(lambda v: v if isinstance(v, dict) else {})
    ]


NORMALIZATION_MESSAGE = 'must be "None", "L2" or {"RmsNorm": {"epsilon": ...}}'


def _normalization_tag(value: Any) -> str | None:
    if value in ("None", "L2"):
        return "~name"
    if isinstance(value, RmsNorm) or (isinstance(value, dict) and set(value) == {"RmsNorm"}):
        return "~rms"
    return None


NormalizationMethod = Annotated[
    Annotated[Literal["None", "L2"], member_tag("~name")] | Annotated[RmsNorm, member_tag("~rms")],
    Discriminator(_normalization_tag),
    Says(NORMALIZATION_MESSAGE),
]


class EmbeddingRequest(Shape):
    """Embed every document of ``input_batch``."""

    ROOT: ClassVar[str] = "request"

    input_batch: Annotated[
        list[Document],
        Field(min_length=1, max_length=MAX_DOCUMENTS),
        Says(
            "must be a non-empty list of {id, content}",
            too_long=f"has more than {MAX_DOCUMENTS} documents",
        ),
    ]
    normalization_method: NormalizationMethod = "None"

    def wire(self) -> dict[str, Any]:
        return self.model_dump()


_RAW_KEYS = frozenset(RawPromptRequest.model_fields)
_CONVERSATION_KEYS = frozenset(ConversationRequest.model_fields)
_EMBEDDING_KEYS = frozenset(EmbeddingRequest.model_fields)
GENERATION_FIELDS = _RAW_KEYS | _CONVERSATION_KEYS


def is_embedding_request(request: dict[str, Any]) -> bool:
    return "input_batch" in request


def parse_request(request: Any) -> RawPromptRequest | ConversationRequest | EmbeddingRequest:
    """The typed record of a request map; ``InvalidRequest`` naming the bad field."""
    if not isinstance(request, dict):
        raise InvalidRequest("request", "must be an object")
    if "input_batch" in request:
        return check(EmbeddingRequest, request, InvalidRequest)
    for name in request:
        if name not in GENERATION_FIELDS:
            raise InvalidRequest(str(name), "unknown field")
    has_raw = "raw_prompt" in request
    if has_raw == ("conversation_history" in request):
        raise InvalidRequest(
            "raw_prompt", "give exactly one of 'raw_prompt' and 'conversation_history'"
        )
    record: RawPromptRequest | ConversationRequest
    if has_raw:
        record = check(RawPromptRequest, request, InvalidRequest)
    else:
        record = check(ConversationRequest, request, InvalidRequest)
    problem = tool_choice_problem(request)
    if problem:
        raise InvalidRequest(*problem)
    return record


CONTINUATION = "continuation"
"""The key the broker adds to a generation request it sends again after losing its
agent: ``{"token_ids": bytes}``, the tokens already generated and streamed (packed
as ``paddler.protocol.codec.pack_token_ids`` does). Never accepted from clients."""


def dispatched_request(body: Any) -> dict[str, Any]:
    """A request as the broker dispatches it to an agent: validated where it entered,
    so only its shape is checked here (a map with exactly the keys of one request
    kind's wire form, plus ``continuation`` for a generation request continued from
    another agent), cheaply; ``ProtocolError`` otherwise."""
    if isinstance(body, dict):
        keys = body.keys()
        if keys in (_RAW_KEYS, _CONVERSATION_KEYS, _EMBEDDING_KEYS):
            return body
        if CONTINUATION in body and keys - {CONTINUATION} in (_RAW_KEYS, _CONVERSATION_KEYS):
            continuation = body[CONTINUATION]
            if not isinstance(continuation, dict) or not isinstance(
                continuation.get("token_ids"), bytes
            ):
                raise ProtocolError("Dispatch: continuation.token_ids must be bytes")
            return body
    raise ProtocolError("Dispatch: body must be a request in its wire form")


def continued_tokens(request: dict[str, Any]) -> list[int]:
    """The tokens a continued request already generated (none for a fresh one);
    ``ProtocolError`` if they are malformed."""
    continuation = request.get(CONTINUATION)
    if continuation is None:
        return []
    return unpack_token_ids(continuation["token_ids"])


def validate_request(request: Any) -> dict[str, Any]:
    """The normalized wire form of a request (generation or embedding); a fresh map,
    never the one given. ``InvalidRequest`` names the bad field."""
    record = parse_request(request)
    if isinstance(record, EmbeddingRequest):
        return record.wire()
    return type(record).wire_of(request)


__all__ = [
    "CONTINUATION",
    "DEFAULT_MAX_TOKENS",
    "MAX_DOCUMENTS",
    "MAX_PROMPT_CHARS",
    "MAX_STOP_LENGTH",
    "MAX_STOP_STRINGS",
    "MAX_TOKENS_LIMIT",
    "MEDIA_PARTS",
    "TEXT_ONLY_MESSAGE",
    "ConversationRequest",
    "EmbeddingRequest",
    "GenerationParameters",
    "Grammar",
    "MaxTokens",
    "Probability",
    "RawPromptRequest",
    "Seed",
    "Stop",
    "Temperature",
    "TopK",
    "continued_tokens",
    "dispatched_request",
    "is_embedding_request",
    "parse_request",
    "trusted_wire",
    "validate_request",
]
