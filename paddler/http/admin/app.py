"""The web admin panel's Falcon app: its page, its static files, ``/config.json``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import falcon
import falcon.asgi

from paddler.http.admin.config import PanelSettings
from paddler.http.common import ERROR_REPLY, HttpDeps, dumps, make_app
from paddler.http.openapi import JSON, OpenApiDocument, Operation, Reply

STATIC_PACKAGE = "paddler.http.admin"
STATIC_DIR = "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
"""The kinds of files the panel serves; others in ``static/`` are not served."""
MAX_ASSETS_BYTES = 300 * 1024
"""Every file of the panel together stays under this (a test holds it to it)."""


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every servable file of ``static/`` by name, read once."""
    assets: dict[str, Asset] = {}
    folder = resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR)
    for entry in folder.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if not entry.is_file() or suffix not in CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        etag = hashlib.sha256(body).hexdigest()[:20]
        assets[name] = Asset(body, CONTENT_TYPES[suffix], etag)
    return assets


def content_security_policy(panel: PanelSettings, host_header: str | None) -> str:
    connect = " ".join(["'self'", *panel.connect_sources(host_header)])
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


class SecurityHeaders:
    """Falcon middleware: every answer of the panel says what the page may do."""

    def __init__(self, panel: PanelSettings) -> None:
        self.panel = panel

    async def process_response(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: Any,
        req_succeeded: bool,
    ) -> None:
        resp.set_header("Content-Security-Policy", content_security_policy(self.panel, req.host))
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("X-Frame-Options", "DENY")
        resp.set_header("Referrer-Policy", "no-referrer")
        resp.set_header("Cross-Origin-Opener-Policy", "same-origin")


def _send(req: falcon.asgi.Request, resp: falcon.asgi.Response, asset: Asset) -> None:
    resp.set_header("Cache-Control", "no-cache")
    resp.etag = asset.etag
    if req.if_none_match and any(tag == asset.etag for tag in req.if_none_match):
        resp.status = falcon.HTTP_304
        return
    resp.content_type = asset.content_type
    resp.data = asset.body


PAGE = Reply("The panel's page", "text/html")


class Page:
    """``GET /``: the panel's one page (every view is a ``#/...`` route in it)."""

    OPERATIONS = {"get": Operation("The web admin panel", replies={200: PAGE})}

    def __init__(self, assets: dict[str, Asset]) -> None:
        self.asset = assets["index.html"]

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _send(req, resp, self.asset)

    on_head = on_get


class Static:
    OPERATIONS = {
        "get": Operation(
            "A file of the panel (script, style sheet, icon)",
            replies={200: Reply("The file", "application/octet-stream")},
        )
    }

    def __init__(self, assets: dict[str, Asset]) -> None:
        self.assets = assets

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        asset = self.assets.get(name)
        if asset is None:
            raise falcon.HTTPNotFound()
        _send(req, resp, asset)

    on_head = on_get


class Icon:
    """``GET /favicon.ico``: the panel's icon (browsers ask for this path by themselves)."""

    OPERATIONS = {
        "get": Operation("The panel's icon", replies={200: Reply("SVG", "image/svg+xml")})
    }

    def __init__(self, assets: dict[str, Asset]) -> None:
        self.asset = assets["favicon.svg"]

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _send(req, resp, self.asset)

    on_head = on_get


class Config:
    """``GET /config.json``: where the services are (as this browser reaches them),
    whether they need keys, the buffer's bounds, whether agents need curve keys (and
    then the balancer's public key and key paths for the "add an agent" command)."""

    OPERATIONS = {
        "get": Operation(
            "What the panel needs to know about this balancer (no secret, no API key)",
            replies={200: Reply("The panel's configuration", JSON, {"type": "object"})},
        )
    }

    def __init__(self, panel: PanelSettings) -> None:
        self.panel = panel

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.set_header("Cache-Control", "no-store")  # it depends on the Host header
        resp.content_type = falcon.MEDIA_JSON
        resp.text = dumps(self.panel.for_browser(req.host))


def create_app(deps: HttpDeps) -> falcon.asgi.App[Any, Any]:
    panel = PanelSettings.from_dict(deps.panel) if deps.panel else PanelSettings("", "")
    curve_keys = getattr(deps.link, "curve_keys", None)  # the worker's: [broker's public key, ...]
    panel = panel.with_agent_keys(curve_keys[0] if curve_keys else None)
    assets = load_assets()
    app = make_app(deps)
    app.add_middleware(SecurityHeaders(panel))
    app.add_route("/", Page(assets))
    app.add_route("/static/{name}", Static(assets))
    app.add_route("/favicon.ico", Icon(assets))
    app.add_route("/config.json", Config(panel))
    app.add_route("/openapi.json", OpenApiDocument(app, "paddler web admin panel", ERROR_REPLY))
    return app
