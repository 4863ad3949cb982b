"""The balancer's desired state: Paddler's ``BalancerDesiredState`` as a shape.

``DesiredState`` declares every field once, with its bounds and default;
``validate_desired_state`` fills defaults for missing fields, rejects unknown
ones and wrong types, and raises ``ConfigurationError`` naming the field
(``inference_parameters.temperature``) so the HTTP layer can answer 400.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from annotated_types import Interval
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from paddler.errors import ConfigurationError
from paddler.protocol.shapes import Says, Shape, check, member_tag

CacheDtype = Literal["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1"]
PoolingType = Literal["Unspecified", "None", "Mean", "Cls", "Last", "Rank"]
CACHE_DTYPES: tuple[str, ...] = get_args(CacheDtype)
POOLING_TYPES: tuple[str, ...] = get_args(PoolingType)


class InferenceParameters(Shape):
    """How agents load and run the model; every field has Paddler's default."""

    n_batch: Annotated[int, Interval(ge=1, le=1 << 20)] = 2048
    context_size: Annotated[int, Interval(ge=16, le=1 << 24)] = 8192
    embedding_batch_size: Annotated[int, Interval(ge=1, le=1 << 20)] = 256
    enable_embeddings: Annotated[bool, Says("must be true or false")] = False
    image_resize_to_fit: Annotated[int, Interval(ge=1, le=1 << 16)] = 1024
    k_cache_dtype: CacheDtype = "Q8_0"
    v_cache_dtype: CacheDtype = "Q8_0"
    min_p: Annotated[float, Interval(ge=0.0, le=1.0)] = 0.05
    n_gpu_layers: Annotated[int, Interval(ge=0, le=1 << 16)] = 0
    penalty_frequency: Annotated[float, Interval(ge=-2.0, le=2.0)] = 0.0
    penalty_last_n: Annotated[int, Interval(ge=-1, le=1 << 24)] = -1
    penalty_presence: Annotated[float, Interval(ge=-2.0, le=2.0)] = 0.8
    penalty_repeat: Annotated[float, Interval(ge=0.0, le=10.0)] = 1.1
    pooling_type: PoolingType = "Last"
    temperature: Annotated[float, Interval(ge=0.0, le=100.0)] = 0.8
    top_k: Annotated[int, Interval(ge=0, le=1 << 24)] = 80
    top_p: Annotated[float, Interval(ge=0.0, le=1.0)] = 0.8


DEFAULT_INFERENCE_PARAMETERS: dict[str, Any] = InferenceParameters().model_dump()


def _non_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "must be a non-empty string")
    return value


NonEmpty = Annotated[str, AfterValidator(_non_blank), Says("must be a non-empty string")]


def _http_url(value: str, info: ValidationInfo) -> str:
    if info.context and info.context.get(ANY_URL_SCHEME):
        return value
    if not value.startswith(("http://", "https://")):
        raise PydanticCustomError("url_scheme", "must start with http:// or https://")
    return value


def _sha256(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise PydanticCustomError("sha256", "must be a SHA-256 digest: 64 hexadecimal characters")
    return value.lower()


Sha256 = Annotated[
    str,
    AfterValidator(_sha256),
    Says("must be a SHA-256 digest: 64 hexadecimal characters"),
]
"""The digest a downloaded model file must have (stored in lowercase)."""

_OMIT_IF_NONE: Any = Field(default=None, exclude_if=lambda value: value is None)
"""An optional field that is left out of the wire form while unset, so that sources
without it keep their shape."""


ANY_URL_SCHEME = "any_url_scheme"
"""Validation context: take any URL scheme (an agent's downloader refuses what it
cannot fetch, as an issue in the agents list)."""


class UrlSpec(Shape):
    SAYS: ClassVar[str] = "must be an object with 'url'"

    url: Annotated[NonEmpty, AfterValidator(_http_url)]
    sha256: Sha256 | None = _OMIT_IF_NONE


class LocalToAgent(Shape):
    """A GGUF file on each agent's own disk."""

    LocalToAgent: NonEmpty


class Url(Shape):
    """A GGUF file each agent downloads (``{"Url": "https://..."}`` is short for
    ``{"Url": {"url": "https://..."}}``)."""

    Url: Annotated[UrlSpec, BeforeValidator(lambda v: {"url": v} if isinstance(v, str) else v)]


class HuggingFaceFile(Shape):
    repo_id: NonEmpty
    revision: NonEmpty = "main"
    filename: NonEmpty
    sha256: Sha256 | None = _OMIT_IF_NONE


class HuggingFace(Shape):
    """A file of a Hugging Face repository."""

    HuggingFace: HuggingFaceFile


SOURCE_VARIANTS = {"LocalToAgent": LocalToAgent, "Url": Url, "HuggingFace": HuggingFace}
SOURCE_MESSAGE = (
    'must be "None" or one of {"LocalToAgent": ...}, {"Url": ...}, {"HuggingFace": ...}'
)


def _source_tag(value: Any) -> str | None:
    if value == "None":
        return "~none"
    if isinstance(value, Shape):  # serializing a record
        return f"~{type(value).__name__}"
    if isinstance(value, dict) and len(value) == 1:
        (variant,) = value
        return f"~{variant}" if variant in SOURCE_VARIANTS else None
    return None


def _known_variant(value: Any) -> Any:
    """``None`` is ``"None"``; an unknown variant is named in the error."""
    if value is None:
        return "None"
    if isinstance(value, dict) and len(value) == 1:
        (variant,) = value
        if variant not in SOURCE_VARIANTS:
            raise PydanticCustomError(
                "unknown_variant",
                "unknown variant {variant}; use LocalToAgent, Url or HuggingFace",
                {"variant": repr(variant)},
            )
    return value


ModelSource = Annotated[
    Annotated[Literal["None"], member_tag("~none")]
    | Annotated[LocalToAgent, member_tag("~LocalToAgent")]
    | Annotated[Url, member_tag("~Url")]
    | Annotated[HuggingFace, member_tag("~HuggingFace")],
    Discriminator(_source_tag),
    BeforeValidator(_known_variant),
    Says(SOURCE_MESSAGE),
]
"""Where agents get a model: ``"None"``, ``{"LocalToAgent": path}``,
``{"Url": {"url"}}`` or ``{"HuggingFace": {"repo_id", "revision", "filename"}}``; a
``Url`` or ``HuggingFace`` model may add ``"sha256"``, the digest its file must have."""


class ModelSourceField(Shape):
    """One model source alone, as ``model``: for code that gets a source outside a
    desired state (an agent resolving it to a file)."""

    ROOT: ClassVar[str] = "model"

    model: ModelSource


def parse_model_source(source: Any) -> LocalToAgent | Url | HuggingFace | None:
    """The record of a model source (``None`` for ``"None"``); ``ConfigurationError``
    names the field when ``source`` is not one. Any URL scheme passes: the
    downloader refuses what it cannot fetch, as an issue the operator sees."""
    context = {ANY_URL_SCHEME: True}
    parsed = check(ModelSourceField, {"model": source}, ConfigurationError, context).model
    return None if parsed == "None" else parsed


class ChatTemplate(Shape):
    SAYS: ClassVar[str] = 'must be {"content": "<template>"} or null'
    WHOLE: ClassVar[bool] = True

    content: str


class DesiredState(Shape):
    """What every agent should run (Paddler's ``BalancerDesiredState``)."""

    ROOT: ClassVar[str] = "desired_state"
    SAYS: ClassVar[str] = "must be a JSON object"

    model: ModelSource = "None"
    multimodal_projection: ModelSource = "None"
    inference_parameters: Annotated[
        InferenceParameters, BeforeValidator(lambda v: {} if v is None else v)
    ] = Field(default_factory=InferenceParameters)
    chat_template_override: Annotated[
        ChatTemplate | None,
        # a convenience: the bare template text
        BeforeValidator(lambda v: {"content": v} if isinstance(v, str) else v),
    ] = None
    use_chat_template_override: Annotated[bool, Says("must be true or false")] = False

    @field_validator("multimodal_projection")
    @classmethod
    def _text_only(cls, source: Any) -> Any:
        if source != "None":
            raise PydanticCustomError(
                "multimodal",
                "is not supported: the agents serve text-only models (image input is "
                'refused with a 400); leave it "None"',
            )
        return source

    @field_validator("use_chat_template_override")
    @classmethod
    def _override_given(cls, use: bool, info: ValidationInfo) -> bool:
        if use and info.data.get("chat_template_override") is None:
            raise PydanticCustomError("no_override", "is true but chat_template_override is null")
        return use

    def wire(self) -> dict[str, Any]:
        return self.model_dump()


TOP_LEVEL_FIELDS = tuple(DesiredState.model_fields)


def default_desired_state() -> dict[str, Any]:
    return DesiredState().wire()


def validate_desired_state(value: Any) -> dict[str, Any]:
    """A normalized copy of a desired state; ``ConfigurationError`` names the bad field."""
    return check(DesiredState, value, ConfigurationError).wire()
