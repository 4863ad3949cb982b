"""The web admin panel's Falcon app through ``falcon.testing``: its page, files and
configuration, the headers that fence the page in, and the origins the balancer adds
to the services' CORS lists. Also: what ships (inside the package, small, no CDN, no
HTML built from data)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import falcon.testing
import pytest

from paddler.http import admin, management
from paddler.http.admin.app import MAX_ASSETS_BYTES, load_assets
from paddler.http.admin.config import (
    AGENT_KEYS_ENV,
    SECRET_KEY_ENV,
    AgentKeys,
    PanelSettings,
    browser_host,
    panel_origins,
)
from paddler.http.app import ROLES
from paddler.http.common import HttpDeps
from paddler.http.server import gunicorn_command, http_config
from paddler.http.settings import HttpSettings
from tests.unit.fake_broker import FakeClient, FakeLink

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "paddler" / "http" / "admin" / "static"
PANEL = PanelSettings(
    inference_addr="127.0.0.1:8061",
    management_addr="127.0.0.1:8060",
    panel_addr="127.0.0.1:8062",
    inference_api_key=True,
    curve=True,
    max_buffered_requests=12,
    buffered_request_timeout_ms=2500,
)


def panel_app(
    settings: PanelSettings = PANEL, broker_key_file: Path | None = None
) -> falcon.testing.TestClient:
    """The panel's app; ``broker_key_file``: the balancer's public key file its worker's
    broker link uses (with curve)."""
    link = FakeLink(FakeClient())
    if broker_key_file is not None:
        link.curve_keys = [str(broker_key_file), "/worker/http-workers.key_secret"]  # type: ignore[attr-defined]
    deps = HttpDeps(link=link, panel=settings.to_dict())  # type: ignore[arg-type]
    return falcon.testing.TestClient(admin.create_app(deps))


def balancer_keys(folder: Path) -> tuple[Path, Path, Path, str]:
    """A balancer's keys as ``paddler keys generate`` writes them, a folder of agent
    keys, and the copy of its public key a worker gets: (secret key file, agents
    folder, the worker's copy, the public key)."""
    from paddler.curve import generate, load_public, write_public

    public, secret = generate(folder / "etc", "balancer")
    agents = folder / "etc" / "agents"
    agents.mkdir()
    key = load_public(public, "test")
    (folder / "worker").mkdir()
    copy = write_public(folder / "worker" / "broker.key", key)
    return secret, agents, copy, key.decode()


def test_the_page_and_its_files_are_served_with_a_strict_policy() -> None:
    client = panel_app()
    page = client.simulate_get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert (
        "connect-src 'self' http://127.0.0.1:8061 ws://127.0.0.1:8061 http://127.0.0.1:8060;"
        in (policy)
    )
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    script = client.simulate_get("/static/main.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "content-security-policy" in script.headers
    again = client.simulate_get(
        "/static/main.js", headers={"If-None-Match": script.headers["etag"]}
    )
    assert again.status_code == 304
    assert client.simulate_get("/favicon.ico").headers["content-type"] == "image/svg+xml"
    assert client.simulate_head("/").status_code == 200


@pytest.mark.parametrize(
    "path", ["/static/nope.js", "/static/..%2Fapp.py", "/static/../app.py", "/app.py", "/static/"]
)
def test_only_the_panel_files_are_served(path: str) -> None:
    assert panel_app().simulate_get(path).status_code == 404


def test_the_configuration_says_where_the_services_are_and_never_a_key() -> None:
    body = panel_app().simulate_get("/config.json").json
    assert body["urls"] == {
        "inference": "http://127.0.0.1:8061",
        "inference_socket": "ws://127.0.0.1:8061",
        "management": "http://127.0.0.1:8060",
        "openai": None,
        "panel": "http://127.0.0.1:8062",
    }
    assert body["api_keys"] == {"inference": True, "management": False}
    assert body["curve"] is True
    assert (body["max_buffered_requests"], body["buffered_request_timeout_ms"]) == (12, 2500)


def test_with_curve_the_configuration_names_the_balancers_public_key_and_key_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the "add an agent" command prints: the balancer's public key and public key
    file (the twin of --curve-secret-key) and --authorized-agent-keys, found by the
    worker from the balancer's options in its environment; never a secret."""
    secret, agents, copy, public = balancer_keys(tmp_path)
    monkeypatch.setenv(SECRET_KEY_ENV, str(secret))
    monkeypatch.setenv(AGENT_KEYS_ENV, str(agents))
    answer = panel_app(broker_key_file=copy).simulate_get("/config.json")
    assert answer.json["curve"] is True
    assert answer.json["curve_keys"] == {
        "broker_public_key": public,
        "broker_public_key_file": str(tmp_path / "etc" / "balancer.key"),
        "authorized_agent_keys": str(agents),
    }
    secret_text = secret.read_text()
    secret_z85 = secret_text.split("secret-key")[1].split('"')[1]
    assert secret_z85 not in answer.text and "key_secret" not in answer.text

    # options in the environment that name another key are not the balancer's: only
    # the key it uses is said
    _, other_agents, _, _ = balancer_keys(tmp_path / "other")
    monkeypatch.setenv(SECRET_KEY_ENV, str(tmp_path / "other" / "etc" / "balancer.key_secret"))
    monkeypatch.setenv(AGENT_KEYS_ENV, str(other_agents))
    stale = panel_app(broker_key_file=copy).simulate_get("/config.json").json
    assert stale["curve_keys"] == {
        "broker_public_key": public,
        "broker_public_key_file": None,
        "authorized_agent_keys": None,
    }
    # settings that carry them win; without curve there are none
    given = AgentKeys.of(str(secret), str(agents))
    assert given == AgentKeys(public, str(tmp_path / "etc" / "balancer.key"), str(agents))
    settings = dataclasses.replace(PANEL, broker_public_key="x" * 40)
    assert panel_app(settings, copy).simulate_get("/config.json").json["curve_keys"] == {
        "broker_public_key": "x" * 40,
        "broker_public_key_file": None,
        "authorized_agent_keys": None,
    }
    off = dataclasses.replace(PANEL, curve=False)
    assert panel_app(off, copy).simulate_get("/config.json").json["curve_keys"] is None


def test_paddler_cluster_gives_its_balancer_the_key_paths_in_its_environment() -> None:
    from paddler.broker.settings import BrokerSettings
    from paddler.cluster import ClusterKeys, _curve_env

    keys = ClusterKeys(1)
    try:
        broker = BrokerSettings(**keys.broker_options())
        env = _curve_env(broker)
        assert env == {
            SECRET_KEY_ENV: str(keys.private.path / "broker.key_secret"),
            AGENT_KEYS_ENV: str(keys.private.path / "agents"),
        }
        found = AgentKeys.of_worker(keys.broker_public, env)
        assert found.broker_public_key_file == keys.broker_public
        assert found.authorized_agent_keys == str(keys.private.path / "agents")
    finally:
        keys.close()
    assert _curve_env(BrokerSettings()) == {}


def test_services_on_a_wildcard_address_are_reached_at_the_host_the_browser_used() -> None:
    settings = PanelSettings(
        inference_addr="0.0.0.0:8061",
        management_addr="[::]:8060",
        panel_addr="0.0.0.0:8062",
        agents_addr="tcp://0.0.0.0:8070",
        tls=True,
    )
    client = panel_app(settings)
    answer = client.simulate_get("/config.json", host="gpu-box.lan")
    body = answer.json
    assert body["urls"]["inference"] == "https://gpu-box.lan:8061"
    assert body["urls"]["inference_socket"] == "wss://gpu-box.lan:8061"
    assert body["urls"]["management"] == "https://gpu-box.lan:8060"
    assert body["agents_address"] == "tcp://gpu-box.lan:8070"
    assert answer.headers["cache-control"] == "no-store"
    assert "wss://gpu-box.lan:8061" in answer.headers["content-security-policy"]
    # a Host header that is not a plain host name is not echoed anywhere
    hostile = client.simulate_get("/config.json", host="evil'; script-src *")
    assert hostile.json["urls"]["inference"] == "https://127.0.0.1:8061"
    assert "evil" not in hostile.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("example.com:8062", "example.com"),
        ("[::1]:8062", "[::1]"),
        ("10.1.2.3", "10.1.2.3"),
        ("a b", None),
        ('x"y', None),
        ("[::1", None),
        ("", None),
        ("x" * 400, None),
    ],
)
def test_only_plain_host_names_are_taken_from_the_host_header(
    header: str, host: str | None
) -> None:
    assert browser_host(header) == host


def test_the_panel_origins_are_allowed_on_inference_and_management() -> None:
    assert panel_origins("127.0.0.1:8062", tls=False) == [
        "http://127.0.0.1:8062",
        "http://localhost:8062",
        "http://[::1]:8062",
    ]
    assert panel_origins("10.0.0.5:9000", tls=True) == ["https://10.0.0.5:9000"]
    everywhere = panel_origins("0.0.0.0:8062", tls=False)
    assert "http://localhost:8062" in everywhere and "http://0.0.0.0:8062" not in everywhere
    settings = HttpSettings(
        web_admin_panel_addr="127.0.0.1:8062",
        management_cors_allowed_host=["https://ops.example"],
    )
    config = http_config(settings, "tcp://127.0.0.1:8071")
    assert config.cors["management"] == [
        "https://ops.example",
        *panel_origins("127.0.0.1:8062", False),
    ]
    assert config.cors["inference"] == panel_origins("127.0.0.1:8062", False)
    assert config.cors["openai"] == []
    assert config.apps["8062"] == "admin" and "admin" in ROLES["management"]
    assert config.panel["panel_addr"] == "127.0.0.1:8062"
    assert "127.0.0.1:8062" in gunicorn_command(settings, "info")
    # a browser on the panel's page may then call management (a preflighted PUT too)
    deps = HttpDeps(link=FakeLink(FakeClient()), cors_origins=config.cors["management"])  # type: ignore[arg-type]
    client = falcon.testing.TestClient(management.create_app(deps))
    preflight = client.simulate_options(
        "/api/v1/balancer_desired_state",
        headers={
            "Origin": "http://localhost:8062",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:8062"
    assert "PUT" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"]


@pytest.mark.parametrize("value", [None, "off", "OFF", "none", ""])
def test_the_panel_is_off_unless_given_an_address(value: str | None) -> None:
    settings = HttpSettings(web_admin_panel_addr=value)
    assert settings.panel_addr is None and "admin" not in settings.addresses()
    assert http_config(settings, "tcp://127.0.0.1:8071").panel == {}


def test_a_panel_port_taken_by_another_service_is_refused_with_the_flag_named() -> None:
    settings = HttpSettings(web_admin_panel_addr="127.0.0.1:8061")
    with pytest.raises(Exception, match="--web-admin-panel-addr: port 8061 is already used"):
        http_config(settings, "tcp://127.0.0.1:8071")


# ------------------------------------------------------------------ what ships


def test_every_file_ships_in_the_package_and_all_of_them_stay_small() -> None:
    assets = load_assets()
    on_disk = {path.name for path in STATIC.iterdir() if path.is_file()}
    assert set(assets) == on_disk  # every file is one the app serves
    assert {"index.html", "main.js", "panel.css", "favicon.svg"} <= on_disk
    total = sum(len(asset.body) for asset in assets.values())
    assert total < MAX_ASSETS_BYTES, f"the panel's files weigh {total} bytes"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "static/*" in pyproject["tool"]["setuptools"]["package-data"]["paddler.http.admin"]


def _sources() -> dict[str, str]:
    return {path.name: path.read_text() for path in STATIC.iterdir() if path.is_file()}


def test_every_reference_of_the_page_and_its_modules_is_a_file_it_serves() -> None:
    sources = _sources()
    assets = load_assets()
    references = re.findall(r'(?:src|href)="/static/([^"]+)"', sources["index.html"])
    for name, text in sources.items():
        if name.endswith(".js"):
            references += re.findall(r'from "\./([^"]+)"', text)
    assert references and all(reference in assets for reference in references), references


def test_nothing_is_loaded_from_elsewhere_and_no_html_is_built_from_data() -> None:
    for name, text in _sources().items():
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), name  # no CDN
        assert not re.search(r"@import|url\(\s*['\"]?https?:", text), name
        if name.endswith(".js"):
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
                assert sink not in text, f"{name} uses {sink}"
            assert "new Function" not in text and "localStorage" not in text, name


def test_the_page_has_a_openapi_document_of_its_routes() -> None:
    document = panel_app().simulate_get("/openapi.json").json
    assert set(document["paths"]) == {
        "/",
        "/config.json",
        "/favicon.ico",
        "/health",
        "/openapi.json",
        "/static/{name}",
    }


def test_management_answers_null_as_json_text_which_the_page_parses() -> None:
    """``/api/v1/balancer_applicable_state`` and ``.../chat_template_override`` answer
    ``null`` (Paddler's shape), not an empty body a browser's JSON parser refuses."""
    deps = HttpDeps(link=FakeLink(FakeClient()))  # type: ignore[arg-type]
    client = falcon.testing.TestClient(management.create_app(deps))
    for path in (
        "/api/v1/balancer_applicable_state",
        "/api/v1/agent/agent-x/chat_template_override",
    ):
        answer = client.simulate_get(path)
        assert (answer.status_code, answer.text) == (200, "null")
        assert answer.headers["content-type"] == "application/json"


def test_paddler_cluster_serves_the_panel_at_8062_unless_told_otherwise(capsys) -> None:
    from paddler.cluster import ClusterSettings, _announce, with_panel

    assert with_panel(HttpSettings()).panel_addr == "127.0.0.1:8062"
    assert with_panel(HttpSettings(web_admin_panel_addr="off")).panel_addr is None
    moved = with_panel(HttpSettings(web_admin_panel_addr="0.0.0.0:9000", tls_cert="c"))
    _announce(moved, ClusterSettings())
    assert "  admin panel https://127.0.0.1:9000/\n" in capsys.readouterr().out
    _announce(with_panel(HttpSettings(web_admin_panel_addr="off")), ClusterSettings())
    assert "admin panel" not in capsys.readouterr().out


def test_a_balancer_given_its_keys_as_flags_tells_the_panel_their_real_paths(
    tmp_path: Path,
) -> None:
    """``paddler balancer --curve-secret-key ... --authorized-agent-keys ...`` (flags,
    not the environment): the panel's settings carry the real paths."""
    from paddler.broker.settings import BrokerSettings
    from paddler.http.server import panel_settings

    secret, agents, _, public = balancer_keys(tmp_path)
    broker = BrokerSettings(curve_secret_key=str(secret), authorized_agent_keys=str(agents))
    settings = HttpSettings(web_admin_panel_addr="127.0.0.1:8062")
    config = http_config(settings, broker.clients_addr, broker=broker)
    panel = panel_settings(settings, config, broker)
    assert panel.agent_keys == AgentKeys(
        public, str(tmp_path / "etc" / "balancer.key"), str(agents)
    )
