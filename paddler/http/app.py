"""The gunicorn entry point: ``paddler.http.app:get_app()``.

``paddler balancer`` starts gunicorn with the ``PADDLER_HTTP_CONFIG`` environment
variable (JSON, see ``HttpConfig``); every worker builds its apps from it and
opens its own connection to the broker. API keys travel in it only as SHA-256
digests (``paddler.http.api_keys``): the environment of a worker holds no usable key.

A worker has a role (``PADDLER_HTTP_ROLE``, set by the gunicorn hooks in
``paddler.http.server``): with two workers or more, one of them serves only the
management service and the others only inference and OpenAI, so an inference flood
cannot starve ``/api/v1/agents`` or ``/metrics``; a single worker serves all three.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from paddler.http.api_keys import ApiKeys
from paddler.http.asgi import ASGIApp, PortRouter
from paddler.http.common import DEFAULT_MAX_BODY_BYTES, HttpDeps
from paddler.http.link import BrokerLink

CONFIG_ENV = "PADDLER_HTTP_CONFIG"
ROLE_ENV = "PADDLER_HTTP_ROLE"

ROLES = {
    "all": frozenset({"inference", "management", "openai", "admin"}),
    "management": frozenset({"management", "admin"}),
    "services": frozenset({"inference", "openai"}),
}
"""A worker's role -> the services it serves (the web admin panel serves only files:
it goes with management, away from inference floods)."""


@dataclass
class HttpConfig:
    clients_addr: str
    apps: dict[str, str]
    """Listening port (as a string) -> ``inference``, ``management`` or ``openai``."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    cors: dict[str, list[str]] = field(default_factory=dict)
    """App name -> allowed origins."""
    api_keys: dict[str, list[str]] = field(default_factory=dict)
    """App name -> SHA-256 digests (hex) of the keys it requires; none: open."""
    curve_keys: list[str] | None = None
    """With curve: the broker's public key file and the workers' secret key file."""
    panel: dict[str, Any] = field(default_factory=dict)
    """What the web admin panel tells the browser (``PanelSettings``)."""

    def apps_of(self, role: str) -> dict[str, str]:
        """The ports (and their services) a worker of ``role`` serves."""
        return {port: name for port, name in self.apps.items() if name in ROLES[role]}

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, value: str) -> HttpConfig:
        return cls(**json.loads(value))


MODULES = {
    "inference": "paddler.http.inference",
    "management": "paddler.http.management",
    "openai": "paddler.http.openai",
    "admin": "paddler.http.admin",
}


def build(config: HttpConfig, role: str = "all") -> PortRouter:
    """One app per port the worker's role serves, sharing the worker's broker link."""
    link = BrokerLink(config.clients_addr, curve_keys=config.curve_keys)
    apps: dict[int, ASGIApp] = {}
    starting: list[Callable[[], Awaitable[None]]] = []
    stopping: list[Callable[[], Awaitable[None]]] = []
    for port, name in config.apps_of(role).items():
        deps = HttpDeps(
            link,
            config.max_body_bytes,
            list(config.cors.get(name, [])),
            api_keys=ApiKeys.from_hex(config.api_keys.get(name, [])),
            panel=config.panel,
            on_startup=starting,
            on_shutdown=stopping,
        )
        app: Any = importlib.import_module(MODULES[name]).create_app(deps)
        apps[int(port)] = app

    async def startup() -> None:
        for hook in starting:
            await hook()

    async def shutdown() -> None:
        for hook in stopping:
            await hook()
        await link.close()

    return PortRouter(apps, on_startup=startup, on_shutdown=shutdown)


def get_app() -> PortRouter:
    return build(HttpConfig.from_env(os.environ[CONFIG_ENV]), os.environ.get(ROLE_ENV, "all"))
