"""What the broker tells about one agent: a record, not a JSON shape.

The broker fills an ``AgentSnapshot`` from the agent's last status and its own
count of requests in flight; it travels to clients as the ``to_body`` map in an
``AGENTS`` or ``METRICS`` frame. Views derive their shapes from it: Paddler's JSON
(``paddler.http.agents_json``) and the Prometheus families (``paddler.http.management``).
``from_body`` checks a body the way the protocol records do (``check_field``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from paddler.errors import ProtocolError
from paddler.protocol.messages import check_field

_NONE = type(None)


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    id: str
    """The id the broker gave the agent."""
    name: str | None
    """The agent's ``--name``, if it has one."""
    slots_total: int
    slots_processing: int
    """Requests in flight on the agent, by the broker's own count."""
    desired_slots_total: int = 0
    """As the agent reports it: 0 when it did not say."""
    model_path: str | None = None
    issues: list[Any] = field(default_factory=list)
    state_application_status: str = "Fresh"
    uses_chat_template_override: bool = False
    download_current: int = 0
    download_total: int = 0
    download_filename: str | None = None
    ready: bool = False
    """A model is loaded and the agent accepts new requests."""

    SPEC: ClassVar[dict[str, tuple[type, ...]]] = {
        "id": (str,),
        "name": (str, _NONE),
        "slots_total": (int,),
        "slots_processing": (int,),
        "desired_slots_total": (int,),
        "model_path": (str, _NONE),
        "issues": (list,),
        "state_application_status": (str,),
        "uses_chat_template_override": (bool,),
        "download_current": (int,),
        "download_total": (int,),
        "download_filename": (str, _NONE),
        "ready": (bool,),
    }
    """Wire types per field (``bool`` is never an ``int``)."""
    REQUIRED: ClassVar[frozenset[str]] = frozenset(
        ("id", "name", "slots_total", "slots_processing")
    )
    """The rest have their defaults when a body leaves them out."""

    def to_body(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: Any) -> AgentSnapshot:
        """From a decoded frame body; ``ProtocolError`` naming the field if a type is
        wrong or a required field missing. Keys it does not know are ignored."""
        if not isinstance(body, dict):
            raise ProtocolError(f"AgentSnapshot: body must be a map, got {type(body).__name__}")
        return cls(
            **{
                f.name: check_field(body, f.name, cls.SPEC[f.name], "AgentSnapshot")
                for f in fields(cls)
                if f.name in body or f.name in cls.REQUIRED
            }
        )

    @property
    def label(self) -> str:
        """How operators know the agent: its name, else its id."""
        return self.name or self.id

    def sort_key(self) -> tuple[str, str]:
        """Agents are listed by name, then id."""
        return (self.name or "", self.id)
