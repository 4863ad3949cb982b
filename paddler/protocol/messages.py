"""One typed record per message body, with pure ``to_body``/``from_body``.

``from_body`` takes what msgpack decoded from an untrusted peer and raises
``ProtocolError`` naming the field when a type or a required field is wrong.
Extra keys are ignored so a newer peer of the same version can add optional data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from paddler.errors import ProtocolError

T = TypeVar("T", bound="Record")

_NONE = type(None)


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _NONE else t.__name__ for t in types)


def check_field(body: dict[str, Any], name: str, types: tuple[type, ...], where: str) -> Any:
    """The value of ``body[name]`` if it has one of ``types`` (bool is never an int)."""
    if name not in body:
        raise ProtocolError(f"{where}: missing field {name!r}")
    value = body[name]
    if isinstance(value, bool) and bool not in types:
        raise ProtocolError(f"{where}.{name}: expected {_type_name(types)}, got bool")
    if not isinstance(value, types):
        raise ProtocolError(
            f"{where}.{name}: expected {_type_name(types)}, got {type(value).__name__}"
        )
    return value


class Record:
    """Base of message records: a dataclass whose ``SPEC`` lists wire types per field."""

    SPEC: ClassVar[dict[str, tuple[type, ...]]] = {}

    def to_body(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_body(cls: type[T], body: Any) -> T:
        where = cls.__name__
        if not isinstance(body, dict):
            raise ProtocolError(f"{where}: body must be a map, got {type(body).__name__}")
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in body and f.name in cls.OPTIONAL:
                continue
            values[f.name] = check_field(body, f.name, cls.SPEC[f.name], where)
        return cls(**values)

    OPTIONAL: ClassVar[frozenset[str]] = frozenset()


@dataclass
class AgentStatus(Record):
    """What an agent reports about itself; the broker shows it in snapshots."""

    slots_total: int
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

    SPEC: ClassVar[dict[str, tuple[type, ...]]] = {
        "slots_total": (int,),
        "ready": (bool,),
        "desired_slots_total": (int,),
        "model_path": (str, _NONE),
        "issues": (list,),
        "state_application_status": (str,),
        "uses_chat_template_override": (bool,),
        "download_current": (int,),
        "download_total": (int,),
        "download_filename": (str, _NONE),
    }
    OPTIONAL: ClassVar[frozenset[str]] = frozenset(SPEC) - {"slots_total"}

    @classmethod
    def from_body(cls, body: Any) -> AgentStatus:
        status = super().from_body(body)
        if not 0 <= status.slots_total <= 4096:
            raise ProtocolError(f"AgentStatus.slots_total: {status.slots_total} not in 0..4096")
        return status


@dataclass
class Register(Record):
    version: int
    name: str | None
    status: dict[str, Any]

    SPEC: ClassVar[dict[str, tuple[type, ...]]] = {
        "version": (int,),
        "name": (str, _NONE),
        "status": (dict,),
    }


@dataclass
class Registered(Record):
    agent_id: str
    heartbeat_interval_ms: int

    SPEC: ClassVar[dict[str, tuple[type, ...]]] = {
        "agent_id": (str,),
        "heartbeat_interval_ms": (int,),
    }


@dataclass
class ErrorBody(Record):
    """A terminal error of a request, or the answer to a query that failed.

    ``kind`` names the cause (``BufferOverflow``, ``AgentLost``, ``ChatTemplateError``...);
    ``code`` is the HTTP-like status the HTTP layer uses.
    """

    code: int
    kind: str
    description: str

    SPEC: ClassVar[dict[str, tuple[type, ...]]] = {
        "code": (int,),
        "kind": (str,),
        "description": (str,),
    }


USAGE_FIELDS = (
    "prompt_tokens",
    "cached_prompt_tokens",
    "input_image_tokens",
    "input_audio_tokens",
    "content_tokens",
    "reasoning_tokens",
    "tool_call_tokens",
    "undeterminable_tokens",
)


@dataclass
class Usage(Record):
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    input_image_tokens: int = 0
    input_audio_tokens: int = 0
    content_tokens: int = 0
    reasoning_tokens: int = 0
    tool_call_tokens: int = 0
    undeterminable_tokens: int = 0

    SPEC: ClassVar[dict[str, tuple[type, ...]]] = {name: (int,) for name in USAGE_FIELDS}
    OPTIONAL: ClassVar[frozenset[str]] = frozenset(USAGE_FIELDS)


def body_value(body: Any, name: str, types: tuple[type, ...], where: str) -> Any:
    """One field of a map body, for the messages that carry a single value."""
    if not isinstance(body, dict):
        raise ProtocolError(f"{where}: body must be a map, got {type(body).__name__}")
    return check_field(body, name, types, where)


def token_pieces(body: Any) -> list[str]:
    """Validate a decoded TOKENS body: a list of text pieces produced in one step."""
    if not isinstance(body, list) or not all(isinstance(p, str) for p in body):
        raise ProtocolError("Tokens: body must be a list of strings")
    return body
