"""Fixtures of the browser tests: Debian's headless Chromium driven by Playwright
(``executable_path``: no browser download), and one live ``paddler cluster`` on the
tiny demo model, over TLS with both API keys on, shared by the module.

Without a Chromium (or without Playwright) the tests skip, saying so; with
``PADDLER_REQUIRE_BROWSER=1`` (``.ci/run`` sets it once it installed Chromium) they
fail instead, so CI never skips them silently. ``PADDLER_CHROMIUM`` names another
executable. ``PADDLER_SCREENSHOT_DIR=docs`` writes the README's screenshots there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from paddler.testing.cluster import LocalCluster, free_port, print_log_tails, wait_until
from tests.browser.harness import (
    INFERENCE_KEY,
    MANAGEMENT_KEY,
    OpenCluster,
    PanelCluster,
    certificate,
    stop_process,
)

REQUIRE_ENV = "PADDLER_REQUIRE_BROWSER"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("PADDLER_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def no_browser(reason: str) -> None:
    """Skip with the reason, or fail when this run must have a browser."""
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason}, and {REQUIRE_ENV} is set: the browser tests must run", False)
    pytest.skip(f"{reason}: install Debian's chromium (apt-get install chromium) to run them")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium, one for the module."""
    unavailable = os.environ.get("PADDLER_BROWSER_UNAVAILABLE")
    if unavailable:
        no_browser(f"no browser could be installed ({unavailable})")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        no_browser(f"Playwright is not installed ({exc})")
    executable = find_chromium()
    if executable is None:
        no_browser("no Chromium found (chromium, chromium-browser, google-chrome)")
    playwright = sync_playwright().start()
    playwright.selectors.set_test_id_attribute("data-test")
    try:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def panel_cluster(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PanelCluster]:
    """``paddler cluster``: 2 agents of 2 slots on the tiny model, HTTPS, both API keys,
    every address a free loopback port. Stopped (and checked stopped) at the end."""
    folder = tmp_path_factory.mktemp("panel-cluster")
    cert, key, trusted = certificate(folder)
    ports = {name: free_port() for name in ("inference", "management", "panel")}
    temporary = folder / "tmp"  # where the cluster makes its keys (and so the test finds them)
    temporary.mkdir()
    env = dict(
        os.environ,
        TMPDIR=str(temporary),
        PADDLER_CACHE_DIR=str(folder / "cache"),
        PYTHONUNBUFFERED="1",
        PADDLER_INFERENCE_API_KEY=INFERENCE_KEY,
        PADDLER_MANAGEMENT_API_KEY=MANAGEMENT_KEY,
    )
    log_path = folder / "cluster.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "paddler",
                "cluster",
                "--agents",
                "2",
                "--slots",
                "2",
                "--agent-threads",
                "1",
                "--agents-addr",
                f"tcp://127.0.0.1:{free_port()}",
                "--clients-addr",
                f"tcp://127.0.0.1:{free_port()}",
                "--inference-addr",
                f"127.0.0.1:{ports['inference']}",
                "--management-addr",
                f"127.0.0.1:{ports['management']}",
                "--web-admin-panel-addr",
                f"127.0.0.1:{ports['panel']}",
                "--http-workers",
                "2",
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    http = httpx.Client(verify=trusted, timeout=10)
    screenshots = Path(os.environ.get("PADDLER_SCREENSHOT_DIR") or folder / "screenshots")
    screenshots.mkdir(parents=True, exist_ok=True)
    cluster = PanelCluster(
        process,
        log_path,
        panel=f"https://127.0.0.1:{ports['panel']}",
        inference=f"https://127.0.0.1:{ports['inference']}",
        management=f"https://127.0.0.1:{ports['management']}",
        http=http,
        model_copy=folder / "models" / "tiny-copy.gguf",
        screenshots=screenshots,
        folder=folder,
    )
    try:

        def ready() -> bool:
            try:
                agents = cluster.agents()
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return len(agents) == 2 and all(
                a["state_application_status"] == "Applied" and a["model_path"] for a in agents
            )

        wait_until(ready, timeout_s=60, interval_s=0.2, what="two agents with the demo model")
        (cluster.keys,) = temporary.glob("paddler-cluster-keys-*")
        model = Path(cluster.agents()[0]["model_path"])
        cluster.model_copy.parent.mkdir()
        shutil.copyfile(model, cluster.model_copy)
        yield cluster
    except BaseException:
        print(cluster.log()[-6000:])
        raise
    finally:
        http.close()
        stop_process(process, 10)


@pytest.fixture
def open_cluster(browser: Any, tmp_path: Path) -> Iterator[OpenCluster]:
    """``paddler balancer`` with its panel (plain HTTP, no API keys) and one real agent
    of one slot, with no model yet, that may download from 127.0.0.1 (into a cache folder
    of its own): for what would disturb the module's cluster. Stopped at the end."""
    panel = f"127.0.0.1:{free_port()}"
    local = LocalCluster(tmp_path / "open-cluster", web_admin_panel_addr=panel)
    cluster = OpenCluster(local, panel=f"http://{panel}", cache=tmp_path / "cache")
    local.env["PADDLER_CACHE_DIR"] = str(cluster.cache)
    try:
        local.start_balancer()
        local.start_real_agent("downloader", slots=1)
        local.wait_for_http()

        def panel_up() -> bool:
            try:
                return httpx.get(cluster.panel, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(panel_up, timeout_s=20, interval_s=0.1, what="the panel answers")
        wait_until(
            lambda: len(cluster.agents()) == 1, timeout_s=30, interval_s=0.1, what="the agent"
        )
        yield cluster
    except BaseException:
        print_log_tails(local.log_dir)
        raise
    finally:
        local.close()
