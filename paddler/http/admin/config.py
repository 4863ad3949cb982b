"""What the web admin panel tells the browser, and which origins it calls from.

The panel is a page app: the browser calls the public management and inference
services itself (cross-origin, with their API keys), so the balancer adds the panel's
origins to their CORS allow-lists (``panel_origins``). The page learns where the
services are from ``/config.json`` (``PanelSettings.for_browser``): a service bound to
a wildcard address (``0.0.0.0``, ``::``) is reached at the host name the browser used
for the panel itself, taken from the request's ``Host`` header after checking it is a
plain host name or address.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import asdict, dataclass
from typing import Any

from paddler import __version__

log = logging.getLogger("paddler.http")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_BRACKETED_V6 = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")


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


@dataclass(frozen=True)
class PanelSettings:
    """What the balancer knows that the panel shows (never a key, never a path)."""

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
    max_buffered_requests: int = 30
    buffered_request_timeout_ms: int = 10_000
    inference_item_timeout_ms: int = 30_000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
            "max_buffered_requests": self.max_buffered_requests,
            "buffered_request_timeout_ms": self.buffered_request_timeout_ms,
            "inference_item_timeout_ms": self.inference_item_timeout_ms,
        }

    def connect_sources(self, host_header: str | None) -> list[str]:
        """The origins the page may connect to (its CSP ``connect-src``)."""
        urls = self.urls(browser_host(host_header))
        keys = ("inference", "inference_socket", "management")
        return [value for key in keys if (value := urls[key]) is not None]
