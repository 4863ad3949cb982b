"""One typed record per message body, with pure ``to_body``/``from_body``.

A record is a dataclass; its annotations are the one statement of each field's
wire type (``SPEC``, the runtime types per field, is derived from them).
``from_body`` takes what msgpack decoded from an untrusted peer, validates it with
pydantic in strict mode (``true`` is not ``1``) and raises ``ProtocolError``
naming the record and the field. Extra keys are ignored so a newer peer of the
same version can add optional data. Records built by paddler itself are trusted
and not validated again.

A record's ``NAME`` is the message name its errors use (``Ping: missing field
'version'``); it is the class name unless the class states another, for the bodies
whose message name is taken by another public class (the client's ``Done`` event
is ``paddler.client.events.Done``; its body here is ``DoneBody``, named ``Done``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar, dataclass_transform, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from paddler.errors import ProtocolError

T = TypeVar("T", bound="Record")

_NONE = type(None)
_RECORD_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _NONE else t.__name__ for t in types)


def _runtime_types(annotation: Any) -> tuple[type, ...]:
    """``(str, NoneType)`` for ``str | None``, ``(list,)`` for ``list[Any]``..."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    origin = get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(t for arg in get_args(annotation) for t in _runtime_types(arg))
    if origin is not None:
        return (origin,)
    return (annotation,)


class Record:
    """Base of message records (dataclasses). ``SPEC`` (field -> runtime types) is
    derived from the annotations when a subclass is defined."""

    NAME: ClassVar[str] = "Record"
    """The message name errors use; set to the class name by ``@record()`` unless
    the class body states it."""
    SPEC: ClassVar[dict[str, tuple[type, ...]]] = {}
    BODY: ClassVar[type[BaseModel]]
    """The pydantic model of the body, derived from the dataclass fields."""

    def to_body(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def _body(cls) -> type[BaseModel]:
        body = cls.__dict__.get("BODY")
        if body is None:
            body = cls._body_model()
            cls.BODY = body
        return body

    @classmethod
    def _body_model(cls) -> type[BaseModel]:
        hints = typing.get_type_hints(cls, include_extras=True)
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING:
                fields[f.name] = (hints[f.name], f.default)
            elif f.default_factory is not dataclasses.MISSING:
                fields[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
            else:
                fields[f.name] = (hints[f.name], ...)
        return create_model(f"{cls.__name__}Body", __config__=_RECORD_CONFIG, **fields)

    @classmethod
    def spec(cls) -> dict[str, tuple[type, ...]]:
        hints = typing.get_type_hints(cls, include_extras=True)
        return {f.name: _runtime_types(hints[f.name]) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_body(cls: type[T], body: Any) -> T:
        where = cls.NAME
        if not isinstance(body, dict):
            raise ProtocolError(f"{where}: body must be a map, got {type(body).__name__}")
        try:
            values = cls._body().model_validate(body)
        except ValidationError as exc:
            raise ProtocolError(_problem(cls, exc)) from None
        return cls(**values.__dict__)


def _problem(record: type[Record], exc: ValidationError) -> str:
    """``AgentStatus.slots_total: expected int, got bool`` for the first error."""
    error = exc.errors(include_url=False)[0]
    where = record.NAME
    loc = error["loc"]
    name = str(loc[0]) if loc else ""
    if error["type"] == "missing":
        return f"{where}: missing field {name!r}"
    value = error.get("input")
    spec = record.SPEC.get(name)
    if spec is not None and (error["type"].endswith("_type") or error["type"] == "finite_number"):
        return f"{where}.{name}: expected {_type_name(spec or ())}, got {type(value).__name__}"
    return f"{where}.{name}: {value!r} is not allowed ({error['msg']})"


@dataclass_transform(field_specifiers=(field,))
def record(
    *, frozen: bool = False, slots: bool = False, kw_only: bool = False
) -> Callable[[type[T]], type[T]]:
    """Make a ``Record`` subclass a dataclass and derive its ``SPEC`` (and its
    ``NAME``, the class name, unless the class states one)."""

    def make(cls: type[T]) -> type[T]:
        made = dataclass(frozen=frozen, slots=slots, kw_only=kw_only)(cls)
        if "NAME" not in cls.__dict__:
            made.NAME = cls.__name__
        made.SPEC = made.spec()  # the pydantic model of the body is built on first use
        return made

    return make


@record()
class AgentStatus(Record):
    """What an agent reports about itself; the broker shows it in snapshots."""

    slots_total: Annotated[int, Field(ge=0, le=4096)]
    ready: bool = False
    """A model is loaded and the agent accepts new requests."""
    desired_slots_total: int = 0
    model_path: str | None = None
    issues: list[Any] = field(default_factory=list)
    state_application_status: str = "Fresh"
    uses_chat_template_override: bool = False
    download_current: int = 0
    download_total: int = 0
    download_filename: str | None = None


@record()
class Register(Record):
    version: int
    name: str | None
    status: dict[str, Any]


@record()
class Registered(Record):
    agent_id: str
    heartbeat_interval_ms: int


@record()
class ErrorBody(Record):
    """A terminal error of a request, or the answer to a query that failed.

    ``kind`` names the cause (``BufferOverflow``, ``AgentLost``, ``ChatTemplateError``...);
    ``code`` is the HTTP-like status the HTTP layer uses.
    """

    code: int
    kind: str
    description: str


@record()
class Usage(Record):
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    input_image_tokens: int = 0
    input_audio_tokens: int = 0
    content_tokens: int = 0
    reasoning_tokens: int = 0
    tool_call_tokens: int = 0
    undeterminable_tokens: int = 0


USAGE_FIELDS = tuple(Usage.SPEC)


@record(kw_only=True)
class AgentSnapshot(AgentStatus):
    """What the broker tells about one agent: its last status with the broker's own
    count of requests in flight. Views derive their shapes from it: Paddler's JSON
    (``paddler.http.agents_json``) and the Prometheus families (``paddler.http.metrics``)."""

    id: str
    """The id the broker gave the agent."""
    name: str | None
    """The agent's ``--name``, if it has one."""
    slots_processing: int
    """Requests in flight on the agent, by the broker's own count."""
    key_fingerprint: str | None = None
    """With curve: the fingerprint of the public key the agent authenticated with."""

    @property
    def label(self) -> str:
        """How operators know the agent: its name, else its id."""
        return self.name or self.id

    def sort_key(self) -> tuple[str, str]:
        """Agents are listed by name, then id."""
        return (self.name or "", self.id)


# ------------------------------------------------ a client's questions to the broker


@record()
class Ping(Record):
    version: int
    """The protocol version the client speaks."""


@record()
class PutDesiredState(Record):
    state: dict[Any, Any]
    """Checked by ``paddler.protocol.desired_state.validate_desired_state``."""


@record()
class GetAgentInfo(Record):
    agent_id: str
    what: str
    """What to ask the agent about itself (forwarded as ``AgentQuery``)."""


@record()
class PutResponse(Record):
    """Keep ``body`` as the stored response ``id``; with ``expected``, only in place
    of that body. (The broker bounds the id's length.)"""

    NAME: ClassVar[str] = "PUT_RESPONSE"
    id: str
    body: bytes
    expected: bytes | None = None


@record()
class GetResponse(Record):
    NAME: ClassVar[str] = "GET_RESPONSE"
    id: str


@record()
class DeleteResponse(Record):
    NAME: ClassVar[str] = "DELETE_RESPONSE"
    id: str


# ------------------------------------------------------ the broker's stream frames


@record()
class DispatchedBody(Record):
    """The body of ``DISPATCHED`` (the client's event: ``paddler.client.events.Dispatched``)."""

    NAME: ClassVar[str] = "Dispatched"
    agent_id: str
    agent_name: str | None
    queued_ms: int


@record()
class DoneBody(Record):
    """The body of ``DONE`` (the client's event: ``paddler.client.events.Done``);
    ``usage`` is a ``Usage`` body, read with ``Usage.from_body``."""

    NAME: ClassVar[str] = "Done"
    usage: dict[Any, Any]
    stop_sequence: str | None = None
    """The stop string (one of the request's ``stop``) that ended the answer, if one did."""


# --------------------------------------------------------- the broker to an agent


@record()
class AgentQuery(Record):
    what: str


@record()
class DesiredStateBody(Record):
    """The body of ``DESIRED_STATE`` (the state's own model is
    ``paddler.protocol.desired_state.DesiredState``); ``None`` before one is set."""

    NAME: ClassVar[str] = "DesiredState"
    state: dict[Any, Any] | None


def token_pieces(body: Any) -> list[str]:
    """Validate a decoded TOKENS body: a list of text pieces produced in one step."""
    if not isinstance(body, list) or not all(isinstance(p, str) for p in body):
        raise ProtocolError("Tokens: body must be a list of strings")
    return body
