"""Which hosts an agent downloads models from, and connections to those hosts only.

The rule (``HostGate``): a host is allowed when every address its name resolves to
is public; a loopback, private, link-local, shared (CGNAT), multicast, reserved or
unspecified address needs the host to be listed with ``--allow-model-host`` (by
name, by address, or by a network that holds the address; ``*`` allows every
host). IPv4 addresses inside IPv6 ones (``::ffff:a.b.c.d``, 6to4, NAT64) are checked
as the IPv4 address they carry.

The check and the connection use the same resolution: ``HostGate.create_connection``
resolves the name once, checks every address, then connects to one of the addresses
it checked (TLS still verifies the certificate against the host name), so DNS cannot
answer a public address to the check and a private one to the connection. Every
redirect opens a new connection through the same gate, so a redirect target is
checked the same way. ``opener`` builds a ``urllib`` opener with only http and https
(no ftp, file or data handlers); environment proxies are used only when every host
is allowed anyway, since through a proxy the address connected to is the proxy's.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from paddler.agent.source_errors import ModelSourceError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")

AddressInfo = tuple[Any, ...]
"""One entry of ``socket.getaddrinfo``: ``(family, type, proto, canonname, sockaddr)``."""


def _embedded(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_kind(address: IPAddress) -> str | None:
    """What makes ``address`` not public (``"loopback"``, ``"private"``...), or ``None``."""
    address = _embedded(address)
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared (carrier-grade NAT)"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "not public"
    return None


def _parse_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None


def _host_key(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


class HostGate:
    """Checks hosts against the operator's list and connects only to checked addresses.

    ``url`` is the download the gate serves (named in its issues); ``any_host``
    turns the checks off; ``on_connect`` hears every socket opened."""

    def __init__(
        self,
        url: str,
        *,
        any_host: bool,
        allowed_hosts: tuple[str, ...] = (),
        on_connect: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self.url = url
        self.any_host = any_host or "*" in allowed_hosts
        self._names: set[str] = set()
        self._networks: list[IPNetwork] = []
        for entry in allowed_hosts:
            try:
                self._networks.append(ipaddress.ip_network(entry.strip().strip("[]"), strict=False))
            except ValueError:
                self._names.add(_host_key(entry))
        self.on_connect = on_connect

    def addresses(self, host: str, port: int) -> list[AddressInfo]:
        """Every address of ``host`` (``socket.gaierror`` when it has none), checked:
        ``ModelSourceError`` with a ``ModelHostNotAllowed`` issue when one is refused."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if self.any_host or _host_key(host) in self._names:
            return infos
        for info in infos:
            address = _parse_address(str(info[4][0]))
            if address is None:
                raise self.refused(host, f"cannot tell whether {info[4][0]} is public")
            kind = address_kind(address)
            if kind is not None and not any(address in net for net in self._networks):
                raise self.refused(
                    host,
                    f"{host} resolves to {address}, a {kind} address; "
                    "list the host with --allow-model-host to allow it",
                )
        return infos

    def check_url(self, url: str) -> None:
        """Check the host of ``url`` (a URL another client is about to fetch)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.refused(url, "only http:// and https:// URLs can be downloaded")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise self.refused(parts.netloc, f"bad port: {exc}") from exc
        try:
            self.addresses(parts.hostname, port)
        except OSError as exc:
            raise self.refused(parts.hostname, f"cannot resolve the host name ({exc})") from exc

    def refused(self, host: str, reason: str) -> ModelSourceError:
        return ModelSourceError(
            {"ModelHostNotAllowed": {"url": self.url, "host": host, "error": reason}},
            f"cannot download {self.url}: host {host} is not allowed: {reason}",
        )

    def create_connection(
        self,
        address: tuple[str, int],
        timeout: Any = None,
        source_address: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> socket.socket:
        """``socket.create_connection``, to an address ``addresses`` checked."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in self.addresses(host, port):
            sock = socket.socket(family, kind, proto)
            try:
                if isinstance(timeout, int | float):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            if self.on_connect is not None:
                self.on_connect(sock)
            return sock
        raise error if error is not None else OSError(f"no address for {host}")

    def connection_class(self, base: type[http.client.HTTPConnection]) -> Any:
        """A factory of ``base`` connections that connect through this gate."""

        def create(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            connection = base(host, **kwargs)
            # http.client connects through this attribute (set in HTTPConnection.__init__,
            # used by connect() for the plain and the TLS connection alike)
            connection._create_connection = self.create_connection  # type: ignore[attr-defined]
            return connection

        return create


class _GatedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, gate: HostGate) -> None:
        super().__init__()
        self.gate = gate

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self.gate.connection_class(http.client.HTTPConnection), req)


class _GatedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, gate: HostGate) -> None:
        super().__init__()
        self.gate = gate
        self.tls = ssl.create_default_context()

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = self.gate.connection_class(http.client.HTTPSConnection)
        return self.do_open(factory, req, context=self.tls)


def opener(gate: HostGate) -> urllib.request.OpenerDirector:
    """An opener for http and https through ``gate``, redirects included."""
    director = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        _GatedHTTPHandler(gate),
        _GatedHTTPSHandler(gate),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ]
    if gate.any_host:
        handlers.insert(0, urllib.request.ProxyHandler())
    for handler in handlers:
        director.add_handler(handler)
    return director
