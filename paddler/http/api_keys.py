"""API keys on the HTTP services: ``Authorization: Bearer <key>``.

The balancer takes keys as values of ``--inference-api-key`` and
``--management-api-key``, each either a key or ``@FILE`` (one key per line; blank
lines and lines starting with ``#`` are skipped). It reads them once, at start;
its HTTP workers receive only their SHA-256 digests (in ``PADDLER_HTTP_CONFIG``),
so neither a worker's environment nor a command line paddler starts holds a usable key.

A presented key is hashed and compared with *every* configured digest by
``hmac.compare_digest``, without stopping at a match: the time an answer takes says
neither whether nor which key matched. Keys are never logged; error messages about
them name the flag, the file and the line, never the key.

Browsers cannot set headers on a WebSocket, so the inference socket also takes the
key as a subprotocol offer: ``new WebSocket(url, ["paddler", "paddler.bearer." + key])``.
The server answers with ``paddler`` when it was offered (the key is not echoed),
otherwise with the ``paddler.bearer.`` value itself, since a browser fails a
handshake whose answer is not one of its offers. (A subprotocol cannot hold ``/`` or
``=``: keys meant for browsers should not either.)

Anthropic's ``/v1/messages`` (and ``/v1/models``, which Anthropic's SDKs list) also
take the key as ``x-api-key: <key>``, the header
Anthropic's SDKs send (a resource names such a header in ``API_KEY_HEADER``); a
request that presents both is served when either is right.

Open without a key: ``/health``, ``/openapi.json`` (resources with
``OPEN_WITHOUT_API_KEY = True``) and every ``OPTIONS`` request (CORS preflights
carry no credentials).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import falcon.asgi

from paddler.errors import ConfigurationError, PaddlerError

KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
"""RFC 6750's ``b64token``: what an ``Authorization: Bearer`` header can carry."""
SUBPROTOCOL = "paddler"
"""The WebSocket subprotocol of the inference socket (optional to offer)."""
BEARER_SUBPROTOCOL_PREFIX = "paddler.bearer."
"""A WebSocket subprotocol offer ``paddler.bearer.<key>`` carries a key."""
OPEN_WITHOUT_API_KEY = "OPEN_WITHOUT_API_KEY"
"""A resource with this attribute true is served without a key."""
KEY_HEADER = "API_KEY_HEADER"
"""A resource with this attribute (a header name, e.g. ``x-api-key`` for Anthropic's
API) also takes its key in that header, besides ``Authorization: Bearer``."""
REQUIRED_IN_CONTEXT = "api_keys_required"
"""Set true in ``req.context`` when the service requires keys (for its OpenAPI document)."""
UNAUTHORIZED_CLOSE_CODE = 3401
"""Falcon's close code for a 401 on a WebSocket; closed before the handshake is
accepted, so the server refuses the upgrade (gunicorn answers 403)."""


class Unauthorized(PaddlerError):
    """A request without a key, or with a key the service does not accept."""

    def __init__(self, presented: bool) -> None:
        super().__init__(
            "the API key is not valid"
            if presented
            else "an API key is required: send the header Authorization: Bearer <key>"
        )
        self.presented = presented

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value (RFC 6750)."""
        return 'Bearer realm="paddler", error="invalid_token"' if self.presented else "Bearer"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The keys a service accepts, kept as SHA-256 digests; none: the service is open."""

    digests: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, keys: Iterable[str]) -> ApiKeys:
        return cls(tuple(dict.fromkeys(_digest(key) for key in keys)))

    @classmethod
    def from_hex(cls, values: Iterable[str]) -> ApiKeys:
        return cls(tuple(bytes.fromhex(value) for value in values))

    def hex(self) -> list[str]:
        return [digest.hex() for digest in self.digests]

    def __bool__(self) -> bool:
        return bool(self.digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self.digests)} keys)"

    def accepts(self, key: str | None) -> bool:
        """Whether ``key`` is one of the keys: compared with every one, in constant time."""
        presented = _digest(key or "")
        matched = False
        for digest in self.digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched and bool(key)


def _checked(key: str, flag: str, where: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise ConfigurationError(
            flag,
            f"{where} is not a valid key: use letters, digits and - . _ ~ + / "
            "(then = padding), as a bearer token allows",
        )
    return key


def _keys_of_file(path: Path, flag: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(flag, f"cannot read the key file {path}: {exc}") from None
    keys = [
        _checked(line.strip(), flag, f"line {number} of {path}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not keys:
        raise ConfigurationError(flag, f"the key file {path} holds no key")
    return keys


def read_api_keys(values: Iterable[str], flag: str) -> list[str]:
    """The keys of a key option's values: each a key, or ``@FILE`` of one key per line."""
    keys: list[str] = []
    for index, value in enumerate(values, 1):
        if value.startswith("@"):
            keys.extend(_keys_of_file(Path(value[1:]).expanduser(), flag))
        else:
            keys.append(_checked(value, flag, f"value {index}"))
    return keys


def bearer_key(req: falcon.asgi.Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, if the request has one."""
    header = req.get_header("Authorization")
    if header is None:
        return None
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def header_key(req: falcon.asgi.Request, resource: Any) -> str | None:
    """The key in the header the resource also takes it in (``KEY_HEADER``), if any."""
    name = getattr(resource, KEY_HEADER, None)
    if not isinstance(name, str):
        return None
    value = req.get_header(name)
    if value is None:
        return None
    return value.strip() or None


def subprotocol_keys(offered: Iterable[str]) -> list[str]:
    """The keys of ``paddler.bearer.<key>`` WebSocket subprotocol offers."""
    return [
        protocol[len(BEARER_SUBPROTOCOL_PREFIX) :]
        for protocol in offered
        if protocol.startswith(BEARER_SUBPROTOCOL_PREFIX)
    ]


def accepted_subprotocol(offered: Sequence[str]) -> str | None:
    """The subprotocol to answer a WebSocket handshake with: ``paddler`` if offered, else
    the first ``paddler.bearer.`` offer (a browser needs one of its offers back), else none."""
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    return next((p for p in offered if p.startswith(BEARER_SUBPROTOCOL_PREFIX)), None)


def _open(req: falcon.asgi.Request, resource: Any) -> bool:
    return req.method == "OPTIONS" or bool(getattr(resource, OPEN_WITHOUT_API_KEY, False))


class ApiKeyCheck:
    """Falcon middleware: every routed request needs one of ``keys``, except open ones.

    It runs after routing (``process_resource``), so a resource says itself whether it
    is open; an unknown path is a 404 with or without a key."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        setattr(req.context, REQUIRED_IN_CONTEXT, True)

    async def process_resource(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: Any,
        params: dict[str, Any],
    ) -> None:
        if _open(req, resource):
            return
        candidates: list[str | None] = [
            key for key in (bearer_key(req), header_key(req, resource)) if key
        ]
        verdicts = [self.keys.accepts(key) for key in candidates or [None]]  # no early exit
        if not any(verdicts):
            raise Unauthorized(presented=bool(candidates))

    async def process_request_ws(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket) -> None:
        setattr(req.context, REQUIRED_IN_CONTEXT, True)

    async def process_resource_ws(
        self,
        req: falcon.asgi.Request,
        ws: falcon.asgi.WebSocket,
        resource: Any,
        params: dict[str, Any],
    ) -> None:
        if getattr(resource, OPEN_WITHOUT_API_KEY, False):
            return
        candidates = [key for key in (bearer_key(req),) if key is not None]
        candidates += subprotocol_keys(ws.subprotocols)
        verdicts = [self.keys.accepts(key) for key in candidates]  # all of them, no early exit
        if not any(verdicts):
            raise Unauthorized(presented=bool(candidates))
