"""What the web admin panel tells the browser, and which origins it calls from.

The panel is a page app: the browser calls the public management and inference
services itself (cross-origin, with their API keys), so the balancer adds the panel's
origins to their CORS allow-lists (``panel_origins``). The page learns where the
services are from ``/config.json`` (``PanelSettings.for_browser``): a service bound to
a wildcard address (``0.0.0.0``, ``::``) is reached at the host name the browser used
for the panel itself, taken from the request's ``Host`` header after checking it is a
plain host name or address.

With CurveZMQ, ``/config.json`` also carries what the "add an agent" command names: the
balancer's public key, its public key file and its ``--authorized-agent-keys`` folder
(``AgentKeys``); never a secret key, nor its path.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from paddler import __version__
from paddler.errors import ConfigurationError
from paddler.settings import env_name

log = logging.getLogger("paddler.http")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_BRACKETED_V6 = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")
Z85_KEY = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
"""A CurveZMQ public key as ``zmq.auth`` files hold it (Z85, 40 characters)."""
SECRET_KEY_ENV = env_name("curve_secret_key")
AGENT_KEYS_ENV = env_name("authorized_agent_keys")
"""The balancer's own environment variables for ``--curve-secret-key`` and
``--authorized-agent-keys``, which its HTTP workers inherit (``paddler cluster`` sets
them for the balancer it starts)."""


def split_host_port(address: str) -> tuple[str, str]:
    """``("host", "port")`` of ``host:port`` (IPv6 hosts keep their brackets)."""
    host, _, port = address.rpartition(":")
    return host, port


def _bracketed(host: str) -> str:
    """An IPv6 address in brackets, as URLs write it; other hosts as they are."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


def is_loopback(host: str) -> bool:
    bare = host.strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def browser_host(host_header: str | None) -> str | None:
    """The host part of a ``Host`` header if it is a plain host name, IPv4 or bracketed
    IPv6 address (anything else, say with quotes or spaces, is ignored: it would end up
    in a header and in the page's configuration)."""
    if not host_header or len(host_header) > 300:
        return None
    value = host_header.strip()
    if value.startswith("["):
        end = value.find("]")
        host = value[: end + 1] if end > 0 else ""
        if _BRACKETED_V6.fullmatch(host):
            return host.lower()
        return None
    host = value.split(":", 1)[0]
    return host.lower() if _HOST_NAME.fullmatch(host) else None


def reachable_address(address: str, seen_as: str | None) -> str:
    """``address`` (``host:port`` as bound) as a browser reaches it: a wildcard host is
    replaced by the host the browser used for the panel (``seen_as``), else 127.0.0.1."""
    host, port = split_host_port(address)
    if is_wildcard(host):
        host = seen_as or "127.0.0.1"
    return f"{_bracketed(host)}:{port}"


def panel_origins(address: str, tls: bool) -> list[str]:
    """The origins a browser may load the panel from when it is bound to ``address``,
    which the inference and management services allow (CORS).

    A loopback address also gets the other loopback names (``localhost``, ``[::1]``,
    ``127.0.0.1``); a wildcard address gets those, this machine's host names and the
    addresses they resolve to. A browser that reaches the panel under another name
    needs that origin added with ``--management-cors-allowed-host`` and
    ``--inference-cors-allowed-host``."""
    scheme = "https" if tls else "http"
    host, port = split_host_port(address)
    hosts: list[str] = []
    if is_wildcard(host):
        hosts += list(LOOPBACK_NAMES)
        hosts += _this_machine()
    else:
        hosts.append(_bracketed(host).lower())
        if is_loopback(host):
            hosts += list(LOOPBACK_NAMES)
    return [f"{scheme}://{name}:{port}" for name in dict.fromkeys(hosts)]


def _this_machine() -> list[str]:
    names: list[str] = []
    try:
        hostname = socket.gethostname()
        names += [hostname, socket.getfqdn()]
        names += socket.gethostbyname_ex(hostname)[2]
    except OSError as exc:  # a host name that does not resolve: the loopback names only
        log.debug("this machine's names for the panel's origins: %s", exc)
    return [_bracketed(name).lower() for name in names if name]


def _public_key(path: Path) -> str | None:
    """The public key (Z85) in a ``zmq.auth`` key file, or ``None``."""
    from paddler.curve import load_public

    try:
        key = load_public(path, "key file").decode("ascii", "replace")
    except ConfigurationError:
        return None
    return key if Z85_KEY.fullmatch(key) else None


def public_twin(secret_key: Path) -> Path | None:
    """``NAME.key`` beside ``NAME.key_secret`` (as ``paddler keys generate`` and
    ``zmq.auth.create_certificates`` write them), if the name says so."""
    if not secret_key.name.endswith(".key_secret"):
        return None
    return secret_key.with_name(secret_key.name.removesuffix("_secret"))


@dataclass(frozen=True)
class AgentKeys:
    """With curve, what the "add an agent" command names on the balancer's side:
    its public key, the file that holds it, and the folder of allowed agent keys."""

    broker_public_key: str | None = None
    """Z85: written into a file on the new agent's host (public by design)."""
    broker_public_key_file: str | None = None
    """The ``.key`` twin of ``--curve-secret-key``, when it holds the balancer's key."""
    authorized_agent_keys: str | None = None
    """``--authorized-agent-keys``, as an absolute path."""

    @classmethod
    def of(
        cls,
        curve_secret_key: str | None,
        authorized_agent_keys: str | None,
        broker_public_key: str | None = None,
    ) -> AgentKeys:
        """From the balancer's options. ``broker_public_key``: the key the balancer
        uses, when known: then the options are taken only if their key files hold it
        (options read from the environment may not be the ones the balancer was
        given); else it is read from the public twin of ``curve_secret_key``. The
        secret key file itself is never read."""
        if not curve_secret_key:
            return cls(broker_public_key)
        twin = public_twin(Path(curve_secret_key).expanduser().absolute())
        twin_key = _public_key(twin) if twin is not None and twin.is_file() else None
        if broker_public_key is not None and twin_key != broker_public_key:
            return cls(broker_public_key)  # not the balancer's key: nothing else is trusted
        folder = None
        if authorized_agent_keys:
            folder = str(Path(authorized_agent_keys).expanduser().absolute())
        return cls(
            broker_public_key or twin_key,
            str(twin) if twin_key is not None else None,
            folder,
        )

    @classmethod
    def of_worker(cls, broker_key_file: str | None, environ: Mapping[str, str]) -> AgentKeys:
        """In an HTTP worker: the balancer's public key from the file the worker's
        broker link uses (``broker_key_file``), the paths from the balancer's options
        in ``environ`` when they name that key."""
        public = _public_key(Path(broker_key_file)) if broker_key_file else None
        if public is None:
            return cls()
        return cls.of(environ.get(SECRET_KEY_ENV), environ.get(AGENT_KEYS_ENV), public)


@dataclass(frozen=True)
class PanelSettings:
    """What the balancer knows that the panel shows: never a secret (no API key, no
    secret key nor its path); with curve, the balancer's public key and the paths the
    "add an agent" command names (``AgentKeys``)."""

    inference_addr: str
    management_addr: str
    openai_addr: str | None = None
    panel_addr: str | None = None
    tls: bool = False
    inference_api_key: bool = False
    """Whether the inference service requires a key (the panel then asks for one)."""
    management_api_key: bool = False
    agents_addr: str = "tcp://127.0.0.1:8070"
    curve: bool = False
    """Whether agents need CurveZMQ keys (the "add an agent" command shows the options)."""
    broker_public_key: str | None = None
    broker_public_key_file: str | None = None
    authorized_agent_keys: str | None = None
    """With curve: ``AgentKeys`` (the panel's worker fills them in when not given)."""
    max_buffered_requests: int = 30
    buffered_request_timeout_ms: int = 10_000
    inference_item_timeout_ms: int = 30_000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def agent_keys(self) -> AgentKeys:
        return AgentKeys(
            self.broker_public_key, self.broker_public_key_file, self.authorized_agent_keys
        )

    def with_agent_keys(
        self, broker_key_file: str | None, environ: Mapping[str, str] = os.environ
    ) -> PanelSettings:
        """With curve and no ``AgentKeys`` given: those the worker can find
        (``AgentKeys.of_worker``); else these settings as they are."""
        if not self.curve or self.agent_keys != AgentKeys():
            return self
        return replace(self, **asdict(AgentKeys.of_worker(broker_key_file, environ)))

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> PanelSettings:
        return cls(**value)

    def urls(self, seen_as: str | None) -> dict[str, str | None]:
        """Each service's base URL as the browser that asked reaches it."""
        http = "https" if self.tls else "http"
        ws = "wss" if self.tls else "ws"

        def url(scheme: str, address: str | None) -> str | None:
            if address is None:
                return None
            return f"{scheme}://{reachable_address(address, seen_as)}"

        return {
            "inference": url(http, self.inference_addr),
            "inference_socket": url(ws, self.inference_addr),
            "management": url(http, self.management_addr),
            "openai": url(http, self.openai_addr),
            "panel": url(http, self.panel_addr),
        }

    def agents_address(self, seen_as: str | None) -> str:
        """The agents socket as an agent on another host would connect to it."""
        scheme, sep, rest = self.agents_addr.partition("://")
        if not sep or not rest or rest.startswith("/"):  # ipc:// and the like
            return self.agents_addr
        return f"{scheme}://{reachable_address(rest, seen_as)}"

    def for_browser(self, host_header: str | None) -> dict[str, Any]:
        """The body of ``/config.json`` for a browser that sent ``host_header``."""
        seen_as = browser_host(host_header)
        return {
            "version": __version__,
            "urls": self.urls(seen_as),
            "addresses": {
                "inference": self.inference_addr,
                "management": self.management_addr,
                "openai": self.openai_addr,
                "panel": self.panel_addr,
                "agents": self.agents_addr,
            },
            "agents_address": self.agents_address(seen_as),
            "tls": self.tls,
            "api_keys": {
                "inference": self.inference_api_key,
                "management": self.management_api_key,
            },
            "curve": self.curve,
            "curve_keys": asdict(self.agent_keys) if self.curve else None,
            "max_buffered_requests": self.max_buffered_requests,
            "buffered_request_timeout_ms": self.buffered_request_timeout_ms,
            "inference_item_timeout_ms": self.inference_item_timeout_ms,
        }

    def connect_sources(self, host_header: str | None) -> list[str]:
        """The origins the page may connect to (its CSP ``connect-src``)."""
        urls = self.urls(browser_host(host_header))
        keys = ("inference", "inference_socket", "management")
        return [value for key in keys if (value := urls[key]) is not None]
