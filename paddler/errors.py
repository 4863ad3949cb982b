"""The exception tree of paddler: one root, families named for the cause."""

from __future__ import annotations


class PaddlerError(Exception):
    """Root of every error paddler raises on purpose."""


class ProtocolError(PaddlerError):
    """A frame that is malformed, truncated, oversized, of an unknown kind or version."""


class ConfigurationError(PaddlerError):
    """A setting or a desired state that cannot be applied; names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class BrokerUnreachable(PaddlerError, TimeoutError):
    """The broker did not answer within the client's timeout."""


class RequestFailed(PaddlerError):
    """A request ended with an error reported by the broker or an agent."""

    def __init__(self, code: int, kind: str, description: str) -> None:
        super().__init__(f"{code} {kind}: {description}")
        self.code = code
        self.kind = kind
        self.description = description


class EngineError(PaddlerError):
    """The inference engine could not do what was asked."""


class InvalidRequest(PaddlerError):
    """A request that cannot be served as written; names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
