"""Settings of the HTTP services of ``paddler balancer``, declared once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from paddler.http.common import DEFAULT_MAX_BODY_BYTES
from paddler.settings import option

SECRET = {"secret": True}
"""Field metadata of a setting that holds secrets: ``paddler cluster`` passes it to its
balancer in the environment, never on a command line (``ps`` shows command lines)."""


PANEL_OFF = frozenset({"", "off", "none"})
"""Values of ``--web-admin-panel-addr`` that turn the panel off."""
CLUSTER_PANEL_ADDR = "127.0.0.1:8062"
"""Where ``paddler cluster`` serves the web admin panel unless told otherwise."""


def default_http_workers() -> int:
    """Cores, at most 4, and at least 2: one of them serves only management, so an
    inference flood cannot starve the agents list or ``/metrics``, even on one core."""
    return max(2, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class HttpSettings:
    inference_addr: str = field(
        default="127.0.0.1:8061",
        metadata=option("host:port of the inference service (Paddler's API)."),
    )
    management_addr: str = field(
        default="127.0.0.1:8060",
        metadata=option(
            "host:port of the management service (agents, desired state, metrics). Keep it private."
        ),
    )
    compat_openai_addr: str | None = field(
        default=None,
        metadata=option("host:port of the OpenAI-compatible service; off unless given."),
    )
    web_admin_panel_addr: str | None = field(
        default=None,
        metadata=option(
            "host:port of the web admin panel (dashboard, live charts, model, prompt "
            "playground); off unless given (paddler cluster: 127.0.0.1:8062; 'off' turns "
            "it off). Its origin is allowed on the inference and management services."
        ),
    )
    http_workers: int = field(
        default_factory=default_http_workers,
        metadata=option(
            "gunicorn worker processes serving HTTP (default: cores, from 2 to 4).", minimum=1
        ),
    )
    max_request_body_bytes: int = field(
        default=DEFAULT_MAX_BODY_BYTES,
        metadata=option("Largest request body accepted; larger ones get 413.", minimum=1024),
    )
    inference_cors_allowed_host: list[str] = field(
        default_factory=list,
        metadata=option(
            "An origin (scheme://host[:port]) allowed to call the inference and OpenAI "
            "services from a browser; repeat for more.",
            multiple=True,
        ),
    )
    management_cors_allowed_host: list[str] = field(
        default_factory=list,
        metadata=option(
            "An origin allowed to call the management service from a browser; repeat for more.",
            multiple=True,
        ),
    )

    inference_api_key: list[str] = field(
        default_factory=list,
        metadata=option(
            "An API key the inference and OpenAI services require (Authorization: Bearer "
            "<key>), or @FILE: a file of one key per line; repeat for more. Without any, "
            "they are open. Prefer @FILE or the environment: command lines are visible to "
            "every user of the machine.",
            multiple=True,
        )
        | SECRET,
    )
    management_api_key: list[str] = field(
        default_factory=list,
        metadata=option(
            "An API key the management service requires, or @FILE of one key per line; "
            "repeat for more. Without any, it is open.",
            multiple=True,
        )
        | SECRET,
    )
    tls_cert: str | None = field(
        default=None,
        metadata=option(
            "A PEM certificate (chain) file: every HTTP service speaks HTTPS. Needs --tls-key."
        ),
    )
    tls_key: str | None = field(
        default=None,
        metadata=option("The PEM private key file of --tls-cert (not encrypted)."),
    )

    @property
    def panel_addr(self) -> str | None:
        """The web admin panel's host:port, or ``None`` when it is off."""
        value = self.web_admin_panel_addr
        return None if value is None or value.strip().lower() in PANEL_OFF else value

    def addresses(self) -> dict[str, str]:
        """App name -> host:port, for the services that are on."""
        out = {"inference": self.inference_addr, "management": self.management_addr}
        if self.compat_openai_addr:
            out["openai"] = self.compat_openai_addr
        if self.panel_addr:
            out["admin"] = self.panel_addr
        return out


FLAGS = {
    "inference": "--inference-addr",
    "management": "--management-addr",
    "openai": "--compat-openai-addr",
    "admin": "--web-admin-panel-addr",
}
"""The option that sets each service's address (app name -> flag)."""
